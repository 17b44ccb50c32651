"""`checksums.json`: the SHA-256 of every file of an export, written last, and their check."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from align.runs import SETTINGS_FILE, atomic_write_text

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
VERIFICATION_FILE = "verification.json"
# Written after the checksums (or being them): not covered by them.
_UNCHECKED = {CHECKSUMS_FILE, VERIFICATION_FILE, SETTINGS_FILE}  # the run's bookkeeping, not the export

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export_files(output_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(output_dir).as_posix()
        for p in output_dir.rglob("*")
        if p.is_file() and p.relative_to(output_dir).as_posix() not in _UNCHECKED
    )


def write_checksums(output_dir: str | os.PathLike) -> dict[str, str]:
    """Write `checksums.json`: the SHA-256 of every file of the export (relative path -> hex digest)."""
    output_dir = Path(output_dir)
    sums = {name: _sha256(output_dir / name) for name in _export_files(output_dir)}
    atomic_write_text(output_dir / CHECKSUMS_FILE, json.dumps(sums, indent=2) + "\n")
    return sums


def check_checksums(output_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Compare the export's files with `checksums.json`: `{"modified": [...], "missing": [...], "unlisted": [...]}`
    (all empty when intact)."""
    output_dir = Path(output_dir)
    path = output_dir / CHECKSUMS_FILE
    if not path.is_file():
        raise ValueError(f"{output_dir} has no {CHECKSUMS_FILE}: not an export, or an interrupted one")
    recorded = json.loads(path.read_text())
    present = set(_export_files(output_dir))
    return {
        "modified": sorted(n for n in recorded if n in present and _sha256(output_dir / n) != recorded[n]),
        "missing": sorted(n for n in recorded if n not in present),
        "unlisted": sorted(present - set(recorded)),
    }
