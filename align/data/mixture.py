"""Weighted mixtures of local datasets, configured like TRL's `DatasetMixtureConfig`.

TRL's `get_dataset` hands every entry to `datasets.load_dataset`, which reads neither our local formats
(LLaVA, ShareGPT, RLAIF-V with image folders) nor `save_to_disk` folders, and it never oversamples. This
is the equivalent over `load_dataset_local`: each source is converted, cleaned of bad rows and sampled to
its weight's share of the mixture.

YAML (parsed by `TrlParser` exactly as TRL parses `DatasetMixtureConfig.datasets`: a list of mappings
turned into dataclasses in `__post_init__`):

    datasets:
      - path: data/world            # save_to_disk folder
        split: train
        weight: 3
      - path: data/llava/llava_instruct.json
        format: llava
        image_root: data/llava/images
        weight: 1
        name: llava
    mixture_seed: 0
    mixture_size: 20000
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, Value

from align.world import CATEGORIES

from .formats import FORMATS, KIND_COLUMNS, KINDS, REJECTS_FILE, load_dataset_local
from .world import open_world, world_preference_rows

logger = logging.getLogger(__name__)


@dataclass
class MixtureSource:
    """One local dataset in a mixture (the counterpart of TRL's `DatasetConfig`)."""

    path: str
    format: str | None = None
    split: str = "train"
    weight: float = 1.0
    image_root: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(
                f"datasets entry {self.path!r}: unknown format {self.format!r}; supported: {list(FORMATS)}"
            )
        if not isinstance(self.weight, int | float) or not self.weight > 0:
            raise ValueError(f"datasets entry {self.path!r}: weight must be a number > 0, got {self.weight!r}")
        if self.name is None:
            stem = Path(self.path).stem
            self.name = stem if Path(self.path).suffix else f"{stem}/{self.split}"


@dataclass
class MixtureConfig:
    """A weighted mixture of local datasets; fields are named so they do not collide with TRL's configs
    (`seed` belongs to `TrainingArguments`)."""

    datasets: list[MixtureSource] = field(
        default_factory=list,
        metadata={
            "help": "Datasets to mix: a list of {path, format, split, weight, image_root, name}. `format` is one of "
            f"{list(FORMATS)} (detected when omitted); `weight`s are normalised into shares of the mixture."
        },
    )
    mixture_seed: int = field(default=0, metadata={"help": "Seed for sampling and shuffling the mixture."})
    mixture_size: int | None = field(
        default=None,
        metadata={"help": "Rows in the mixture; default: the total rows of all sources after cleaning."},
    )

    def __post_init__(self):
        # Same as TRL's DatasetMixtureConfig: entries parsed from YAML arrive as dicts.
        self.datasets = [MixtureSource(**d) if isinstance(d, dict) else d for d in self.datasets]
        names = [d.name for d in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"datasets entries need distinct names; repeated: {duplicates} (set `name`)")
        if self.mixture_size is not None and self.mixture_size < 1:
            raise ValueError(f"mixture_size must be >= 1 or None, got {self.mixture_size}")


def local_dataset_path(dataset_path: str | None, dataset_name: str | None) -> str | None:
    """The local dataset that `--dataset_path` or TRL's `--dataset_name` (taken as the same, a local path) names.

    Checked when the arguments are parsed only as far as a config naming data that is not there yet still parses:
    a `--dataset_name` that is no local path but looks like a Hub name (`org/name`) is refused at once; a missing
    path otherwise fails when the data is read.

    Raises:
        ValueError: both are given and differ, or `dataset_name` looks like a Hub name (nothing is downloaded here).
    """
    if dataset_path and dataset_name and dataset_path != dataset_name:
        raise ValueError("dataset_path and dataset_name name the same thing here: give one of them")
    if dataset_name and not Path(dataset_name).exists() and "/" in dataset_name and not dataset_name.startswith((".", "/")):
        raise ValueError(
            f"dataset {dataset_name!r} is not a local file or folder (it looks like a Hub dataset name): this suite "
            "loads datasets from local paths only; download it once (e.g. "
            "`datasets.load_dataset(...).save_to_disk(folder)`) and pass the folder"
        )
    return dataset_path or dataset_name


@dataclass(kw_only=True)  # keyword-only: mixed into argument classes whose first fields have no default
class DatasetNameArgument:
    """TRL's `--dataset_name`, which TRL users try first: here the same local path as the class's `dataset_path`."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "As TRL's scripts name it: here the same as --dataset_path (a local path; nothing is "
                  "downloaded)."},
    )

    def merge_dataset_name(self) -> None:
        """Fold `dataset_name` into `dataset_path` (`local_dataset_path`), so a saved config names the path once."""
        self.dataset_path = local_dataset_path(self.dataset_path, self.dataset_name)
        self.dataset_name = None


@dataclass
class WorldDataArguments(MixtureConfig, DatasetNameArgument):
    """Where the training rows come from: `datasets` (a weighted mixture of local datasets, see
    `align.data.mixture`) or, when it is empty, the shapes world."""

    world_path: str | None = field(
        default=None,
        metadata={"help": "The shapes world (a `save_to_disk` folder); default: the zoo's, .cache/zoo/world."},
    )
    world_split: str = field(default="train", metadata={"help": "Split of the world to train on."})
    world_images: int | None = field(
        default=None, metadata={"help": "Use only the first N images of the split (default: all)."}
    )
    spatial_reasoning: bool = field(
        default=False,
        metadata={"help": "Answer the world's yes/no spatial questions with their reason first: the object the "
                  "relation favours, then yes or no (\"The red circle is further left, so yes.\"; "
                  "align.world.reasoned_answer), in SFT conversations and preference pairs alike."},
    )
    # One dataset on the command line, as TRL's scripts take it (kept out of `MixtureConfig`, which composes with
    # TRL's `ScriptArguments` and its own `dataset_name`).
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "One local dataset file or folder instead of `datasets` (a one-entry mixture), e.g. "
                  "--dataset_path data/train.jsonl --dataset_format llava --image_root data/images."},
    )
    dataset_format: str | None = field(
        default=None, metadata={"help": f"Format of --dataset_path: one of {list(FORMATS)} (detected when omitted)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_path when it holds several."})
    image_root: str | None = field(
        default=None, metadata={"help": "Folder --dataset_path's relative image paths start from (default: its own)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.world_images is not None and self.world_images < 1:
            raise ValueError(f"world_images must be >= 1 or unset, got {self.world_images}")
        single = self._single_dataset()
        if single is not None:
            if self.datasets:
                raise ValueError("give either `datasets` (a mixture) or --dataset_path (one dataset), not both")
            # From here on it is the mixture's one entry: a saved config (config.yaml) names it there only.
            self.datasets = [single]
            self.dataset_path = self.dataset_name = self.dataset_format = self.image_root = None
            self.dataset_split = "train"

    def _single_dataset(self) -> MixtureSource | None:
        """--dataset_path (or its alias --dataset_name) as a one-entry mixture."""
        self.merge_dataset_name()
        if self.dataset_path is None:
            return None
        return MixtureSource(path=self.dataset_path, format=self.dataset_format, split=self.dataset_split,
                             image_root=self.image_root)

    def load_world_split(self) -> Dataset:
        world = open_world(self.world_path, self.world_split,
                           hint="set --world_path, or give `datasets` (a mixture of local datasets)")
        if self.world_images is not None:
            world = world.select(range(min(self.world_images, len(world))))
        logger.info("shapes world: %d images of %s/%s", len(world), self.world_path or "the zoo's world", self.world_split)
        return world


@dataclass
class WorldPairArguments:
    """How the default data draws preference pairs from the world (`align.data.world_preference_rows`), for DPO and
    the reward model alike; mixed into their script arguments before a `WorldDataArguments`."""

    pairs_per_image: int = field(
        default=2,
        metadata={"help": "World pairs: preference pairs drawn per world image (questions of different categories)."},
    )
    conclusion_pairs: float = field(
        default=0.0,
        metadata={"help": "World pairs, with spatial_reasoning: the fraction of the yes/no spatial pairs whose rejected "
                  "answer keeps the right reason and says the wrong yes or no (\"The blue square is further left, so "
                  "yes.\" against \"..., so no.\"): pairs that differ in the conclusion alone."},
    )
    pair_categories: list[str] | None = field(
        default=None,
        metadata={"help": "World pairs: draw them from the questions of these categories only (default: every "
                  "category).", "nargs": "*"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.pairs_per_image < 1:
            raise ValueError(f"pairs_per_image must be >= 1, got {self.pairs_per_image}")
        if not 0.0 <= self.conclusion_pairs <= 1.0:
            raise ValueError(f"conclusion_pairs must be in [0, 1], got {self.conclusion_pairs}")
        if self.conclusion_pairs and not self.spatial_reasoning:
            raise ValueError("conclusion_pairs rejects a reasoned answer's yes or no: set spatial_reasoning true")
        if self.pair_categories is not None and (not self.pair_categories or set(self.pair_categories) - set(CATEGORIES)):
            raise ValueError(f"pair_categories must name some of {list(CATEGORIES)}, got {self.pair_categories}")

    def world_pairs(self, seed: int) -> Dataset:
        """The preference pairs of the world split these arguments name."""
        return world_preference_rows(self.load_world_split(), seed=seed, per_image=self.pairs_per_image,
                                     reasoned=self.spatial_reasoning, conclusion_fraction=self.conclusion_pairs,
                                     categories=self.pair_categories)


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Rows per source: `total` split by normalised weights, rounded by largest remainder to sum to `total`."""
    shares = np.asarray(weights, dtype=float) / sum(weights) * total
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def sample_indices(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices of a source of `size` rows.

    Down-weighted: a random subset, no repeats. Up-weighted beyond its size: whole shuffled passes plus a
    random subset, so every row appears floor or ceil(count / size) times (sampling with replacement,
    balanced rather than i.i.d., which keeps repeats as even as possible).
    """
    passes, rest = divmod(count, size)
    parts = [rng.permutation(size) for _ in range(passes)] + [rng.permutation(size)[:rest]]
    return np.concatenate(parts).astype(np.int64)


def build_mixture(config: MixtureConfig, rejects_dir: str | os.PathLike | None = None, kind: str = "sft") -> Dataset:
    """Load, clean, weight and shuffle the sources of `config` into one dataset.

    Args:
        config: the sources and the seed.
        rejects_dir: folder for `rejects.jsonl`, one line per skipped row of every source.
        kind: "sft", "preference" or "prompt"; every source is converted to it.

    Returns:
        A `Dataset` with the internal columns of `kind` (`images`, `messages` for SFT) plus `source`
        (the entry's name), shuffled with `config.mixture_seed`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; supported: {list(KINDS)}")
    if not config.datasets:
        raise ValueError("the mixture has no datasets; add entries under `datasets:`")
    rejects_path = None
    if rejects_dir is not None:
        rejects_path = Path(rejects_dir) / REJECTS_FILE
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
        rejects_path.write_text("")
    parts = []
    for source in config.datasets:
        data, _ = load_dataset_local(
            source.path, format=source.format, kind=kind, image_root=source.image_root, split=source.split,
            rejects_path=rejects_path, append_rejects=True,
        )
        parts.append(data.select_columns(list(KIND_COLUMNS[kind])))

    total = config.mixture_size or sum(len(part) for part in parts)
    return weighted_mix([(s.name, part, s.weight) for s, part in zip(config.datasets, parts)], total,
                        config.mixture_seed)


def weighted_mix(parts: list[tuple[str, Dataset, float]], total: int, seed: int) -> Dataset:
    """`(name, dataset, weight)` parts sampled to their weights' shares of `total` rows (`mixture_counts`; a part
    repeats when its share exceeds its rows, `sample_indices`), each row tagged with its part's name in a `source`
    column (kept where a part has one already), and shuffled. Part `i` samples with the generator `[seed, i]`."""
    counts = mixture_counts([weight for _, _, weight in parts], total)
    sampled = []
    for i, ((name, part, _), count) in enumerate(zip(parts, counts)):
        if count == 0 or len(part) == 0:
            continue
        indices = sample_indices(len(part), count, np.random.default_rng([seed, i]))
        # Indices only: repeated rows are not copied until the trainer reads them.
        if "source" not in part.column_names:
            part = part.add_column("source", [name] * len(part), feature=Value("string"))
        sampled.append(part.select(indices))
        logger.info(
            "mixture: %s gives %d rows (%.1f%%) from %d%s", name, count, 100 * count / total, len(part),
            f", each row about {count / len(part):.2f} times" if count > len(part) else "",
        )
    return datasets.concatenate_datasets(sampled).shuffle(seed=seed)
