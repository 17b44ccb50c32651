"""Running recipes one after another, each in its own process exactly as a user launches them: `make demo` and the
multi-round recipe are sequences of these steps.

A step whose output folder already holds its `metrics.json` (written last by every recipe) is skipped and its
metrics reused, and a step cut short continues from its own checkpoints, so a killed pipeline continues where it
stopped. A step is reused only under the settings it ran with (`<run_dir>/<name>.step.json`): a rerun with other
settings is refused, naming them, unless `force` (every step redone from scratch). Each step's output goes to
`<run_dir>/<name>.log`.

The `forkserver` launcher runs each recipe, still as `__main__` in its own process, in a child forked from a
server process that imported torch, transformers, PEFT, TRL and this package once (the standard library's
`multiprocessing` forkserver with preloaded modules). On a small CPU machine those imports take longer than many
of the default's steps (`bench/launchers.py`: an evaluation step 11.9 s as a new interpreter, 3.8 s forked, on
this project's 2-core machine), and a pipeline runs dozens.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from align.paths import REPO_ROOT
from align.runs import atomic_write_text, describe_differences, settings_differences

RECIPES = REPO_ROOT / "recipes"
WALL_SECONDS = "wall_seconds.json"  # next to a step's metrics.json: how long its run took
LAUNCHERS_HELP = (
    "Command each stage runs under: python (a new interpreter), forkserver (forked from one process that imported "
    "the libraries once: align.pipeline), or e.g. `accelerate launch --config_file ...`."
)
# What the recipes import, imported once by the forkserver (align.pipeline.run_step with the forkserver launcher).
PRELOAD = (
    "torch", "transformers", "peft", "datasets", "accelerate", "trl", "bitsandbytes", "model", "model.pretrain",
    "align.pipeline", "align.training", "align.sft", "align.dpo", "align.distill", "align.evaluation",
    "align.rejection_sampling", "align.scoring", "align.captioning",
)


@dataclass
class Step:
    """One recipe run: `<launcher> recipes/<script> --config <config> --output_dir <run_dir>/<name> <overrides>`.

    `launcher` is the command before the script, e.g. "python" (this interpreter) or
    "accelerate launch --config_file recipes/accelerate/single.yaml", or "forkserver" (this interpreter, forked
    from a process that imported the libraries once: module docstring). `threads` caps the process's CPU threads
    (OMP/MKL; torch's intra-op threads under the forkserver), for steps that run side by side (`run_parallel`).
    """

    name: str
    script: str
    config: str | Path
    overrides: dict = field(default_factory=dict)
    launcher: str = "python"
    threads: int | None = None

    def environment(self) -> dict[str, str]:
        if self.threads is None:
            return dict(os.environ)
        return {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}

    def settings(self) -> dict:
        """What the step computes with: its script, its config file's settings and the overrides (as passed)."""
        config = yaml.safe_load(Path(self.config).read_text()) if Path(self.config).is_file() else None
        overrides = {k: list(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in self.overrides.items()}
        # As read back from the step's JSON record, so that the two compare equal.
        return json.loads(json.dumps({"script": self.script, **(config or {}), **overrides}, default=str))

    def command(self, run_dir: Path) -> list[str]:
        launcher = [sys.executable] if self.launcher in ("python", "forkserver") else shlex.split(self.launcher)
        cmd = [*launcher, str(RECIPES / self.script), "--config", str(self.config)]
        cmd += ["--output_dir", str(run_dir / self.name)]
        for key, value in self.overrides.items():
            # A list is one flag with several values (`--categories count spatial`), as HfArgumentParser reads it.
            cmd += [f"--{key}", *map(str, value)] if isinstance(value, (list, tuple)) else [f"--{key}", str(value)]
        return cmd


def run_step(step: Step, run_dir: Path, force: bool = False, tag: str = "pipeline") -> dict:
    """Run `step` (unless its `metrics.json` exists and not `force`) and return its metrics, with `wall_seconds`
    (the run's time, kept in `<output>/wall_seconds.json`). With `force` the step's output folder is deleted first.

    Raises:
        SystemExit: when the step fails, with the last lines of its log, or when it ran before with other settings
            and not `force`.
    """
    out = run_dir / step.name
    metrics_file = out / "metrics.json"
    seconds_file = out / WALL_SECONDS
    record = run_dir / f"{step.name}.step.json"
    settings = step.settings()
    if force:
        shutil.rmtree(out, ignore_errors=True)
    elif record.is_file():
        differences = settings_differences(json.loads(record.read_text()), settings)
        if differences:
            raise SystemExit(
                f"[{tag}] {step.name} ran before in {run_dir} with other settings "
                f"({describe_differences(differences)}); rerun with --force to redo every step, or use another run folder"
            )
    atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if metrics_file.exists() and not force:
        print(f"[{tag}] {step.name}: done before, reusing {out}", flush=True)
        return _with_seconds(json.loads(metrics_file.read_text()), seconds_file)
    print(f"[{tag}] {step.name}: {' '.join(step.command(run_dir)[1:])}", flush=True)
    start = time.time()
    log = run_dir / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if step.launcher == "forkserver":
        returncode = _run_forked(step, run_dir, log)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(
                step.command(run_dir), cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, env=step.environment()
            )
        returncode = proc.returncode
    if returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"[{tag}] {step.name} failed (exit {returncode}); last lines of {log}:\n{tail}")
    seconds = time.time() - start
    print(f"[{tag}] {step.name}: {seconds:.0f} s", flush=True)
    atomic_write_text(seconds_file, json.dumps({"wall_seconds": seconds}))
    return _with_seconds(json.loads(metrics_file.read_text()), seconds_file)


def _with_seconds(metrics: dict, seconds_file: Path) -> dict:
    """The step's metrics with `wall_seconds`, the time its run took (when it was recorded)."""
    if seconds_file.is_file():
        metrics["wall_seconds"] = json.loads(seconds_file.read_text())["wall_seconds"]
    return metrics


def _run_forked(step: Step, run_dir: Path, log: Path) -> int:
    """Run `step` under the forkserver launcher, its output to `log`; its exit code."""
    log.write_text("")
    script, *argv = step.command(run_dir)[1:]
    return run_forked(script, argv, step.environment(), log, log, threads=step.threads)


def run_forked(
    script: str | Path, argv: list[str], environment: dict[str, str], stdout: Path, stderr: Path,
    threads: int | None = None, timeout: float | None = None,
) -> int:
    """Run `script argv...` as `__main__` in a child of the forkserver (`start_forked`) and return its exit code.

    Raises:
        TimeoutError: when `timeout` seconds pass first (the child is killed).
    """
    child = start_forked(script, argv, environment, stdout, stderr, threads)
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise TimeoutError(f"{script} ran past {timeout} s and was killed")
    return child.exitcode


def start_forked(
    script: str | Path, argv: list[str], environment: dict[str, str], stdout: Path, stderr: Path,
    threads: int | None = None,
) -> multiprocessing.process.BaseProcess:
    """Start `script argv...` as `__main__` in a child of the forkserver (started on first use, preloading
    `PRELOAD`), with `environment`, its standard output and error appended to the files `stdout` and `stderr` (they
    may be the same) and at most `threads` torch threads; returns the running child (`join` it).

    The child is a process of its own, so a recipe that starts a pipeline (rounds, students) starts its own
    forkserver. Variables read only at import (e.g. `HF_HUB_OFFLINE`, `OMP_NUM_THREADS`) take the values the server
    imported the libraries with: this process's, when it first ran a step.
    """
    context = _forkserver()
    child = context.Process(
        target=_recipe_main, args=(str(script), list(argv), str(stdout), str(stderr), dict(environment), threads),
        name=Path(script).stem,
    )
    child.start()
    return child


def start_forkserver() -> None:
    """Start the forkserver now, so that its imports overlap other work (`make demo` starts it before building the
    parts); `run_forked` starts it on first use otherwise."""
    _forkserver()
    multiprocessing.forkserver.ensure_running()


def _forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def _recipe_main(
    script: str, argv: list[str], stdout: str, stderr: str, environment: dict, threads: int | None
) -> None:
    """The forked child: its output files, environment and thread cap, then the recipe as `__main__`."""
    import torch

    for target, path in ((1, stdout), (2, stderr)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(REPO_ROOT)
    if threads is not None:
        torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when the server imported torch
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def derived_step(
    run_dir: Path, name: str, script: str, base: str | Path, updates: dict, pipeline: str, launcher: str = "python",
    threads: int | None = None,
) -> Step:
    """A step of a pipeline recipe (`pipeline`, e.g. "rounds.py"): `base` with `updates` and `output_dir:
    <run_dir>/<name>` written to `<run_dir>/<name>.yaml` (`derived_config`), run by `script` from that file."""
    updates = {**updates, "output_dir": str(Path(run_dir) / name)}
    header = f"Derived by recipes/{pipeline} from {base}; rerun this step with: python recipes/{script} --config <this file>"
    config = derived_config(base, updates, Path(run_dir) / f"{name}.yaml", header)
    return Step(name, script, config, launcher=launcher, threads=threads)


def threads_per_job(parallel: int) -> int | None:
    """CPU threads for each of `parallel` processes sharing this machine (None: one process, no cap)."""
    return None if parallel <= 1 else max(1, (os.cpu_count() or 1) // parallel)


def run_parallel(jobs: list[Callable[[], object]], parallel: int = 1) -> list:
    """Run `jobs` (each typically one or more `run_step` calls of independent steps), `parallel` at a time; returns
    their results in order. A failed job's exception is raised once the running jobs have finished.

    On a small CPU machine, tiny models use threads poorly: two single-threaded recipe processes side by side do
    nearly twice the work of one two-threaded process (their start-up, mostly imports, is single-threaded too), so
    independent steps, e.g. a student's distilled and labels-only runs, are run this way (`Step.threads`).
    """
    if parallel <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def derived_config(base: str | Path, updates: dict, path: str | Path, header: str) -> Path:
    """Write `base` (a recipe YAML) with `updates` applied to `path`, under a header comment; returns `path`.

    The written file is the exact configuration a pipeline step ran with, so the step can be rerun by hand.
    """
    base = Path(base)
    if not base.is_file():
        raise ValueError(f"recipe config {base} does not exist")
    config = yaml.safe_load(base.read_text()) or {}
    config.update(updates)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(config, sort_keys=False))
    return path


__all__ = [
    "LAUNCHERS_HELP", "PRELOAD", "RECIPES", "Step", "derived_config", "derived_step", "run_forked", "run_parallel",
    "run_step", "start_forked", "start_forkserver", "threads_per_job",
]
