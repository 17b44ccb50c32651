"""align.probe: the linear probe on a case with a known answer, and the probe command on a tiny VLM."""

import json
from collections import Counter

import pytest
import torch

from align.probe import VALUES, fit_probe, main, single_object_rows
from tests.align.training_helpers import tiny_vlm, tiny_world


def test_fit_probe_reads_a_linearly_encoded_label_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    features = torch.randn(300, 8, generator=generator)
    features[:, 2] += 4.0 * labels  # the label, linearly readable from one feature among noise
    assert fit_probe(features[:200], labels[:200], features[200:], labels[200:], classes=3) > 0.95
    noise = torch.randn(300, 8, generator=generator)
    assert fit_probe(noise[:200], labels[:200], noise[200:], labels[200:], classes=3) < 0.6


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return {"vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]), "world": tiny_world(root / "world", images=80)}


def test_probe_command_on_a_tiny_vlm(setup, tmp_path, capsys):
    import datasets

    output = tmp_path / "probe.json"
    result = main(["--model", setup["vlm"], "--world", setup["world"], "--images", "40", "--output", str(output)])
    rows = single_object_rows(datasets.load_from_disk(setup["world"])["train"], 40)
    cut = int(len(rows) * 0.7)
    test_labels = [row["object"]["color"] for row in rows[cut:]]
    majority = Counter(row["object"]["color"] for row in rows[:cut]).most_common(1)[0][0]

    assert result["images"] == len(rows) and result["test_images"] == len(rows) - cut
    assert result["majority"] == pytest.approx(test_labels.count(majority) / len(test_labels))
    assert len(result["last_position"]) == 4 + 1  # the tiny Llama's 4 layers, plus the embeddings
    for value in (result["model_answer"], result["tower"], result["visual_tokens"], *result["last_position"]):
        assert 0.0 <= value <= 1.0 and (value * len(test_labels)) == pytest.approx(round(value * len(test_labels)))
    assert json.loads(output.read_text())["attribute"] == "color" and set(VALUES["color"]) >= set(test_labels)
    assert "| probe: last prompt position, after layer 4 |" in capsys.readouterr().out


def test_bad_arguments_are_named(setup):
    with pytest.raises(SystemExit):
        main(["--model", setup["vlm"], "--world", setup["world"], "--split", "nowhere"])
    with pytest.raises(SystemExit):
        main(["--model", setup["vlm"], "--world", setup["world"], "--holdout", "1.5"])
