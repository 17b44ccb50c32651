"""`export`: every requested format of a source into one folder, its manifest, and its checksums last."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from align.runs import atomic_write_text

from .card import model_card
from .checksums import CHECKSUMS_FILE, VERIFICATION_FILE, write_checksums
from .formats import export_llava, export_merged, export_peft, export_peft_llm
from .source import (
    DTYPES,
    _processor,
    _read_json,
    _vlm_config,
    available_formats,
    inspect_source,
    load_merged,
    resolve_formats,
)

logger = logging.getLogger(__name__)

MANIFEST_FILE = "export.json"
_EXPORT_FOLDERS = ("peft", "peft-llm", "base-llm", "merged", "llava")

def export(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    formats: list[str] | None = None,
    dtype: str = "float32",
    base_model_name_or_path: str | None = None,
    base_load_in_4bit: bool | None = None,
    qlora_base: str = "dequantized",
    eval_metrics: str | os.PathLike | None = None,
) -> dict:
    """Export a stage output; returns the manifest also written to `output_dir/export.json`.

    Args:
        path: the stage output (a VLM folder or a LoRA/QLoRA adapter folder).
        output_dir: where the formats go (one subfolder each, plus README.md, export.json, checksums.json).
        formats: some of `FORMATS` (default: all that apply; asking for one that does not apply is an error naming
            those that do). "peft" also writes `peft-llm/` + `base-llm/` when the adapter touches only the LLM.
        dtype: dtype of the merged and LLaVA weights ("float32", "bfloat16", "float16").
        base_model_name_or_path, base_load_in_4bit: see `inspect_source`.
        qlora_base: "dequantized" or "original", see `load_merged`.
        eval_metrics: an evaluation's metrics.json (default: `<path>/eval/metrics.json` when present).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    source = inspect_source(path, base_model_name_or_path, base_load_in_4bit)
    config = _vlm_config(source.model_dir)
    available = available_formats(source, config)
    chosen = resolve_formats(formats, available)
    # Asked-for formats that do not apply were refused above; by default, say which ones were left out and why.
    skipped = {name: reason for name, reason in available.items() if reason is not None and formats is None}
    if "peft" in chosen and available["peft-llm"] is not None:
        skipped["peft-llm"] = available["peft-llm"]
    for name, reason in skipped.items():
        logger.info("no %s export: %s", name, reason)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # A previous export into the same folder must not leave formats this one does not list; its checksums go
    # first, so that a kill from here on leaves a folder that reads as unfinished.
    for stale in (CHECKSUMS_FILE, VERIFICATION_FILE, MANIFEST_FILE, "README.md"):
        (output_dir / stale).unlink(missing_ok=True)
    for stale in _EXPORT_FOLDERS:
        shutil.rmtree(output_dir / stale, ignore_errors=True)
    processor = _processor(source)
    written: dict[str, str] = {}
    manifest = {
        "source": str(source.path.resolve()),
        "base": str(source.base) if source.base else None,
        "quantization": source.quantization,
        "dtype": dtype,
        "qlora_base": qlora_base if source.quantization else None,
        "formats": {},
    }
    if "peft" in chosen:
        export_peft(source, processor, output_dir)
        written["peft"] = "peft"
        manifest["formats"]["peft"] = {"kind": "peft-vlm", "path": "peft", "base": str(source.base)}
        if available["peft-llm"] is None:
            export_peft_llm(source, processor, output_dir)
            written["peft-llm"] = "peft-llm"
            manifest["formats"]["peft-llm"] = {"kind": "peft-llm", "path": "peft-llm", "base": "base-llm"}
        logger.info("wrote the PEFT adapter%s", " and its bare-LLM copy" if "peft-llm" in written else "")
    if "merged" in chosen or "llava" in chosen:
        vlm = load_merged(source, qlora_base)
        if "llava" in chosen:
            export_llava(vlm, processor, output_dir, dtype)
            written["llava"] = "llava"
            manifest["formats"]["llava"] = {"kind": "llava", "path": "llava"}
            logger.info("wrote the native LLaVA checkpoint (%s)", dtype)
        if "merged" in chosen:
            export_merged(vlm, processor, output_dir, dtype)
            written["merged"] = "merged"
            manifest["formats"]["merged"] = {"kind": "vlm", "path": "merged"}
            logger.info("wrote the merged model (%s)", dtype)
        del vlm
    manifest["skipped"] = skipped
    if "card" in chosen:
        metrics_path = Path(eval_metrics) if eval_metrics else source.path / "eval" / "metrics.json"
        if eval_metrics and not metrics_path.is_file():
            raise ValueError(f"--eval_metrics {metrics_path} does not exist")
        card = model_card(source, config, written, skipped, _read_json(metrics_path) or None, dtype)
        atomic_write_text(output_dir / "README.md", card)
        written["card"] = "README.md"
    manifest["written"] = written
    atomic_write_text(output_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    write_checksums(output_dir)  # last: an export without its checksums.json was cut short (a rerun redoes it)
    logger.info("exported %s to %s (%s)", ", ".join(written), output_dir, CHECKSUMS_FILE)
    return manifest
