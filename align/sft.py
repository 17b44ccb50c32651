"""SFT data for the recipe: a weighted mixture of local datasets, or by default the shapes world's conversations
mixed with refusals (safety) and captioning turns (augmentation), with bad rows set aside in `rejects.jsonl`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from align.data import REJECTS_FILE, build_mixture, refusal_rows, validate_rows, world_sft_rows
from align.data.mixture import (
    WorldDataArguments,
    mixture_counts,
    weighted_mix,
)
from align.runs import RunArguments
from align.world import caption_rows
from model.pretrain import FEATURE_CACHE_MODES, resolve_feature_cache

logger = logging.getLogger(__name__)



@dataclass
class CachedFeatureDataArguments(WorldDataArguments):
    """The training data, and whether training reads the vision towers' cached output instead of pixels (SFT, DPO)."""

    use_feature_cache: str = field(
        default="false",
        metadata={
            "help": "Read the vision towers' cached output instead of running them: true, auto (when the stage "
            "freezes the towers) or false. Every image of the data is encoded once into the cache first "
            "(model.feature_cache), then no tower runs in training (nor in DPO's reference pass); that pays off when "
            "the run sees each image more than once or the towers are large (bench/sft.py, bench/dpo.py)."
        },
    )
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "Root folder of the feature cache (default: <output_dir>/feature_cache)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.use_feature_cache, bool):
            self.use_feature_cache = str(self.use_feature_cache).lower()
        if self.use_feature_cache not in FEATURE_CACHE_MODES:
            raise ValueError(f"use_feature_cache must be one of {list(FEATURE_CACHE_MODES)}, got {self.use_feature_cache!r}")

    def feature_cache_path(self, output_dir: str, stage: str) -> str | None:
        """The feature cache's folder when training reads it (`use_feature_cache` for `stage`), else None."""
        if not resolve_feature_cache(self.use_feature_cache, stage):
            return None
        return self.feature_cache_dir or os.path.join(output_dir, "feature_cache")


