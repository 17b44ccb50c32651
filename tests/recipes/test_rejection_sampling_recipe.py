"""recipes/rejection_sampling.py end to end: the script on a tiny VLM and world, its outputs and statistics, a run
killed midway and continued (no prompt lost or repeated, the same candidates as an uninterrupted run), and clear
errors for bad settings."""

import json
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest
import yaml

from align.data import load_dataset_local
from tests.align.training_helpers import REPO, read_json, run_recipe, tiny_vlm, tiny_world


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("rejection_sampling")
    return {
        "vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]),
        "world": tiny_world(root / "world", images=12),
    }


def config(setup, output_dir, **settings) -> dict:
    return {
        "model_name_or_path": setup["vlm"], "dtype": "float32", "world_path": setup["world"], "dataset_split": "train",
        "output_dir": str(output_dir), "num_prompts": 12, "num_candidates": 3, "max_new_tokens": 6,
        "prompts_per_batch": 4, "temperature": 1.0, "seed": 0, **settings,
    }


def candidates(output_dir) -> dict[int, list[str]]:
    lines = (output_dir / "candidates.jsonl").read_text().splitlines()
    return {r["index"]: r["candidates"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_outputs_statistics_and_datasets(setup, tmp_path):
    out = tmp_path / "run"
    run_recipe("rejection_sampling.py", config(setup, out), tmp_path)
    records = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(12))
    assert all(len(r["candidates"]) == 3 and r["verifier"] == r["scores"] for r in records)
    assert all(set(s) <= {0.0, 1.0} for r in records for s in [r["scores"]])
    stats = read_json(out / "metrics.json")
    assert stats["prompts"] == 12 and stats["candidates"] == 36
    correct = [sum(r["verifier"]) for r in records]
    assert stats["any_correct"] == pytest.approx(sum(c > 0 for c in correct) / 12)
    assert stats["pass@1"] == pytest.approx(sum(correct) / 36)
    assert stats["sft_rows"] == sum(c > 0 for c in correct)
    assert stats["dpo_pairs"] == sum(0 < c < 3 for c in correct)
    # A random tiny policy may get nothing right: the datasets are then saved empty, and still load.
    assert len(datasets.load_from_disk(str(out / "sft"))) == stats["sft_rows"]
    assert len(datasets.load_from_disk(str(out / "dpo"))) == stats["dpo_pairs"]
    for name, kind, rows in (("sft", "sft", stats["sft_rows"]), ("dpo", "preference", stats["dpo_pairs"])):
        if rows:
            assert len(load_dataset_local(out / name, kind=kind)[0]) == rows


@pytest.mark.slow
def test_a_killed_run_continues_without_lost_or_repeated_prompts(setup, tmp_path):
    settings = {"num_prompts": 48, "prompts_per_batch": 2, "max_new_tokens": 12}
    killed = tmp_path / "killed"
    killed.mkdir()
    path = killed / "config.yaml"
    path.write_text(yaml.safe_dump(config(setup, killed, **settings)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "recipes/rejection_sampling.py"), "--config", str(path)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    file = killed / "candidates.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if file.exists() and len(file.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(file.read_text().splitlines())
    assert 4 <= done_before < 48

    result = run_recipe("rejection_sampling.py", config(setup, killed, **settings), tmp_path)
    assert "resuming:" in result.stdout + result.stderr
    indices = [json.loads(line)["index"] for line in file.read_text().splitlines()]
    assert sorted(indices) == list(range(48))  # none lost, none twice

    clean = tmp_path / "clean"
    run_recipe("rejection_sampling.py", config(setup, clean, **settings), tmp_path)
    assert candidates(killed) == candidates(clean)  # each batch is seeded on its own
    assert read_json(killed / "metrics.json")["sft_rows"] == read_json(clean / "metrics.json")["sft_rows"]


@pytest.mark.slow
def test_other_settings_in_the_same_folder_are_refused(setup, tmp_path):
    out = tmp_path / "run"
    run_recipe("rejection_sampling.py", config(setup, out, num_prompts=4), tmp_path)
    with pytest.raises(AssertionError, match=r"holds a run with other settings \(temperature: 1.0 -> 0.5\)"):
        run_recipe("rejection_sampling.py", config(setup, out, num_prompts=4, temperature=0.5), tmp_path)
    run_recipe("rejection_sampling.py", config(setup, out, num_prompts=4, temperature=0.5), tmp_path, "--force", "true")
    assert read_json(out / "run_settings.json")["temperature"] == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"scorer": "judge"}, "scorer must be one of"),
        ({"scorer": "reward"}, "needs reward_model_name_or_path"),
        ({"num_candidates": 1}, "num_candidates must be >= 2"),
        ({"categories": ["colour"]}, "categories has unknown names"),
        ({"sft_max_pass_rate": 0.0}, r"sft_max_pass_rate must be in \(0, 1\]"),
    ],
)
def test_bad_settings_are_named(setup, tmp_path, override, message):
    from tests.align.training_helpers import load_recipe

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(setup, tmp_path / "run", **override)))
    with pytest.raises(ValueError, match=message):
        load_recipe("rejection_sampling").make_parser().parse_args_and_config(["--config", str(path)])


@pytest.mark.slow
def test_prompts_without_records_are_ranked_by_a_reward_model(setup, tmp_path):
    from PIL import Image

    from model import VLMForRewardModeling, VLMProcessor

    reward = tmp_path / "reward"
    VLMForRewardModeling.from_vlm(setup["vlm"]).save_pretrained(reward)
    VLMProcessor.from_pretrained(setup["vlm"]).save_pretrained(reward)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [{"images": ["red.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]}
            for q in ("What color is the square?", "How many squares are there?")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    settings = {"dataset_path": str(tmp_path / "prompts.jsonl"), "num_prompts": None, "scorer": "reward",
                "reward_model_name_or_path": str(reward), "sft_threshold": -1.0, "min_margin": 0.0}
    run_recipe("rejection_sampling.py", config(setup, out, **settings), tmp_path)
    records = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["reward"] == r["scores"] and "verifier" not in r for r in records)
    stats = read_json(out / "metrics.json")
    assert stats["sft_rows"] == 2 and "pass@1" not in stats  # no records: nothing to verify against
    with pytest.raises(AssertionError, match="needs prompts with a `record` column|every row needs a `record`"):
        run_recipe("rejection_sampling.py", config(setup, tmp_path / "v", **{**settings, "scorer": "verifier"}), tmp_path)
