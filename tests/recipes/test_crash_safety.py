"""Kill -9 at chosen moments, then rerun the same command: nothing lost, nothing twice, the same outcome as a run
that was never killed, and no half-written file for a later stage to read. Reruns with other settings into the same
folder are refused, naming them; `--force` starts over.

Kill points here: a trainer between checkpoints and during a checkpoint's save (SFT), every other trainer after its
first checkpoint (stage-1 pretraining, reward model, distillation, GRPO), DPO during its reference precompute, an
evaluation while it generates, synthetic Q&A while it generates, an export while it writes, and `make demo` itself
(`--smoke`) in the middle of its rounds. Rejection sampling mid-sampling is in its own recipe test.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.world import WorldConfig, build_world
from tests.align.training_helpers import (
    IMAGE_SIZE,
    REPO,
    TINY_TRAINING,
    kill_when,
    offline_environment,
    read_json,
    run_recipe,
    run_until_killed,
    tiny_vlm,
    tiny_world,
)


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    with_validation = root / "world-validation"  # the reward recipe measures held-out pairs
    build_world(str(with_validation), sizes={"train": 8, "validation": 3}, config=WorldConfig(image_size=IMAGE_SIZE))
    return {
        "root": root,
        **tiny_parts,
        "vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]),
        "world": tiny_world(root / "world", images=12),
        "world_with_validation": str(with_validation),
    }


def lora_run(setup, output_dir: Path, **settings) -> dict:
    return {
        **TINY_TRAINING, "model_name_or_path": setup["vlm"], "output_dir": str(output_dir), "world_path": setup["world"],
        "use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_length": None,
        "save_strategy": "steps", "save_steps": 2, **settings,
    }


def losses(output_dir: Path) -> list:
    return read_json(output_dir / "metrics.json")["loss"]["history"]


def assert_same_losses(resumed: list, clean: list) -> None:
    assert [step for step, _ in resumed] == [step for step, _ in clean]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in clean], rel=1e-4)


@pytest.mark.slow
def test_sft_killed_between_and_during_checkpoints_then_rerun(setup, tmp_path):
    # 8 steps: 4 after the kill point at checkpoint-4, so that the kill lands before the run can finish.
    config = {**lora_run(setup, tmp_path / "clean", max_steps=8), "assistant_only_loss": True}
    run_recipe("sft.py", config, tmp_path)
    clean = losses(tmp_path / "clean")

    killed = tmp_path / "killed"
    config["output_dir"] = str(killed)
    run_until_killed("sft.py", config, tmp_path, lambda: (killed / "checkpoint-4" / "trainer_state.json").is_file())
    assert not (killed / "metrics.json").exists()
    # What a kill in the middle of saving checkpoint-4 leaves: its weights, but not the trainer state written last.
    newest = max(killed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    (newest / "trainer_state.json").unlink()

    rerun = run_recipe("sft.py", config, tmp_path)
    output = rerun.stdout + rerun.stderr
    assert f"{newest.name} was not written whole" in output and "continuing from" in output
    resumed_from = read_json(killed / "metrics.json")["resumed_from"]
    assert resumed_from is not None and int(resumed_from.rsplit("-", 1)[1]) < int(newest.name.split("-")[1])
    assert_same_losses(losses(killed), clean)
    assert not list(killed.glob(".*.partial*")), "a temporary file was left behind"

    # Other settings into the same folder: refused, naming them; --force starts over and records the new ones.
    changed = {**config, "learning_rate": 5.0e-4}
    with pytest.raises(AssertionError, match=r"holds a run with other settings \(learning_rate: 0.001 -> 0.0005\)"):
        run_recipe("sft.py", changed, tmp_path)
    run_recipe("sft.py", {**changed, "max_steps": 2}, tmp_path, "--force", "true")
    assert read_json(killed / "run_settings.json")["learning_rate"] == 5.0e-4
    assert read_json(killed / "metrics.json")["resumed_from"] is None
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.slow
def test_dpo_killed_during_the_reference_precompute_then_rerun(setup, tmp_path):
    config = lora_run(setup, tmp_path / "clean", max_steps=2, beta=0.1, precompute_ref_log_probs=True,
                      precompute_ref_batch_size=1)
    run_recipe("dpo.py", config, tmp_path)

    killed = tmp_path / "killed"
    config["output_dir"] = str(killed)
    log = tmp_path / "dpo.killed.log"
    run_until_killed("dpo.py", config, tmp_path, lambda: "precomputing the reference" in log.read_text())
    assert not (killed / "metrics.json").exists()
    run_recipe("dpo.py", config, tmp_path)
    assert_same_losses(losses(killed), losses(tmp_path / "clean"))
    assert read_json(killed / "metrics.json")["rows"] == read_json(tmp_path / "clean" / "metrics.json")["rows"]


@pytest.mark.slow
def test_export_killed_while_rewriting_then_rerun(setup, tmp_path):
    out = tmp_path / "export"
    config = {"model_name_or_path": setup["vlm"], "output_dir": str(out), "formats": "merged,card"}
    run_recipe("export.py", config, tmp_path)
    finished = read_json(out / "checksums.json")

    # Killed once a second export into the same folder has begun replacing the first one's files (its first act is
    # to delete checksums.json). Waiting for a file of the new merged model instead left a window of a few ms on
    # the tiny model, which the 20 ms poll could miss: the kill point must not depend on timing.
    rewriting = lambda: not (out / "checksums.json").exists()  # noqa: E731
    run_until_killed("export.py", config, tmp_path, rewriting)
    assert not (out / "checksums.json").exists()  # written last: without it the folder reads as unfinished
    run_recipe("export.py", {**config, "verify": True}, tmp_path)
    assert read_json(out / "checksums.json") == finished
    assert read_json(out / "verification.json")["ok"]
    assert json.loads((out / "run_settings.json").read_text())["formats"] == "merged,card"


def _pretrain(setup, output_dir: Path) -> dict:
    config = yaml.safe_load((REPO / "recipes/configs/tiny/pretrain.yaml").read_text())
    return {
        **config, "vision": [setup["siglip"]], "text": setup["llama"], "world_path": setup["world"],
        "feature_cache_dir": str(output_dir.parent / "features"), "output_dir": str(output_dir), "train_samples": 16,
        "per_device_train_batch_size": 2, "eval_captions": 0, "standardize_images": 8, "logging_steps": 1,
        "save_steps": 2, "save_total_limit": 3, "report_to": "none",
    }


RUNS = {
    "pretrain": _pretrain,
    "reward": lambda setup, out: lora_run(setup, out, world_path=setup["world_with_validation"], pairs_per_image=1,
                                          eval_images=2, score_learning_rate=1.0e-2),
    "distill": lambda setup, out: {
        **lora_run(setup, out, assistant_only_loss=True, alpha=0.5, cache_teacher_topk=8),
        "use_peft": False, "teacher_model_name_or_path": setup["vlm"],
    },
    "grpo": lambda setup, out: {
        key: value for key, value in lora_run(
            setup, out, num_prompts=16, num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
            beta=0.04,
        ).items() if key != "max_length"  # GRPO limits prompt and completion lengths instead
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RUNS))
def test_trainer_killed_after_a_checkpoint_then_rerun(setup, tmp_path, recipe):
    # Steps of tiny models take milliseconds: 6 steps after the kill point leave the kill time to land first.
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run_recipe(f"{recipe}.py", {**RUNS[recipe](setup, clean), "max_steps": 8}, tmp_path)
    config = {**RUNS[recipe](setup, killed), "max_steps": 8}
    run_until_killed(f"{recipe}.py", config, tmp_path, lambda: (killed / "checkpoint-2" / "trainer_state.json").is_file())
    assert not (killed / "metrics.json").exists()
    rerun = run_recipe(f"{recipe}.py", config, tmp_path)
    assert "continuing from" in rerun.stdout + rerun.stderr
    assert_same_losses(losses(killed), losses(clean))


@pytest.mark.slow
def test_evaluation_killed_while_generating_then_rerun(setup, tmp_path):
    config = {"model_name_or_path": setup["vlm"], "world_path": setup["world"], "dataset_split": "train",
              "num_questions": 24, "batch_size": 2, "max_new_tokens": 6, "dtype": "float32"}
    run_recipe("evaluate.py", {**config, "output_dir": str(tmp_path / "clean")}, tmp_path)
    killed = tmp_path / "killed"
    log = tmp_path / "evaluate.killed.log"
    run_until_killed("evaluate.py", {**config, "output_dir": str(killed)}, tmp_path,
                     lambda: "held-out questions from" in log.read_text())
    assert not (killed / "metrics.json").exists() and not (killed / "predictions.jsonl").exists()
    run_recipe("evaluate.py", {**config, "output_dir": str(killed)}, tmp_path)
    for name in ("predictions.jsonl", "eval_table.md"):
        assert (killed / name).read_text() == (tmp_path / "clean" / name).read_text()


@pytest.mark.slow
def test_synthetic_qa_killed_while_generating_then_rerun(setup, tmp_path):
    config = {"llm_name_or_path": setup["llama"], "world_path": setup["world"], "world_split": "train",
              "samples_per_caption": 4, "max_new_tokens": 24, "batch_size": 2, "seed": 0}
    run_recipe("augment.py", {**config, "output_dir": str(tmp_path / "clean")}, tmp_path)
    killed = tmp_path / "killed"
    log = tmp_path / "augment.killed.log"
    run_until_killed("augment.py", {**config, "output_dir": str(killed)}, tmp_path, lambda: " parameters) on " in log.read_text())
    assert not (killed / "metrics.json").exists() and not (killed / "data").exists()
    run_recipe("augment.py", {**config, "output_dir": str(killed)}, tmp_path)
    assert (killed / "generated.jsonl").read_text() == (tmp_path / "clean" / "generated.jsonl").read_text()
    assert read_json(killed / "metrics.json")["kept"] == read_json(tmp_path / "clean" / "metrics.json")["kept"]


def _demo_report(run_dir: Path) -> str:
    """The demo's report without its wall-clock cells (`| 21 s |`), the one thing two identical runs differ in."""
    return re.sub(r"\| \d+ s \|", "| s |", (run_dir / "report.md").read_text())


