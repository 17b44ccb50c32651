"""A recipe step run as a new interpreter (`python` launcher) and forked from the preloaded forkserver
(`forkserver` launcher, `align.pipeline`), in one run.

    python bench/launchers.py                       # the zoo parts in .cache/zoo, else a small zoo built here
    python bench/launchers.py --questions 600 --repeats 5

Both ways run the same step, `recipes/evaluate.py` on a VLM assembled from the zoo's parts (the questions of the
world's test split, the text-only regression included), through `align.pipeline.run_step` as `make demo` does. The
forkserver is started and warmed by one step first, its cost printed apart (a pipeline pays it once); then the
launchers alternate (the order flips every repetition) and the median seconds per step and their ratio are printed.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_cache import zoo_root  # noqa: E402

from align.pipeline import RECIPES, Step, run_step  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=100, help="Held-out questions each evaluation answers.")
    parser.add_argument("--repeats", type=int, default=3, help="Steps per launcher.")
    args = parser.parse_args(argv)

    from model import build_vlm

    with tempfile.TemporaryDirectory() as tmp:
        root = zoo_root(str(Path(tmp) / "zoo"))
        vlm_dir = Path(tmp) / "vlm"
        vlm, processor = build_vlm(vision=str(root / "siglip"), text=str(root / "llama"), fusion="prepend")
        vlm.save_pretrained(vlm_dir)
        processor.save_pretrained(vlm_dir)
        overrides = {"model_name_or_path": vlm_dir, "world_path": root / "world", "num_questions": args.questions}
        run_dir = Path(tmp) / "runs"

        def step(launcher: str, name: str) -> float:
            start = time.perf_counter()
            run_step(Step(name, "evaluate.py", RECIPES / "configs" / "tiny" / "evaluate.yaml", overrides, launcher),
                     run_dir, force=True, tag="bench")
            return time.perf_counter() - start

        first = step("forkserver", "warm-up")
        seconds = {"python": [], "forkserver": []}
        for repeat in range(args.repeats):
            order = ("python", "forkserver") if repeat % 2 == 0 else ("forkserver", "python")
            for launcher in order:
                seconds[launcher].append(step(launcher, f"{launcher}-{repeat}"))

    median = {launcher: statistics.median(values) for launcher, values in seconds.items()}
    print(f"\nrecipes/evaluate.py, {args.questions} questions, {args.repeats} steps per launcher (median seconds per step)")
    print("| launcher | s / step | runs |")
    print("|---|---:|---|")
    for launcher, values in seconds.items():
        print(f"| {launcher} | {median[launcher]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print(f"forkserver start, once per pipeline (first step minus the median forked step): "
          f"{first - median['forkserver']:.1f} s")
    print(f"python / forkserver: {median['python'] / median['forkserver']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
