"""What a recipe leaves in its output folder, and how it survives being killed.

- the resolved config (`config.yaml`, re-runnable with `--config`) and `metrics.json`, written last: a step whose
  `metrics.json` exists is finished (`align.pipeline.run_step` reuses it);
- every file written whole under a temporary name and renamed into place (`atomic_write_text`, `atomic_file`,
  `staged_dir`), so a kill never leaves a half-written file for a later stage to read;
- `run_settings.json`, written when a run starts: a rerun into the same folder continues only under the same
  settings, and is refused, naming the settings that differ, otherwise (`claim_output_dir`; `--force` starts over);
- `last_complete_checkpoint`: the newest trainer checkpoint that was written whole (a kill during a save leaves a
  `checkpoint-N` without its `trainer_state.json`, which transformers' `get_last_checkpoint` would pick).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import shutil
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)
SETTINGS_FILE = "run_settings.json"
# Settings that do not change what a run computes: a rerun may change them freely.
UNCOMPARED_SETTINGS = {
    "output_dir", "logging_dir", "resume_from_checkpoint", "force", "report_to", "run_name", "logging_steps",
    "logging_first_step", "logging_strategy", "log_level", "log_level_replica", "disable_tqdm", "save_steps",
    "save_strategy", "save_total_limit", "dataloader_num_workers", "push_to_hub", "hub_model_id",
}
# Settings a resumed run may change (`--resume_from_checkpoint` given explicitly): training on for longer.
EXTENDABLE_SETTINGS = {"max_steps", "num_train_epochs"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclasses.dataclass(kw_only=True)  # keyword-only: mixed into argument classes whose first fields have no default
class RunArguments:
    """The output folder's rule: a rerun continues the run there, under the same settings only."""

    force: bool = dataclasses.field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds a run with other settings: its contents are "
                  "deleted. Without it such a rerun is refused, naming the settings that differ."},
    )

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
    atomic_write_text(path, text)


def save_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write metrics as indented JSON (numbers and strings; anything else as its string)."""
    atomic_write_text(path, json.dumps(_plain(metrics), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Whole files or nothing
# ---------------------------------------------------------------------------------------------------------------


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path` for writing; on success it is flushed to disk and renamed to `path`
    (one `os.replace`), on an error it is removed. Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    try:
        with open(partial, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole or not at all (`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(text)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, shared: bool = False):
    """Yield an empty staging folder beside `path`; on success it replaces `path` (an older `path` is removed
    first), on an error it is removed. A kill leaves `path` as it was, plus a stale staging folder that the next
    call clears.

    `shared`: for a folder that several processes may build at once, each with the same content (two stages of a
    pipeline merging the same LoRA output): each builds in a staging folder of its own (by process id), the first
    to finish renames it into place and the others discard theirs, so a reader sees `path` absent or whole."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial" if shared else f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if path.exists() and not shared:
            shutil.rmtree(path)
        try:
            staging.rename(path)  # atomic; when shared, it fails if another process has put its copy there first
        except OSError:
            if not (shared and path.is_dir()):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Reruns: same settings continue, other settings are refused
# ---------------------------------------------------------------------------------------------------------------


def settings_differences(
    before: dict, now: dict, allowed: set[str] = frozenset(), shared_only: bool = False
) -> dict[str, tuple]:
    """The settings whose values differ, as `{name: (before, now)}`, leaving out `UNCOMPARED_SETTINGS` and
    `allowed`. A setting present on one side only counts, with None on the other, unless `shared_only`."""
    ignored = UNCOMPARED_SETTINGS | set(allowed)
    names = ((set(before) & set(now)) if shared_only else (set(before) | set(now))) - ignored
    return {name: (before.get(name), now.get(name)) for name in sorted(names) if before.get(name) != now.get(name)}


def describe_differences(differences: dict[str, tuple]) -> str:
    """`settings_differences` in words: "learning_rate: 0.001 -> 0.0005; seed: 0 -> 1"."""
    return "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in differences.items())


def claim_output_dir(
    output_dir: str | os.PathLike, settings: dict, force: bool = False, allowed: set[str] = frozenset(),
    main_process: bool = True,
) -> bool:
    """Make `output_dir` this run's: record `settings` (plain values) in `run_settings.json`, after checking that
    a run already there had the same ones.

    A folder with no recorded settings, or the same ones (but for `UNCOMPARED_SETTINGS` and `allowed`), is
    continued: finished work there is reused. One with other settings is refused, naming each difference, unless
    `force`, which empties the folder first. Returns True when an earlier run's folder is continued.

    Raises:
        ValueError: the folder holds a run with other settings and `force` is off.
    """
    output_dir = Path(output_dir)
    settings = _plain(settings)
    recorded = output_dir / SETTINGS_FILE
    before = None
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except json.JSONDecodeError:  # written by atomic_write_text, so only a hand-edited file gets here
            raise ValueError(f"{recorded} is not valid JSON: fix it, or rerun with --force to start over") from None
    # Only the settings both runs have: a recorded run holds every field its code had, so a field missing there was
    # added to the code since (with a default that keeps the old behaviour), not changed by the user.
    differences = settings_differences(before, settings, allowed, shared_only=True) if before is not None else {}
    if differences and not force:
        raise ValueError(
            f"{output_dir} holds a run with other settings ({describe_differences(differences)}). Rerun with the "
            "same settings to continue it, use another output_dir, or add --force to delete it and start over"
        )
    if main_process:
        if force and output_dir.is_dir() and any(output_dir.iterdir()):
            logger.warning("--force: deleting the earlier run in %s", output_dir)
            for child in output_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recorded, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    continued = before is not None and not force
    if continued:
        logger.info("continuing the run in %s (same settings)", output_dir)
    return continued


# ---------------------------------------------------------------------------------------------------------------
# Trainer checkpoints
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether a trainer checkpoint was written whole: transformers' `Trainer._save_checkpoint` writes
    `trainer_state.json` after the weights, optimizer, scheduler and RNG states."""
    try:
        json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike, remove_incomplete: bool = False) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written whole (None if there is none). Newer ones that a
    kill cut short are skipped with a warning, and deleted with `remove_incomplete` (else the trainer's checkpoint
    rotation would count them)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    checkpoints = sorted(
        (p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)),
        key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), reverse=True,
    )
    for checkpoint in checkpoints:
        if checkpoint_is_complete(checkpoint):
            return str(checkpoint)
        logger.warning("%s was not written whole (killed during the save?): %s", checkpoint,
                       "deleting it" if remove_incomplete else "skipping it")
        if remove_incomplete:
            shutil.rmtree(checkpoint)
    return None


__all__ = [
    "EXTENDABLE_SETTINGS", "RunArguments", "SETTINGS_FILE", "UNCOMPARED_SETTINGS", "atomic_file", "atomic_write_text",
    "checkpoint_is_complete", "claim_output_dir", "describe_differences", "last_complete_checkpoint",
    "resolved_config", "save_metrics", "save_resolved_config", "settings_differences", "staged_dir",
]