def _demo(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "align.demo", "--smoke", "--run_dir", str(run_dir)]


def _run_demo(run_dir: Path, log: Path) -> subprocess.Popen:
    # One CPU thread a process: two demos run side by side (more threads than cores slow every step several-fold).
    with open(log, "w") as out:
        return subprocess.Popen(_demo(run_dir), cwd=REPO, env=offline_environment(processes=2), stdout=out,
                                stderr=subprocess.STDOUT)


def _finished(run: subprocess.Popen, log: Path) -> str:
    assert run.wait(timeout=600) == 0, log.read_text()[-4000:]
    return log.read_text()


@pytest.mark.slow
def test_make_demo_killed_in_its_rounds_then_rerun(tmp_path):
    """`make demo` (its `--smoke` size: every step, a few examples, two steps each, on the default's shipped parts)
    killed with every process of it in the middle of its rounds, a pipeline within the pipeline, then the same
    command: the finished steps are reused, the cut ones continue, and it ends with the report of a demo never
    killed (run beside it: the demo fixes each step's CPU threads, so the two compute the same)."""
    from align.demo import SMOKE_QUESTIONS, lane_steps, pipeline
    from align.paths import SHIPPED_PARTS
    from align.zoo import SHIPPED, ZooConfig, build_zoo, part_fingerprints, read_manifest

    # The shipped parts, installed into the zoo's folder as `make demo` does, before the two demos start. Parts that
    # no longer match the code would be trained there instead, for hours: test_shipped_parts_match_this_code_and_settings.
    expected = part_fingerprints(ZooConfig())
    assert all(read_manifest(SHIPPED_PARTS / part)["fingerprint"] == expected[part] for part in SHIPPED)
    build_zoo(ZooConfig())
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean_run = _run_demo(clean, tmp_path / "clean.log")
    try:
        cut = killed / "rounds" / "round1" / "sft" / "metrics.json"
        kill_when(_demo(killed), cut.is_file, tmp_path / "killed.log", timeout=600, processes=2)
        assert not (killed / "rounds" / "metrics.json").exists() and not (killed / "report.md").exists()
        rerun = _finished(_run_demo(killed, tmp_path / "rerun.log"), tmp_path / "rerun.log")
        _finished(clean_run, tmp_path / "clean.log")
    finally:
        clean_run.kill()
    before_rounds = [step.name for group in pipeline(killed, SMOKE_QUESTIONS, smoke=True) for lane in group
                     for step in lane_steps(lane) if step.name != "rounds"]
    assert all(f"[demo] {name}: done before, reusing" in rerun for name in before_rounds)
    rounds = (killed / "rounds.log").read_text()
    assert "[round 1] rejection_sampling: done before, reusing" in rounds and "[round 1] sft: done before, reusing" in rounds
    assert "[round 1] dpo: done before" not in rounds
    assert _demo_report(killed) == _demo_report(clean)
    for name in ("rounds/round1/rejection_sampling/candidates.jsonl", "rounds/round1/eval/predictions.jsonl"):
        assert (killed / name).read_text() == (clean / name).read_text()