@dataclass
class SFTScriptArguments(CachedFeatureDataArguments, RunArguments):
    """Data of the SFT recipe."""

    refusal_weight: float = field(
        default=0.1,
        metadata={
            "help": "Default data: weight of refusal rows (unanswerable questions answered with a refusal) against "
            "the world's conversations (weight 1)."
        },
    )
    caption_weight: float = field(
        default=0.0,
        metadata={"help": "Default data: weight of captioning turns (augmentation) against the conversations (weight 1)."},
    )
    world_weight: float = field(
        default=0.0,
        metadata={
            "help": "With `datasets:`, also mix in the default data (the world's conversations, refusals and "
            "captions, weighted as above) with this weight against the datasets' total weight; 0: datasets only. "
            "E.g. rejection-sampled answers mixed with the original SFT data."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("refusal_weight", "caption_weight", "world_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def mix(parts: dict[str, tuple[Dataset, float]], size: int, seed: int) -> Dataset:
    """In-memory SFT datasets (`{name: (dataset, weight)}`) sampled to their weights' shares of `size` rows as
    `build_mixture` samples local ones (`align.data.mixture.weighted_mix`), on their `images`, `messages` (and
    `source`) columns; parts of weight 0 are left out before sampling."""
    kept = [
        (name, data.select_columns(["images", "messages", *(["source"] if "source" in data.column_names else [])]), weight)
        for name, (data, weight) in parts.items() if weight > 0
    ]
    return weighted_mix(kept, size, seed)


def world_sft_mixture(args: SFTScriptArguments, seed: int) -> Dataset:
    """The default SFT data: the world's conversations, refusals and (optionally) captioning turns by weight."""
    world = args.load_world_split()
    conversations = world_sft_rows(world, reasoned=args.spatial_reasoning)
    size = args.mixture_size or round(len(conversations) * (1 + args.refusal_weight + args.caption_weight))
    counts = mixture_counts([1.0, args.refusal_weight, args.caption_weight], size)
    parts = {"conversations": (conversations, 1.0)}
    if counts[1]:
        parts["refusals"] = (refusal_rows(world, counts[1], seed=seed), args.refusal_weight)
    if counts[2]:
        parts["captions"] = (caption_rows(world).select_columns(["images", "messages"]), args.caption_weight)
    return mix(parts, size, seed)


def checked(dataset: Dataset, kind: str, source: str, output_dir: str, write_rejects_file: bool) -> Dataset:
    """`validate_rows` with the rejects written to `output_dir/rejects.jsonl`; an empty result is an error."""
    if len(dataset) == 0:
        raise ValueError(f"{source}: the dataset is empty")
    clean, report = validate_rows(dataset, kind, source=source)
    if write_rejects_file:  # empty when nothing was skipped, so a rerun never shows stale rejects
        report.write(Path(output_dir) / REJECTS_FILE)
    if len(clean) == 0:
        raise ValueError(f"{source}: no usable rows, {report.summary()}; see {Path(output_dir) / REJECTS_FILE}")
    return clean


def sft_dataset(args: SFTScriptArguments, output_dir: str, seed: int, main_process: bool = True) -> Dataset:
    """The SFT training rows (`images`, `messages`, `source`), bad rows skipped and listed in
    `output_dir/rejects.jsonl` (written by the main process only).

    Raises:
        ValueError: when the data is missing, empty, or has no usable row.
    """
    if args.datasets and args.world_weight > 0:
        local = build_mixture(args, rejects_dir=output_dir if main_process else None, kind="sft")
        world = checked(world_sft_mixture(args, seed), "sft", "shapes world", output_dir, write_rejects_file=False)
        local_weight = sum(source.weight for source in args.datasets)
        parts = {"datasets": (local, local_weight), "world": (world, args.world_weight)}
        return mix(parts, args.mixture_size or len(local) + len(world), seed)
    if args.datasets:
        return build_mixture(args, rejects_dir=output_dir if main_process else None, kind="sft")
    return checked(world_sft_mixture(args, seed), "sft", "shapes world", output_dir, main_process)


__all__ = ["CachedFeatureDataArguments", "SFTScriptArguments", "checked", "mix", "sft_dataset", "world_sft_mixture"]


# ---------------------------------------------------------------------------------------------------------------
# Padding-free VLM SFT
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PaddingFreeVisionCollator:
    """A vision collator's batch flattened into one row without padding, as TRL's `padding_free` does for text:
    each sample's tokens in turn, its positions restarting at 0 (transformers then attends within each sample only:
    a block-diagonal mask from the positions, with SDPA or FlashAttention), its first token no label (the previous
    sample's last token predicts nothing). Images stay in order, so the prepend fusion's placeholders still meet
    their own images; for cross-attention fusion each token gets an explicit mask over its own sample's images.

    TRL refuses `padding_free` for vision data (its collator does not flatten pixel batches); `sft_trainer` wraps the
    trainer's collator in this one instead."""

    collator: Callable
    image_token_id: int | None = None
    cross_attention: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        mask = batch.pop("attention_mask").bool()
        rows, width = mask.shape
        starts = mask.long().cumsum(1) == 1  # each sample's first real token
        labels = batch["labels"].masked_fill(starts & mask, -100)
        flat = {"input_ids": batch["input_ids"][mask][None], "labels": labels[mask][None]}
        flat["position_ids"] = (mask.long().cumsum(1) - 1)[mask][None]
        for key, value in batch.items():
            if key in flat or key in ("cross_attention_mask",):
                continue
            if isinstance(value, torch.Tensor) and value.shape[:2] == (rows, width):
                flat[key] = value[mask][None]  # another per-token field (token_type_ids, ...)
            else:
                flat[key] = value  # pixel_values, image_features: per image, in order
        if self.cross_attention:
            placeholders = batch["input_ids"] == self.image_token_id
            per_row = placeholders.sum(1).tolist()
            seen = placeholders.long().cumsum(1)  # images of its own sample a token may see
            offsets = torch.tensor([0, *per_row[:-1]], device=mask.device).cumsum(0)
            slots = torch.arange(sum(per_row), device=mask.device)
            first = offsets[:, None, None]
            visible = (slots[None, None, :] >= first) & (slots[None, None, :] < first + seen[..., None])
            flat["cross_attention_mask"] = visible[mask].long()[None]
        return flat


def padding_free_collator(trainer, model) -> PaddingFreeVisionCollator:
    """The trainer's collator wrapped for padding-free training of the suite's `model`."""
    config = model.config
    return PaddingFreeVisionCollator(
        trainer.data_collator, image_token_id=config.image_token_id, cross_attention=config.fusion == "cross_attention"
    )
