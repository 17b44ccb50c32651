"""The distillation settings (`DistillConfig`) and the recipe's script arguments."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import SFTConfig

from align.sft import SFTScriptArguments

from .losses import LOSSES, MODES

logger = logging.getLogger(__name__)


@dataclass
class DistillScriptArguments(SFTScriptArguments):
    """The teacher and the student's form, plus the SFT data (`SFTScriptArguments`: the shapes world's
    conversations and refusals by default, or a `datasets:` mixture). The student is `--model_name_or_path`."""

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher: a VLM directory, a LoRA output (merged on load) or a text LLM directory, with the "
            "student's tokenizer. Required unless alpha is 0. The student (--model_name_or_path) defaults to it."
        },
    )
    student_ternary: bool = field(
        default=False,
        metadata={
            "help": "Turn the student's LLM decoder linears into ternary BitLinear (BitNet b1.58) before training, "
            "saved as such: post-training ternarization by distillation. VLM students, without --use_peft."
        },
    )


@dataclass
class DistillConfig(SFTConfig):
    """TRL's `SFTConfig` plus the distillation settings. Off-policy runs train with it as is (`DistillTrainer`);
    on-policy runs hand its settings to TRL's `DistillationConfig` (`on_policy_config`)."""

    distillation_loss: str = field(
        default="forward_kl",
        metadata={
            "help": f"Divergence between the teacher's and the student's next-token distributions: one of {list(LOSSES)} "
            "(forward KL(teacher||student), reverse KL(student||teacher), generalized JSD with `jsd_beta`)."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "distillation_loss jsd: the teacher's weight in the mixture (0 forward KL ... 1 reverse KL)."},
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Distillation temperature: both logits are divided by it and the divergence multiplied by its "
            "square (Hinton et al.). On-policy it is also the student's sampling temperature."
        },
    )
    alpha: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the distillation loss; the cross-entropy on the labels gets 1 - alpha unless ce_weight "
            "is set. alpha 0 is plain SFT on the labels with everything else the same: the no-distillation baseline "
            "(the teacher is then not loaded)."
        },
    )
    ce_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the cross-entropy on the labels, instead of 1 - alpha."},
    )
    cache_teacher_topk: int | None = field(
        default=None,
        metadata={
            "help": "Off-policy: compute the teacher's top-K log-probs once over the data before training and train "
            "from them (the remaining mass as one tail bucket), releasing the teacher; default: the teacher runs on "
            "every batch."
        },
    )
    mode: str = field(
        default="off_policy",
        metadata={
            "help": f"One of {list(MODES)}: off_policy distills on the dataset's answers; on_policy on answers the "
            "student samples itself, scored by the teacher (TRL's DistillationTrainer; distillation loss only)."
        },
    )
    max_completion_length: int = field(
        default=64,
        metadata={"help": "on_policy: the most tokens the student samples per answer."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.distillation_loss not in LOSSES:
            raise ValueError(f"distillation_loss must be one of {list(LOSSES)}, got {self.distillation_loss!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.ce_weight is not None and self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0 or unset, got {self.ce_weight}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.cache_teacher_topk is not None:
            if self.cache_teacher_topk < 1:
                raise ValueError(f"cache_teacher_topk must be >= 1 or unset, got {self.cache_teacher_topk}")
            if self.alpha == 0:
                raise ValueError("cache_teacher_topk caches the teacher, which alpha 0 (no distillation) does not use")
            if self.mode == "on_policy":
                raise ValueError("cache_teacher_topk is off-policy only: on-policy the teacher scores fresh samples")
        if self.mode == "on_policy":
            if self.alpha != 1.0 or self.ce_weight:
                raise ValueError(
                    "on_policy trains on the student's own samples, which have no labels: set alpha 1 and no ce_weight"
                )
            if self.max_completion_length < 1:
                raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        elif self.packing or self.padding_free:
            raise ValueError("off-policy distillation needs one row per sequence: turn packing and padding_free off")
