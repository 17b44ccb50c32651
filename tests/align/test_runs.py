"""align.runs: whole-or-nothing writes, the output folder's settings rule, and complete checkpoints."""

import json

import pytest

from align.runs import (
    atomic_file,
    atomic_write_text,
    claim_output_dir,
    last_complete_checkpoint,
    settings_differences,
    staged_dir,
)


def test_atomic_file_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"accuracy": 0.5}')
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as f:
        f.write('{"accur')
        raise RuntimeError("killed half way")
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_staged_dir_replaces_the_folder_only_when_complete(tmp_path):
    target = tmp_path / "data"
    with staged_dir(target) as staging:
        (staging / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), staged_dir(target) as staging:
        (staging / "b.txt").write_text("two")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with staged_dir(target) as staging:
        (staging / "c.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_settings_differences_ignore_bookkeeping_and_name_the_rest():
    before = {"learning_rate": 1e-3, "logging_steps": 1, "output_dir": "a", "max_steps": 4}
    now = {"learning_rate": 2e-3, "logging_steps": 5, "output_dir": "b", "max_steps": 8, "beta": 0.1}
    assert settings_differences(before, now) == {"beta": (None, 0.1), "learning_rate": (1e-3, 2e-3), "max_steps": (4, 8)}
    assert "max_steps" not in settings_differences(before, now, allowed={"max_steps"})
    assert "beta" not in settings_differences(before, now, shared_only=True)


def test_claim_output_dir_continues_refuses_or_starts_over(tmp_path):
    out = tmp_path / "run"
    assert claim_output_dir(out, {"seed": 0, "beta": 0.1}) is False  # a new folder
    (out / "candidates.jsonl").write_text("{}\n")
    assert claim_output_dir(out, {"seed": 0, "beta": 0.1, "logging_steps": 3}) is True  # same settings: continued
    # A setting the recorded run did not have (the code gained it since) does not count against it.
    assert claim_output_dir(out, {"seed": 0, "beta": 0.1, "num_samples": 1}) is True
    with pytest.raises(ValueError, match=r"holds a run with other settings \(beta: 0.1 -> 0.2\).*--force"):
        claim_output_dir(out, {"seed": 0, "beta": 0.2})
    assert (out / "candidates.jsonl").exists()
    assert claim_output_dir(out, {"seed": 0, "beta": 0.2}, force=True) is False
    assert sorted(p.name for p in out.iterdir()) == ["run_settings.json"]
    assert json.loads((out / "run_settings.json").read_text()) == {"beta": 0.2, "seed": 0}


def test_last_complete_checkpoint_skips_one_cut_short(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, whole in ((2, True), (4, True), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if whole:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # torn
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-4")
    assert (tmp_path / "checkpoint-10").exists()
    assert last_complete_checkpoint(tmp_path, remove_incomplete=True).endswith("checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_nothing_in_the_project_loads_a_pickle():
    """Weights are safetensors, features .npy without pickles, everything else JSON: no `pickle.load`, no
    `torch.load` without `weights_only=True`, no `allow_pickle=True` anywhere in the project's code."""
    import re

    from align.paths import REPO_ROOT

    offenders = []
    for folder in ("align", "model", "recipes", "bench"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            calls = re.findall(r"torch\.load\([^)]*\)", text, re.S)
            if any("weights_only=True" not in call for call in calls) or re.search(r"pickle\.loads?\(|allow_pickle=True", text):
                offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []


def _build_slowly(path: str, marker: str, started, go) -> None:
    """A process building `path` through `staged_dir(shared=True)`: writes its files, waits until every builder has
    started, then finishes (so that the builds overlap)."""
    import time
    from pathlib import Path

    from align.runs import staged_dir

    with staged_dir(path, shared=True) as staging:
        (Path(staging) / "config.json").write_text("{}")
        started.release()
        go.wait(30)
        time.sleep(0.05)
        (Path(staging) / "weights").write_text(marker)


def test_a_folder_built_by_two_processes_at_once_is_whole_and_one_of_theirs(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started, go = context.Semaphore(0), context.Event()
    target = tmp_path / "merged"
    builders = [context.Process(target=_build_slowly, args=(str(target), name, started, go)) for name in "ab"]
    for builder in builders:
        builder.start()
    for _ in builders:
        assert started.acquire(timeout=60)
    assert not target.exists()  # nothing visible while both are writing
    go.set()
    for builder in builders:
        builder.join(60)
        assert builder.exitcode == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]
    assert (target / "weights").read_text() in ("a", "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left
