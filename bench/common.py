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


def training_bench_args(description: str, argv=None) -> argparse.Namespace:
    """The flags of a training benchmark (`--shape`, `--repeats`, `--steps`, `--batch_size`), parsed; libraries quiet."""
    parser = bench_parser(description)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    quiet_libraries()
    return args


def shape_paths(args: argparse.Namespace, root: Path, tmp: str | Path):
    """`(shape, VLM folder)` for each shape `--shape` asks for: the zoo's base VLM (tiny), or the realistic one with
    random weights built under `tmp` (`bench/grpo.py`'s `realistic_vlm`)."""
    from grpo import realistic_vlm

    for shape in ["tiny", "realistic"] if args.shape == "both" else [args.shape]:
        yield shape, str(root / "base") if shape == "tiny" else realistic_vlm(Path(tmp) / "realistic", root / "tokenizer")


def alternating_runs(ways, repeats: int, run, label: str, describe) -> dict[str, list]:
    """`run(way, repeat)` for every way, `repeats` times, the order reversed every other repeat (so that neither way
    always runs first, on a warmer or a more crowded machine), each result printed as `describe(result)`; the results
    by way."""
    results = {way: [] for way in ways}
    for repeat in range(repeats):
        for way in list(ways) if repeat % 2 == 0 else list(reversed(list(ways))):
            result = run(way, repeat)
            print(f"  {label} repeat {repeat + 1} {way:>6}: {describe(result)}", flush=True)
            results[way].append(result)
    return results


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
