"""DPO on vision preference pairs: the data (the world's verified-vs-wrong answers, or a mixture of local
preference sets) and TRL's `DPOTrainer` with reference log-probs precomputed once for vision data.

TRL refuses `precompute_ref_log_probs=True` for vision datasets: its vision collator turns images into pixels on
the fly, so TRL never runs a whole pass over them, and its vision column list would drop the precomputed columns.
For a small LoRA run that is the wrong trade: the reference forward (adapters disabled, or a separate model) costs
as much as the policy's forward at every step, for values that never change. `dpo_trainer` builds the trainer with
the flag off, runs one reference pass over the data with TRL's own collator and `compute_ref_log_probs`, adds the
`ref_chosen_logps`/`ref_rejected_logps` columns TRL's loss reads, and switches the trainer to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset, Value
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from align.data import build_mixture, world_preference_rows
from align.sft import WorldDataArguments, checked
from align.towers import TowerMemo, vlm_models

logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class DPOScriptArguments(WorldDataArguments):
    """Data and reference model of the DPO recipe."""

    pairs_per_image: int = field(
        default=2,
        metadata={"help": "Default data: preference pairs drawn per world image (questions of different categories)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model (a VLM directory). Default: with --use_peft, the policy with its adapters "
            "disabled; without, a frozen copy of --model_name_or_path."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.pairs_per_image < 1:
            raise ValueError(f"pairs_per_image must be >= 1, got {self.pairs_per_image}")


def preference_dataset(args: DPOScriptArguments, output_dir: str, seed: int, main_process: bool = True) -> Dataset:
    """Preference rows (`images`, `prompt`, `chosen`, `rejected`, ...), bad rows skipped and listed in
    `output_dir/rejects.jsonl` (written by the main process only).

    By default, pairs from the shapes world (`world_preference_rows`): chosen is the verified answer, rejected a
    plausible wrong answer of the same category.

    Raises:
        ValueError: when the data is missing, empty, or has no usable row.
    """
    if args.datasets:
        return build_mixture(args, rejects_dir=output_dir if main_process else None, kind="preference")
    world = args.load_world_split()
    pairs = world_preference_rows(world, seed=seed, per_image=args.pairs_per_image)
    return checked(pairs, "preference", "shapes world preference pairs", output_dir, main_process)


# ---------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs for vision data
# ---------------------------------------------------------------------------------------------------------------


class VisionDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer`, keeping the precomputed reference columns of a vision dataset, and encoding each pair's
    image once (`align.towers.TowerMemo`; TRL's collator hands it over twice, for chosen and rejected).

    `_set_signature_columns_if_needed` is overridden: for vision data TRL keeps just the raw columns its
    collator reads (`prompt`, `chosen`, `rejected`, `images`, ...) and drops the rest before batching, which would
    drop `ref_chosen_logps`/`ref_rejected_logps` too.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TRL's vision collator repeats each pair's images for chosen and rejected: encode each copy once.
        self.tower_memos = [TowerMemo(vlm, keep=False) for vlm in vlm_models(self.model, self.ref_model)]

    @property
    def images_encoded(self) -> int:
        return sum(memo.images_encoded for memo in self.tower_memos)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._is_vision_dataset:
            self._signature_columns = [*self._signature_columns, *(c for c in REF_COLUMNS if c not in self._signature_columns)]


@dataclass
class WithReferenceLogps:
    """A collator that builds the batch with `collator` (TRL's vision preference collator) and adds the rows'
    precomputed reference log-probs as `[batch]` tensors, as TRL's text collator does."""

    collator: Callable

    def __call__(self, examples: list[dict]) -> dict:
        references = {c: torch.tensor([e[c] for e in examples], dtype=torch.float32) for c in REF_COLUMNS if c in examples[0]}
        batch = self.collator([{k: v for k, v in e.items() if k not in REF_COLUMNS} for e in examples])
        batch.update(references)
        return batch


def reference_logps(trainer: DPOTrainer, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair of `dataset`, in row order, with the trainer's collator and reference
    (`compute_ref_log_probs`: the separate reference model, or the policy with its adapters disabled).

    Runs on every process: batches are sharded over the processes and gathered back in order.
    """
    loader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False, num_workers=0)
    )
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for batch in loader:
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
            ref_chosen, ref_rejected = trainer.accelerator.gather_for_metrics((ref_chosen, ref_rejected))
            chosen.append(ref_chosen.float().cpu())
            rejected.append(ref_rejected.float().cpu())
    finally:
        model.train(training)
    return torch.cat(chosen), torch.cat(rejected)


def add_reference_logps(trainer: DPOTrainer, dataset: Dataset, batch_size: int) -> Dataset:
    """`dataset` with `ref_chosen_logps` and `ref_rejected_logps` columns (float32, one value per row)."""
    chosen, rejected = reference_logps(trainer, dataset, batch_size)
    if len(chosen) != len(dataset):
        raise RuntimeError(f"computed {len(chosen)} reference log-probs for {len(dataset)} rows")
    dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist(), feature=Value("float32"))
    return dataset.add_column(REF_COLUMNS[1], rejected.tolist(), feature=Value("float32"))


def precompute_reference(trainer: DPOTrainer, batch_size: int | None = None) -> None:
    """Precompute the reference log-probs of the trainer's datasets once and make its loss read them.

    Afterwards the trainer runs no reference forward during training or evaluation, and a separate reference
    model is released.
    """
    args = trainer.args
    train_batch = batch_size or args.precompute_ref_batch_size or args.per_device_train_batch_size
    eval_batch = batch_size or args.precompute_ref_batch_size or args.per_device_eval_batch_size
    trainer.train_dataset = add_reference_logps(trainer, trainer.train_dataset, train_batch)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {k: add_reference_logps(trainer, v, eval_batch) for k, v in trainer.eval_dataset.items()}
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = add_reference_logps(trainer, trainer.eval_dataset, eval_batch)
    trainer.data_collator = WithReferenceLogps(trainer.data_collator)
    trainer.precompute_ref_logps = True
    trainer.ref_model = None
    logger.info("precomputed the reference log-probs of %d preference pairs", len(trainer.train_dataset))


def dpo_trainer(
    model,
    args: DPOConfig,
    train_dataset: Dataset,
    processing_class,
    ref_model=None,
    peft_config=None,
    eval_dataset: Dataset | None = None,
    callbacks: list | None = None,
) -> VisionDPOTrainer:
    """TRL's DPO trainer on a VLM; with `args.precompute_ref_log_probs` on vision data, the reference log-probs are
    computed once up front (`precompute_reference`) instead of TRL refusing the flag.

    Args:
        model: the policy (a bare VLM; wrapped by the trainer when `peft_config` is given).
        args: the `DPOConfig`.
        train_dataset: preference rows (`images`, `prompt`, `chosen`, `rejected`).
        processing_class: the VLM's processor.
        ref_model: an explicit reference model; None for the adapter-disabled policy (PEFT) or TRL's default.
        peft_config: the LoRA config, or None for full fine-tuning.
        eval_dataset: optional preference rows to evaluate on.
        callbacks: extra `TrainerCallback`s.

    Returns:
        The `VisionDPOTrainer`, ready to `train()`.
    """
    vision = "images" in train_dataset.column_names or "image" in train_dataset.column_names
    precompute = bool(args.precompute_ref_log_probs and vision)
    if precompute:
        args.precompute_ref_log_probs = False  # TRL's own check refuses it for vision data; done below instead
    try:
        trainer = VisionDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    finally:
        args.precompute_ref_log_probs = args.precompute_ref_log_probs or precompute
    if precompute:
        precompute_reference(trainer)
    return trainer


__all__ = [
    "REF_COLUMNS",
    "DPOScriptArguments",
    "VisionDPOTrainer",
    "WithReferenceLogps",
    "add_reference_logps",
    "dpo_trainer",
    "precompute_reference",
    "preference_dataset",
    "reference_logps",
]
