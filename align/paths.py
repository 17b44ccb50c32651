"""Where the project's files live: the repository root, the embedded default's cache and its shipped parts."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The embedded default's pretrained parts and base VLM, shipped with the code (`align.zoo` installs them).
SHIPPED_PARTS = Path(__file__).resolve().parent / "default_parts"


def default_cache_dir() -> Path:
    """The zoo's folder: `$VLM_ALIGN_CACHE`, or `.cache/zoo` in the repository."""
    return Path(os.environ.get("VLM_ALIGN_CACHE", REPO_ROOT / ".cache" / "zoo"))


__all__ = ["REPO_ROOT", "SHIPPED_PARTS", "default_cache_dir"]
