"""Weighted mixtures of local datasets: shares, seeds, cleaning, and YAML through TrlParser."""

import json
from collections import Counter

import numpy as np
import PIL.Image
import pytest
from trl import ScriptArguments, TrlParser

from align.data import MixtureConfig, MixtureSource, build_mixture
from align.data.mixture import mixture_counts, sample_indices
from align.world import build_world

IMAGE = {"type": "image", "text": None}


def conversation(question, answer):
    return [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A TRL JSONL file of 40 rows (one of them bad), a LLaVA file of 20 rows and a saved world."""
    root = tmp_path_factory.mktemp("sources")
    PIL.Image.new("RGB", (6, 6), (1, 2, 3)).save(root / "a.png")
    rows = [{"messages": conversation(f"trl question {i}?", "yes"), "images": ["a.png"]} for i in range(40)]
    rows.append({"messages": conversation("bad row?", "yes"), "images": ["missing.png"]})
    (root / "trl.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    llava = [
        {"id": i, "image": "a.png", "conversations": [{"from": "human", "value": f"<image>\nllava question {i}?"},
                                                     {"from": "gpt", "value": "no"}]}
        for i in range(20)
    ]
    (root / "llava.json").write_text(json.dumps(llava))
    build_world(root / "world", sizes={"train": 8}, seed=0)
    return root


def test_mixture_counts_follow_normalised_weights():
    assert mixture_counts([3, 1], 80) == [60, 20]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]
    assert sum(mixture_counts([0.2, 0.3, 0.5], 7)) == 7


def test_upweighted_sources_repeat_evenly():
    indices = sample_indices(10, 25, np.random.default_rng(0))
    assert sorted(Counter(Counter(indices.tolist()).values()).items()) == [(2, 5), (3, 5)]
    subset = sample_indices(10, 4, np.random.default_rng(0))
    assert len(set(subset.tolist())) == 4


def test_weights_three_to_one(sources, tmp_path):
    config = MixtureConfig(
        datasets=[
            MixtureSource(path=str(sources / "trl.jsonl"), weight=3),
            MixtureSource(path=str(sources / "llava.json"), weight=1, name="llava"),
        ],
        mixture_seed=0,
        mixture_size=400,
    )
    mix = build_mixture(config, rejects_dir=tmp_path)
    assert mix.column_names == ["images", "messages", "source"]
    shares = Counter(mix["source"])
    assert shares == {"trl": 300, "llava": 100}
    # The 20 LLaVA rows are up-weighted to 100: each appears exactly 5 times; the 40 clean TRL rows 7-8 times.
    llava_questions = Counter(m[0]["content"][1]["text"] for m, s in zip(mix["messages"], mix["source"]) if s == "llava")
    assert set(llava_questions.values()) == {5} and len(llava_questions) == 20
    trl_questions = Counter(m[0]["content"][1]["text"] for m, s in zip(mix["messages"], mix["source"]) if s == "trl")
    assert set(trl_questions.values()) == {7, 8} and len(trl_questions) == 40
    # Shuffled: the first quarter holds both sources in about their shares.
    first = Counter(mix["source"][:100])
    assert 60 <= first["trl"] <= 90
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["row"], r["reason"]) for r in rejects] == [(str(sources / "trl.jsonl"), 40, "missing image")]
    assert mix[0]["images"][0].size == (6, 6)


def test_default_size_and_downweighting(sources):
    config = MixtureConfig(
        datasets=[{"path": str(sources / "trl.jsonl"), "weight": 1}, {"path": str(sources / "llava.json"), "weight": 1}]
    )
    mix = build_mixture(config)
    # Default size: all clean rows (40 + 20); equal weights give 30 each, the TRL rows sampled without repeats.
    assert Counter(mix["source"]) == {"trl": 30, "llava": 30}
    trl = [m[0]["content"][1]["text"] for m, s in zip(mix["messages"], mix["source"]) if s == "trl"]
    assert len(set(trl)) == 30


def test_same_seed_same_mixture_other_seed_other_order(sources):
    def build(seed):
        config = MixtureConfig(
            datasets=[{"path": str(sources / "trl.jsonl"), "weight": 3}, {"path": str(sources / "llava.json"), "weight": 1}],
            mixture_seed=seed,
            mixture_size=60,
        )
        mix = build_mixture(config)
        return [m[0]["content"][1]["text"] for m in mix["messages"]]

    assert build(1) == build(1)
    assert build(1) != build(2)


def test_world_folder_and_llava_file_share_the_internal_columns(sources):
    config = MixtureConfig(datasets=[{"path": str(sources / "world"), "split": "train"}, {"path": str(sources / "llava.json")}])
    mix = build_mixture(config)
    assert mix.column_names == ["images", "messages", "source"]
    assert Counter(mix["source"]) == {"world/train": 14, "llava": 14}


def test_preference_mixture(tmp_path):
    PIL.Image.new("L", (4, 4)).save(tmp_path / "x.png")
    rlaif = [{"question": f"q{i}?", "chosen": "yes", "rejected": "no", "image": "x.png"} for i in range(5)]
    (tmp_path / "rlaif.json").write_text(json.dumps(rlaif))
    config = MixtureConfig(datasets=[{"path": str(tmp_path / "rlaif.json"), "format": "rlaif_v"}], mixture_size=10)
    mix = build_mixture(config, kind="preference")
    assert mix.column_names == ["images", "prompt", "chosen", "rejected", "source"]
    assert len(mix) == 10 and Counter(p[0]["content"][1]["text"] for p in mix["prompt"]) == {f"q{i}?": 2 for i in range(5)}


def test_yaml_through_trl_parser(tmp_path):
    yaml_path = tmp_path / "mixture.yaml"
    yaml_path.write_text(
        """# launch: python recipes/sft.py --config this.yaml
dataset_name: ignored
datasets:
  - path: data/world
    split: train
    weight: 3
  - path: data/llava/llava_instruct.json
    format: llava
    image_root: data/llava/images
    weight: 1
    name: llava
mixture_seed: 7
mixture_size: 1000
"""
    )
    parser = TrlParser([ScriptArguments, MixtureConfig])
    script_args, mixture = parser.parse_args_and_config(["--config", str(yaml_path), "--mixture_seed", "9"])
    assert script_args.dataset_name == "ignored"
    assert mixture.mixture_seed == 9 and mixture.mixture_size == 1000
    assert mixture.datasets == [
        MixtureSource(path="data/world", split="train", weight=3, name="world/train"),
        MixtureSource(path="data/llava/llava_instruct.json", format="llava", image_root="data/llava/images", name="llava"),
    ]
    (cli,) = TrlParser([MixtureConfig]).parse_args_and_config(["--datasets", "a.json", "b.jsonl"])
    assert [d.path for d in cli.datasets] == ["a.json", "b.jsonl"]


def test_config_validation():
    with pytest.raises(ValueError, match="weight must be a number > 0"):
        MixtureConfig(datasets=[{"path": "a.json", "weight": 0}])
    with pytest.raises(ValueError, match=r"unknown format 'csv'; supported: \['disk', 'trl'"):
        MixtureConfig(datasets=[{"path": "a.json", "format": "csv"}])
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        MixtureConfig(datasets=[{"path": "x/a.json"}, {"path": "y/a.json"}])
    with pytest.raises(ValueError, match="no datasets"):
        build_mixture(MixtureConfig())


def test_a_source_with_no_usable_rows_stops_the_mixture(sources, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}]))
    config = MixtureConfig(datasets=[{"path": str(sources / "llava.json")}, {"path": str(tmp_path / "bad.json")}])
    with pytest.raises(ValueError, match=r"bad\.json \(llava\): no usable rows, skipped 1 of 1 rows \(1 missing image\)"):
        build_mixture(config, rejects_dir=tmp_path / "out")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("x", "missing image")]

