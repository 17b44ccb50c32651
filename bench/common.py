"""What every benchmark here does the same way: quiet libraries, the zoo's world, the `--shape`/`--repeats` flags,
and the report written to `runs/bench/<name>.json`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.paths import REPO_ROOT, default_cache_dir  # noqa: E402
from align.zoo import ZooConfig, build_zoo  # noqa: E402


def bench_parser(description: str, repeats: int = 2) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the flags they share: `--shape` and `--repeats`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", default="both", choices=["tiny", "realistic", "both"])
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs of each way")
    return parser


def quiet_libraries() -> None:
    """Warnings and library logs off: the benchmark prints its own table."""
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()


def zoo_root() -> Path:
    """The zoo's folder, its parts installed (the shipped ones) or built first."""
    build_zoo(ZooConfig())  # installs the shipped parts (nothing is trained when they match the code)
    return default_cache_dir()


def zoo_world_split(root: Path, rows: int, split: str = "train"):
    """The first `rows` images of the world split under the zoo folder `root` (`zoo_root`)."""
    import datasets

    return datasets.load_from_disk(str(root / "world"))[split].select(range(rows))


def write_report(name: str, report: dict) -> Path:
    """Write `runs/bench/<name>.json` and say where."""
    out = REPO_ROOT / "runs" / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return out
