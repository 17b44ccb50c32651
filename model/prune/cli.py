"""The command line of `python -m model.prune`: its arguments, loading the teacher, and `main`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import (
    HfArgumentParser,
)

from .calibration import read_calibration_texts
from .layouts import PLAN_FILE
from .pruning import PruneTarget, load_teacher, prune_model, save_student

logger = logging.getLogger(__name__)


@dataclass
class PruneArguments:
    """Command-line arguments of `python -m model.prune`."""

    teacher: str = field(metadata={"help": "Directory of the teacher: a Llama/Qwen2 causal LM, or a VLM around one."})
    output: str = field(
        metadata={"help": "Directory the pruned student, its tokenizer/processor and prune_plan.json go to."}
    )
    calibration_file: str = field(
        metadata={"help": "Calibration documents: JSONL ({\"text\": ...} per line) or plain text, one per line."}
    )
    target_params: float | None = field(
        default=None,
        metadata={"help": "Keep about this fraction, in (0, 1], of the teacher LLM's non-embedding parameters."},
    )
    num_layers: int | None = field(default=None, metadata={"help": "Explicit: decoder layers to keep."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Explicit: MLP channels per layer."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Explicit: query heads per layer."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Explicit: KV groups per layer (their query heads go with them)."}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Explicit: hidden channels (LLM alone only)."})
    prune_hidden: bool = field(
        default=False, metadata={"help": "Let the target_params search shrink the hidden size too (LLM alone only)."}
    )
    depth_share: float | None = field(
        default=None,
        metadata={
            "help": "Unset: try every depth and keep the lowest calibration perplexity. Set: layers keep "
            "target_params**depth_share of the teacher's (0: width only, 1: depth only)."
        },
    )
    width_multiple: int = field(
        default=1, metadata={"help": "Round searched intermediate/hidden sizes down to a multiple of this."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per calibration block."})
    calibration_blocks: int = field(default=64, metadata={"help": "Calibration blocks (at most)."})
    batch_size: int = field(default=8, metadata={"help": "Calibration blocks per forward."})

    def __post_init__(self):
        target = self.target()
        if (self.target_params is None) == (not target.explicit()):
            raise ValueError(
                "give either --target_params or explicit sizes (--num_layers, --intermediate_size, ...), not both"
            )
        if self.target_params is not None and not 0 < self.target_params <= 1:
            raise ValueError(f"target_params must be a fraction in (0, 1], got {self.target_params}")
        for name, value in target.explicit().items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.depth_share is not None and not 0 <= self.depth_share <= 1:
            raise ValueError(f"depth_share must be in [0, 1], got {self.depth_share}")
        for name in ("width_multiple", "block_size", "calibration_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def target(self) -> PruneTarget:
        return PruneTarget(
            target_params=self.target_params,
            num_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_size=self.hidden_size,
            prune_hidden=self.prune_hidden,
            depth_share=self.depth_share,
            width_multiple=self.width_multiple,
        )


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(PruneArguments)


def main(args: PruneArguments) -> dict:
    """Load the teacher, prune it on the calibration file, save the student; returns the plan report."""
    model, processing = load_teacher(args.teacher)
    tokenizer = getattr(processing, "tokenizer", processing)
    texts = read_calibration_texts(args.calibration_file)
    student, report = prune_model(
        model, tokenizer, texts, args.target(), args.block_size, args.calibration_blocks, args.batch_size
    )
    report["teacher"] = args.teacher
    save_student(student, processing, report, args.output)
    logger.info("wrote the pruned %s and %s to %s", type(student).__name__, PLAN_FILE, args.output)
    return report
