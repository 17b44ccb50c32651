"""The off-policy trainer (TRL's `SFTTrainer` plus the teacher's divergence) and the cached teacher top-k."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset, List, Value
from torch.utils.data import DataLoader
from transformers import PreTrainedModel
from trl import SFTTrainer

from .config import DistillConfig
from .losses import IGNORE_INDEX, TOPK_COLUMNS, distillation_loss, teacher_topk

logger = logging.getLogger(__name__)


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loss is: position t predicts token t + 1, so `keep[b, t]` is True when `labels[b, t + 1]` is
    labelled. Returns `(keep [B, L] bool, targets [N])`, the next tokens of the kept positions in row-major order."""
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = next_labels != IGNORE_INDEX
    return keep, next_labels[keep]


class DistillTrainer(SFTTrainer):
    """TRL's `SFTTrainer` whose loss is `distillation_loss` against a frozen teacher (off-policy distillation).

    Overridden: `compute_loss` (the teacher's forward on the same batch, the loss), `prediction_step` (loss only),
    and `_set_signature_columns_if_needed` (keeps the cached teacher columns, which TRL's column pruning would drop).
    Both models project only the positions that are trained (transformers' boolean `logits_to_keep`), so neither
    builds `[batch, length, vocab]` logits.
    """

    def __init__(
        self,
        model,
        teacher_model: PreTrainedModel | None,
        args: DistillConfig,
        train_dataset: Dataset,
        processing_class,
        peft_config=None,
        eval_dataset: Dataset | None = None,
        callbacks: list | None = None,
    ):
        if args.alpha > 0 and teacher_model is None:
            raise ValueError("alpha > 0 distills from a teacher: pass teacher_model (or set alpha 0 for plain SFT)")
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        self.teacher_model = None
        if teacher_model is not None and args.alpha > 0:
            student_size = self.model.config.get_text_config().vocab_size
            teacher_size = teacher_model.config.get_text_config().vocab_size
            if student_size != teacher_size:
                raise ValueError(f"the student has vocab_size {student_size}, the teacher {teacher_size}: they must match")
            teacher_model.eval().requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        if args.cache_teacher_topk:
            cache_teacher_topk(self)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(c for c in TOPK_COLUMNS if c not in self._signature_columns)]

    def teacher_logits(self, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits `[N, V]` at the kept positions of the batch (no gradient, eval mode)."""
        with torch.no_grad():
            return self.teacher_model(**inputs, use_cache=False, logits_to_keep=keep).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cached = (inputs.pop(TOPK_COLUMNS[0]), inputs.pop(TOPK_COLUMNS[1])) if TOPK_COLUMNS[0] in inputs else None
        keep, targets = next_token_positions(labels)
        student_logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        teacher_logits = None
        if self.args.alpha > 0 and cached is None:
            if self.teacher_model is None:
                raise ValueError("no teacher to distill from: neither a teacher model nor cached teacher columns")
            teacher_logits = self.teacher_logits(inputs, keep)
        loss, metrics = distillation_loss(
            student_logits,
            targets,
            teacher_logits=teacher_logits,
            teacher_topk_cache=cached,
            loss=self.args.distillation_loss,
            jsd_beta=self.args.jsd_beta,
            temperature=self.args.temperature,
            alpha=self.args.alpha,
            ce_weight=self.args.ce_weight,
            num_tokens=num_items_in_batch,
        )
        # As SFTTrainer: `num_items_in_batch` counts the tokens of every process and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

@dataclass
class WithTeacherTopK:
    """A collator that builds the batch with `collator` (TRL's) and adds the rows' cached teacher top-k as `[N, k]`
    tensors, rows concatenated in batch order (the order of `next_token_positions`)."""

    collator: Callable
    k: int

    def __call__(self, examples: list[dict]) -> dict:
        ids = [torch.tensor(e[TOPK_COLUMNS[0]], dtype=torch.long).reshape(-1, self.k) for e in examples]
        logps = [torch.tensor(e[TOPK_COLUMNS[1]], dtype=torch.float32).reshape(-1, self.k) for e in examples]
        batch = self.collator([{key: v for key, v in e.items() if key not in TOPK_COLUMNS} for e in examples])
        batch[TOPK_COLUMNS[0]], batch[TOPK_COLUMNS[1]] = torch.cat(ids), torch.cat(logps)
        return batch


def teacher_topk_rows(trainer: DistillTrainer, dataset: Dataset, k: int, batch_size: int) -> tuple[list, list]:
    """The teacher's top-k (ids, log-probs at the distillation temperature) at every labelled position of every
    row of `dataset`, in row order, each row flattened to `positions * k` values.

    Built with the trainer's own collator, so the positions are those training will see. Runs on every process:
    batches are sharded over the processes and gathered back in order.
    """
    data = trainer._remove_unused_columns(dataset, description="teacher top-k")
    loader = trainer.accelerator.prepare(
        DataLoader(data, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False, num_workers=0)
    )
    all_ids, all_logps = [], []
    for batch in loader:
        labels = batch.pop("labels")
        keep, _ = next_token_positions(labels)
        ids, logps = teacher_topk(trainer.teacher_logits(batch, keep), k, trainer.args.temperature)
        counts = keep.sum(dim=1).tolist()
        rows_ids = [part.flatten().tolist() for part in ids.cpu().split(counts)]
        rows_logps = [part.flatten().tolist() for part in logps.cpu().split(counts)]
        all_ids += trainer.accelerator.gather_for_metrics(rows_ids, use_gather_object=True)
        all_logps += trainer.accelerator.gather_for_metrics(rows_logps, use_gather_object=True)
    return all_ids, all_logps


def add_teacher_topk(trainer: DistillTrainer, dataset: Dataset, k: int, batch_size: int) -> Dataset:
    """`dataset` with the `teacher_topk_ids` (int32) and `teacher_topk_logps` (float32) columns."""
    ids, logps = teacher_topk_rows(trainer, dataset, k, batch_size)
    if len(ids) != len(dataset):
        raise RuntimeError(f"computed the teacher top-k of {len(ids)} rows for {len(dataset)}")
    dataset = dataset.remove_columns([c for c in TOPK_COLUMNS if c in dataset.column_names])
    dataset = dataset.add_column(TOPK_COLUMNS[0], ids, feature=List(Value("int32")))
    return dataset.add_column(TOPK_COLUMNS[1], logps, feature=List(Value("float32")))


def cache_teacher_topk(trainer: DistillTrainer, batch_size: int | None = None) -> None:
    """Compute the teacher's top-k log-probs of the trainer's datasets once (like `align.dpo.precompute_reference`
    does for DPO's reference), make the loss read them, and release the teacher.

    Memory: `k` ids and log-probs (8 bytes each) per labelled token, in the dataset's Arrow cache, instead of a
    teacher model in accelerator memory during training.
    """
    k = trainer.args.cache_teacher_topk
    vocab = trainer.teacher_model.config.get_text_config().vocab_size
    if k > vocab:
        raise ValueError(f"cache_teacher_topk {k} exceeds the vocabulary ({vocab} tokens)")
    train_batch = batch_size or trainer.args.per_device_train_batch_size
    trainer.train_dataset = add_teacher_topk(trainer, trainer.train_dataset, k, train_batch)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {
            name: add_teacher_topk(trainer, data, k, batch_size or trainer.args.per_device_eval_batch_size)
            for name, data in trainer.eval_dataset.items()
        }
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = add_teacher_topk(
            trainer, trainer.eval_dataset, k, batch_size or trainer.args.per_device_eval_batch_size
        )
    trainer.data_collator = WithTeacherTopK(trainer.data_collator, k)
    trainer.teacher_model = None
    logger.info(
        "cached the teacher's top-%d log-probs of %d rows (temperature %g); the teacher is released",
        k, len(trainer.train_dataset), trainer.args.temperature,
    )
