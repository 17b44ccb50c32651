"""Build the shapes world on disk and print what it holds.

    python -m align.world --output runs/world --train 4000 --validation 200 --test 500 --seed 0 --image_size 64

Every `WorldConfig` field is a flag as well (`--max_objects 4`, `--colors red green blue`); see `--help`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from . import CATEGORIES, WorldConfig, build_world


@dataclass
class BuildArguments:
    output: str = field(metadata={"help": "Directory the DatasetDict is saved to (save_to_disk)."})
    train: int = field(default=4000, metadata={"help": "Images in the train split."})
    validation: int = field(default=200, metadata={"help": "Images in the validation split."})
    test: int = field(default=500, metadata={"help": "Images in the test split."})
    seed: int = field(default=0, metadata={"help": "Base seed; each split derives its own from it."})


def main(args: BuildArguments, config: WorldConfig) -> None:
    start = time.perf_counter()
    sizes = {"train": args.train, "validation": args.validation, "test": args.test}
    world = build_world(args.output, sizes=sizes, config=config, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"wrote the shapes world to {args.output} in {elapsed:.1f}s (seed {args.seed}, {config.image_size} px)")
    for split, ds in world.items():
        categories = Counter(r["category"] for questions in ds["questions"] for r in json.loads(questions))
        answers = Counter(
            r["answer"] for questions in ds["questions"] for r in json.loads(questions) if r["category"] == "existence"
        )
        counts = ", ".join(f"{c} {categories[c]}" for c in CATEGORIES)
        print(f"  {split}: {len(ds)} images, {sum(categories.values())} questions ({counts}); "
              f"existence yes/no {answers['yes']}/{answers['no']}")


if __name__ == "__main__":
    build_args, world_config = HfArgumentParser((BuildArguments, WorldConfig)).parse_args_into_dataclasses()
    main(build_args, world_config)
