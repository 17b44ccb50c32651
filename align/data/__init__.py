"""Post-training data: local datasets in common VLM formats, weighted mixtures, and the shapes world's
SFT, refusal and preference sets, all in TRL's conversational format."""

from .formats import (
    FORMATS,
    KIND_COLUMNS,
    KIND_FEATURES,
    KINDS,
    REJECTS_FILE,
    RejectReport,
    detect_format,
    load_dataset_local,
    log_rejects,
    rejects_summary,
    validate_rows,
)
from .mixture import MixtureConfig, MixtureSource, build_mixture
from .world import (
    REFUSALS,
    refusal_rows,
    world_preference_rows,
    world_sft_rows,
    wrong_answer,
    wrong_conclusion,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "KIND_COLUMNS",
    "KIND_FEATURES",
    "REFUSALS",
    "REJECTS_FILE",
    "MixtureConfig",
    "MixtureSource",
    "RejectReport",
    "build_mixture",
    "detect_format",
    "load_dataset_local",
    "log_rejects",
    "refusal_rows",
    "rejects_summary",
    "validate_rows",
    "world_preference_rows",
    "world_sft_rows",
    "wrong_answer",
    "wrong_conclusion",
]
