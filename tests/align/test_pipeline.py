"""align.pipeline: steps run as processes with an optional thread cap, and independent jobs run side by side."""

import threading
import time

import pytest

from align.pipeline import Step, run_parallel, run_step, start_forkserver, threads_per_job


def test_run_parallel_keeps_order_and_overlaps_jobs():
    running, peak, lock = 0, 0, threading.Lock()

    def job(value):
        def run():
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.05)
            with lock:
                running -= 1
            return value

        return run

    assert run_parallel([job(i) for i in range(5)], parallel=2) == [0, 1, 2, 3, 4]
    assert peak == 2
    peak = 0
    assert run_parallel([job(i) for i in range(3)], parallel=1) == [0, 1, 2] and peak == 1


def test_run_parallel_raises_and_starts_nothing_more_after_a_failure():
    started = []

    def fail():
        started.append("fail")
        raise SystemExit("step failed")

    def slow(name):
        def run():
            started.append(name)
            time.sleep(0.1)
            return name

        return run

    with pytest.raises(SystemExit, match="step failed"):
        run_parallel([fail, slow("a"), slow("b"), slow("c"), slow("d")], parallel=2)
    assert "d" not in started  # queued jobs were cancelled once the failure was seen


def test_step_threads_cap_the_process_environment(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert threads_per_job(1) is None and threads_per_job(2) == 1 and threads_per_job(8) == 1
    capped = Step("x", "sft.py", "c.yaml", threads=1).environment()
    assert capped["OMP_NUM_THREADS"] == "1" and capped["MKL_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert "OMP_NUM_THREADS" not in Step("x", "sft.py", "c.yaml").environment()


RECIPE = '''
import json, os, sys
from pathlib import Path

import torch

if __name__ == "__main__":
    out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
    print("hello from", Path(sys.argv[0]).name, flush=True)
    if "--fail" in sys.argv:
        raise SystemExit("this recipe failed on purpose")
    out.mkdir(parents=True)
    metrics = {"argv": sys.argv[1:], "threads": torch.get_num_threads(), "cwd": os.getcwd(), "marker": os.environ.get("PIPELINE_TEST")}
    (out / "metrics.json").write_text(json.dumps(metrics))
'''


def test_forkserver_launcher_runs_the_recipe_as_main_with_its_log_threads_and_environment(tmp_path, monkeypatch):
    from align.paths import REPO_ROOT

    start_forkserver()  # as make demo does before building the parts; the steps below then use that server
    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    monkeypatch.setenv("PIPELINE_TEST", "seen")
    step = Step("ok", str(script), "c.yaml", {"seed": 3, "categories": ["count", "spatial"]}, launcher="forkserver", threads=1)
    metrics = run_step(step, tmp_path / "run")
    assert metrics["argv"] == [
        "--config", "c.yaml", "--output_dir", str(tmp_path / "run" / "ok"), "--seed", "3", "--categories", "count", "spatial",
    ]
    assert metrics["threads"] == 1 and metrics["marker"] == "seen" and metrics["cwd"] == str(REPO_ROOT)
    assert "hello from recipe.py" in (tmp_path / "run" / "ok.log").read_text()
    assert metrics["wall_seconds"] > 0
    again = run_step(step, tmp_path / "run")  # done before: reused, not rerun, its time kept
    assert again["argv"] == metrics["argv"] and again["wall_seconds"] == metrics["wall_seconds"]

    failing = Step("bad", str(script), "c.yaml", {"fail": 1}, launcher="forkserver")
    with pytest.raises(SystemExit, match="(?s)bad failed .*this recipe failed on purpose"):
        run_step(failing, tmp_path / "run")


def test_a_step_is_reused_only_under_the_settings_it_ran_with(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.001\nlogging_steps: 1\n")
    run = tmp_path / "run"
    first = run_step(Step("s", str(script), config, {"seed": 3}, launcher="forkserver"), run)

    # Settings that do not change the result (logging) may change; the step is reused.
    config.write_text("learning_rate: 0.001\nlogging_steps: 5\n")
    assert run_step(Step("s", str(script), config, {"seed": 3}, launcher="forkserver"), run) == first

    # Other settings, in the config or the overrides: refused, naming each difference.
    config.write_text("learning_rate: 0.002\nlogging_steps: 5\n")
    changed = Step("s", str(script), config, {"seed": 4}, launcher="forkserver")
    with pytest.raises(SystemExit, match=r"s ran before .* \(learning_rate: 0.001 -> 0.002; seed: '3' -> '4'\)"):
        run_step(changed, run)
    # --force redoes the step from an empty folder and records the new settings.
    (run / "s" / "leftover.txt").write_text("from the first run")
    redone = run_step(changed, run, force=True)
    assert redone["argv"][-1] == "4" and not (run / "s" / "leftover.txt").exists()
    assert run_step(changed, run)["argv"] == redone["argv"]
