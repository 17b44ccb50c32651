"""The on-policy trainer: TRL's `DistillationTrainer` on VLM prompts."""

from __future__ import annotations

import logging
from dataclasses import fields

from datasets import Dataset
from transformers import TrainingArguments
from trl import DistillationConfig, DistillationTrainer

from .config import DistillConfig
from .losses import divergence_beta
from .off_policy import DistillTrainer

logger = logging.getLogger(__name__)


def prompt_rows(dataset: Dataset) -> Dataset:
    """Conversations as on-policy prompts: the turns before each row's last assistant answer, which the student
    then writes itself; the row's images are kept. Rows without an assistant turn are dropped."""

    def to_prompt(row):
        assistant = [i for i, message in enumerate(row["messages"]) if message["role"] == "assistant"]
        return {"prompt": row["messages"][: assistant[-1]] if assistant else []}

    keep = [c for c in dataset.column_names if c in ("images", "image")]
    prompts = dataset.map(to_prompt, remove_columns=[c for c in dataset.column_names if c not in keep])
    return prompts.filter(lambda row: len(row["prompt"]) > 0)


def on_policy_config(args: DistillConfig) -> DistillationConfig:
    """TRL's `DistillationConfig` with every `TrainingArguments` setting of `args`, plus the divergence (`beta`),
    the temperature and the completion length."""
    shared = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
    # The deprecated alias would override `activation_checkpointing` with its own (default) value.
    shared.pop("gradient_checkpointing", None)
    return DistillationConfig(
        **shared,
        beta=divergence_beta(args.distillation_loss, args.jsd_beta),
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        shuffle_dataset=args.shuffle_dataset,
    )


def on_policy_trainer(
    model, teacher_model, args: DistillConfig, train_dataset: Dataset, processing_class, peft_config=None, callbacks=None
) -> DistillationTrainer:
    """TRL's `DistillationTrainer` (on-policy: the student samples, the teacher scores) on the prompts of
    `train_dataset` (conversations are cut before their last answer, `prompt_rows`). Text LLMs and VLMs alike:
    TRL passes the prompts' images to generation and to both models' forwards."""
    if args.mode != "on_policy":
        raise ValueError(f"on_policy_trainer needs mode on_policy, got {args.mode!r}")
    prompts = prompt_rows(train_dataset) if "messages" in train_dataset.column_names else train_dataset
    return DistillationTrainer(
        model=model,
        teacher_model=teacher_model,
        args=on_policy_config(args),
        train_dataset=prompts,
        processing_class=processing_class,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def distill_trainer(
    model, teacher_model, args: DistillConfig, train_dataset: Dataset, processing_class, peft_config=None, callbacks=None
):
    """The trainer for `args.mode`: `DistillTrainer` (off-policy) or TRL's `DistillationTrainer` (on-policy)."""
    if args.mode == "on_policy":
        return on_policy_trainer(model, teacher_model, args, train_dataset, processing_class, peft_config, callbacks)
    return DistillTrainer(
        model, teacher_model, args, train_dataset, processing_class, peft_config=peft_config, callbacks=callbacks
    )


def distillation_metrics(trainer) -> dict:
    """The logged distillation terms of a run: first, last and history of `distill_loss`, `ce_loss` and
    `teacher_agreement` (on-policy, TRL's loss is the distillation loss)."""
    keys = {"distill_loss": "distill_loss", "ce_loss": "ce_loss", "teacher_agreement": "teacher_agreement"}
    if isinstance(trainer, DistillationTrainer):
        keys = {"distill_loss": "loss"}
    summary = {}
    for name, key in keys.items():
        history = [(log["step"], log[key]) for log in trainer.state.log_history if key in log and "train_runtime" not in log]
        if history:
            summary[name] = {"first": history[0][1], "last": history[-1][1], "history": history}
    return summary
