"""Prompt rows for the stages that sample from a policy (rejection sampling, GRPO): the shapes world's questions
with their question records (what the verifier checks answers against), or a local prompt set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from align.data import load_dataset_local
from align.data.mixture import DatasetNameArgument
from align.data.world import open_world
from align.evaluation import load_eval_questions
from align.paths import default_cache_dir
from align.world import CATEGORIES, prompt_rows


def load_prompts(
    source: str | os.PathLike | None,
    split: str = "train",
    offset: int = 0,
    num_prompts: int | None = None,
    categories: list[str] | None = None,
    needs_records: bool = True,
    rejects_path: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Prompt rows (`images`, `prompt` and, for world questions, `record`, `answer`, `category`).

    Args:
        source: a shapes world folder, a `save_to_disk` folder of prompt rows, or a TRL JSON/JSONL file of prompt
            rows (`images` paths, `prompt`, optionally a `record` each). Default: the zoo's world.
        split: the split of a world / `DatasetDict`.
        offset, num_prompts: keep prompts `offset` to `offset + num_prompts` (all after `offset` when None).
        categories: keep only questions of these categories (needs a `category` column).
        needs_records: whether prompts without question records are an error (the verifier needs them); when
            False, a prompt set without records is read as plain prompts.
        rejects_path: where bad rows of a plain prompt set are listed (`rejects.jsonl`).

    Raises:
        ValueError: naming the source when it is missing, lacks what is asked, or leaves no prompt.
    """
    source = Path(source or default_cache_dir() / "world")
    unknown = set(categories or []) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"categories has unknown names {sorted(unknown)}; supported: {list(CATEGORIES)}")
    if offset < 0 or (num_prompts is not None and num_prompts < 1):
        raise ValueError(f"need offset >= 0 and num_prompts >= 1 or unset, got {offset} and {num_prompts}")
    prompts = _world_prompts(source, split, None if num_prompts is None else offset + num_prompts, categories)
    if prompts is None:  # prompt rows: a folder or a file
        try:
            prompts = load_eval_questions(source, split=split)
        except ValueError as error:
            if needs_records or "record" not in str(error):
                raise
            prompts, report = load_dataset_local(source, kind="prompt", split=split)
            if rejects_path is not None:
                report.write(rejects_path)
        if categories:
            if "category" not in prompts.column_names:
                raise ValueError(f"{source}: the prompts have no `category` column to filter on")
            prompts = prompts.filter(lambda c: c in categories, input_columns="category")
    end = len(prompts) if num_prompts is None else min(len(prompts), offset + num_prompts)
    if offset >= end:
        raise ValueError(f"{source}: no prompts from offset {offset} (it has {len(prompts)})")
    return prompts.select(range(offset, end))


def _world_prompts(source: Path, split: str, needed: int | None, categories: list[str] | None) -> datasets.Dataset | None:
    """The first `needed` questions (all when None) of `categories` of a shapes world's split, one row per question
    as `align.world.prompt_rows` gives them, expanded from only as many images as they need; None when `source`
    is not a world (prompt rows). The default world's train split holds some 214,000 questions, and expanding them
    all took about 12 s on a 2-core CPU for the hundred a rejection-sampling round samples."""
    if not source.is_dir():
        return None
    data = open_world(source, split)
    if "questions" not in data.column_names or "record" in data.column_names:
        return None
    images = len(data) if needed is None else min(len(data), needed)  # an image holds 6-12 questions
    while True:
        rows = prompt_rows(data.select(range(images)) if images < len(data) else data, categories)
        if needed is None or len(rows) >= needed or images == len(data):
            return rows
        images = min(len(data), 2 * images)


@dataclass
class PromptArguments(DatasetNameArgument):
    """Where the prompts of a sampling stage come from (rejection sampling, GRPO): `load_prompts`' arguments."""

    world_path: str | None = field(
        default=None, metadata={"help": "Shapes world folder (default: the zoo's, .cache/zoo/world)."}
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a world folder, a save_to_disk folder or a TRL JSON/JSONL file of prompt rows (with a "
            "`record` per row for the verifier). Default: world_path."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the world / DatasetDict to use."})
    prompt_offset: int = field(default=0, metadata={"help": "Skip this many prompts first (e.g. a new slice per round)."})
    num_prompts: int | None = field(default=None, metadata={"help": "Prompts to use (default: all after the offset)."})
    categories: list[str] | None = field(
        default=None, metadata={"help": f"Only questions of these categories (world prompts): any of {list(CATEGORIES)}."}
    )

    def __post_init__(self):
        self.merge_dataset_name()

    def load_prompts(self, needs_records: bool = True, rejects_path: str | os.PathLike | None = None) -> datasets.Dataset:
        """The prompt rows these arguments name (`load_prompts`)."""
        return load_prompts(
            self.dataset_path or self.world_path, split=self.dataset_split, offset=self.prompt_offset,
            num_prompts=self.num_prompts, categories=self.categories, needs_records=needs_records,
            rejects_path=rejects_path,
        )


__all__ = ["PromptArguments", "load_prompts"]
