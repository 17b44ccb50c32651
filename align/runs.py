"""What a recipe leaves next to its model: the resolved config (re-runnable with `--config`) and metrics.json."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path

import yaml

# Fields a saved config must not carry (secrets, or values only the running process knows).
_UNSAVED_FIELDS = {"hub_token", "local_rank"}


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return str(value)


def resolved_config(*configs) -> dict:
    """Every init field of the given config dataclasses (script args, `SFTConfig`, `ModelConfig`, ...), as plain
    values, in one flat mapping: what `TrlParser.parse_args_and_config` reads back with `--config`."""
    # Read from the fields, not `TrainingArguments.to_dict()`: that masks every `*_token` field (TRL's `pad_token`,
    # `eos_token`) as "<PAD_TOKEN>", which a rerun would then take literally.
    resolved = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if f.init and f.name not in _UNSAVED_FIELDS:
                resolved[f.name] = _plain(getattr(config, f.name))
    return resolved


def save_resolved_config(path: str | os.PathLike, *configs, header: str | None = None) -> None:
    """Write `resolved_config(*configs)` as YAML, under an optional comment header."""
    text = yaml.safe_dump(resolved_config(*configs), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def save_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write metrics as indented JSON (numbers and strings; anything else as its string)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_plain(metrics), indent=2) + "\n")


__all__ = ["resolved_config", "save_metrics", "save_resolved_config"]
