"""Adding the image hashes to a shuffled pretraining mixture: `datasets`' `add_column` against `with_hashes`, in one run.

    python bench/prepare_rows.py                 # 20000 rows of the base's reasoning-run mixture
    python bench/prepare_rows.py --rows 151923   # all of it

`prepare_image_rows` (stage 1 and every later pretraining run) checks each row's images and adds their content
hashes as a column. The mixture is shuffled, so the dataset carries an indices mapping, and `Dataset.add_column`
first rewrites every row through `flatten_indices`, casting each batch of nested conversations in Python;
`model.pretrain.with_hashes` gathers the same rows with one Arrow `take` and appends the column. Both give the same
table (checked here, and in tests/model/test_pretrain.py). The mixture is `recipes/configs/tiny/pretrain_reasoning.yaml`'s:
detailed captions and every question category over the world's training images, spatial eight times, reasoned. The
`datasets` cache is off, so neither way reads a result a previous run wrote. Asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import datasets
from datasets import List, Value

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench_parser, quiet_libraries, write_report, zoo_root  # noqa: E402

from align.captioning import load_training_pairs  # noqa: E402
from model.pretrain import with_hashes  # noqa: E402


def main(argv=None) -> dict:
    parser = bench_parser(__doc__.splitlines()[0], repeats=1)
    parser.add_argument("--rows", type=int, default=20000, help="rows of the shuffled mixture")
    args = parser.parse_args(argv)
    quiet_libraries()
    datasets.disable_caching()
    mixture = load_training_pairs(
        str(zoo_root() / "world"), style="detailed", seed=0, question_turns=12, spatial_reasoning=True,
        questions=["color", "shape", "count", "existence", "spatial", "unanswerable"], question_repeats={"spatial": 8},
    )
    rows = mixture.select(range(min(args.rows, len(mixture))))
    hashes = [[f"{index:064x}"] * len(images) for index, images in enumerate(rows.with_format("arrow")["images"].to_pylist())]
    ways = {
        "add_column": lambda: rows.add_column("image_hashes", hashes, feature=List(Value("string"))),
        "with_hashes": lambda: with_hashes(rows, hashes),
    }
    seconds, tables = {way: [] for way in ways}, {}
    for repeat in range(args.repeats):
        for way in ways if repeat % 2 == 0 else list(reversed(ways)):
            start = time.perf_counter()
            tables[way] = ways[way]()
            seconds[way].append(time.perf_counter() - start)
            print(f"  repeat {repeat + 1} {way:>11}: {seconds[way][-1]:.2f} s", flush=True)
    same = tables["add_column"].with_format("arrow")[:].equals(tables["with_hashes"].with_format("arrow")[:])
    baseline, ours = (len(rows) / min(seconds[way]) for way in ways)
    print(f"\n| rows of the shuffled mixture | `add_column` | `with_hashes` | ratio | same table |\n|---:|---:|---:|---:|---|\n"
          f"| {len(rows)} of {len(mixture)} | {baseline:.0f} rows/s | {ours:.0f} rows/s | {ours / baseline:.0f}x | {same} |")
    report = {"ratio": ours / baseline, "baseline": baseline, "ours": ours, "unit": "rows/s",
              "shape": f"{len(rows)} rows of the reasoning run's mixture ({len(mixture)} in all)", "same_table": same,
              "seconds": seconds}
    write_report("prepare_rows", report)
    return report


if __name__ == "__main__":
    main()
