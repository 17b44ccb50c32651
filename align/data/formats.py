"""Local datasets in common VLM formats, converted to TRL's conversational format with bad rows set aside.

Supported formats (`FORMATS`), all read from local paths only:

- `disk`: a folder written by `save_to_disk` (a `Dataset`, or a `DatasetDict` and a split name);
- `trl`: JSON/JSONL rows in TRL's conversational format (`messages`, or `prompt` with `chosen`/`rejected`
  or `completion`) plus `images`, a list of paths;
- `llava`: LLaVA-Instruct JSON, `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}]}`;
- `sharegpt`: LLaMA-Factory's ShareGPT rows, `messages` (role/content strings) or `conversations`
  (from/value) with `<image>` tags, plus `images` and an optional `system`;
- `rlaif_v`: preference rows `{"question", "chosen", "rejected", "image"}` as in RLAIF-V.

Rows come out in the internal format of the requested `kind`: `sft` (`images`, `messages`), `preference`
(`images`, `prompt`, `chosen`, `rejected`) or `prompt` (`images`, `prompt`). Images are kept as paths in a
`datasets` `Image` feature, decoded lazily; each is decoded once at load time so that a row whose image
cannot be read is rejected here rather than crashing a training step later.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import PIL.Image
from datasets import Dataset, DatasetDict, Features, Image, List

from align.world.dataset import MESSAGES_FEATURE

logger = logging.getLogger(__name__)

FORMATS = ("disk", "trl", "llava", "sharegpt", "rlaif_v")
KINDS = ("sft", "preference", "prompt")
KIND_COLUMNS = {
    "sft": ("images", "messages"),
    "preference": ("images", "prompt", "chosen", "rejected"),
    "prompt": ("images", "prompt"),
}
KIND_FEATURES = {
    kind: Features({name: List(Image()) if name == "images" else MESSAGES_FEATURE for name in columns})
    for kind, columns in KIND_COLUMNS.items()
}

# Where a run lists the rows it skipped (one JSON line each), in its output folder.
REJECTS_FILE = "rejects.jsonl"
# Reasons a row is rejected, as written to rejects.jsonl.
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
IMAGE_OUTSIDE_ROOT = "image outside root"
IMAGE_COUNT = "image count mismatch"
EMPTY_ANSWER = "empty answer"
SAME_PAIR = "chosen == rejected"
MISSING_FIELD = "missing field"
MALFORMED = "malformed row"

IMAGE_TAG = "<image>"
_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}
_ID_KEYS = ("id", "idx", "image_id")


class RowRejected(Exception):
    """A row that cannot be used, with one of the reasons above and a detail for the rejects file."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class RejectReport:
    """Rows set aside while loading one source: `rejects` holds one record per bad row."""

    source: str
    total: int = 0
    rejects: list[dict] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.total - len(self.rejects)

    @property
    def counts(self) -> dict[str, int]:
        """Number of rejected rows per reason, most frequent first."""
        return dict(Counter(r["reason"] for r in self.rejects).most_common())

    def add(self, row: int, row_id, reason: str, detail: str = "") -> None:
        self.rejects.append({"source": self.source, "row": row, "id": row_id, "reason": reason, "detail": detail})

    def summary(self) -> str:
        """E.g. "skipped 3 of 120 rows (2 missing image, 1 chosen == rejected)"."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.items())
        return f"skipped {len(self.rejects)} of {self.total} rows" + (f" ({reasons})" if reasons else "")

    def write(self, path: str | os.PathLike, append: bool = False) -> None:
        """Write the rejects as JSON lines `{"source", "row", "id", "reason", "detail"}`."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for record in self.rejects:
                f.write(json.dumps(record, default=str) + "\n")

    def log(self, rejects_path: str | os.PathLike | None = None) -> None:
        if not self.rejects:
            logger.info("%s: loaded %d rows", self.source, self.total)
            return
        logger.warning("%s: %s%s", self.source, self.summary(), f"; see {rejects_path}" if rejects_path else "")


def rejects_summary(path: str | os.PathLike) -> dict[str, int]:
    """Rows skipped per reason, read back from a `rejects.jsonl`."""
    path = Path(path)
    if not path.is_file():
        return {}
    reasons = Counter(json.loads(line)["reason"] for line in path.read_text().splitlines() if line.strip())
    return dict(reasons.most_common())


def log_rejects(path: str | os.PathLike, kept: int) -> dict[str, int]:
    """Log the end-of-run summary of skipped rows, e.g. "skipped 3 rows (2 missing image, 1 empty answer)"."""
    reasons = rejects_summary(path)
    if reasons:
        detail = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        logger.warning("skipped %d rows (%s), trained on %d; see %s", sum(reasons.values()), detail, kept, path)
    else:
        logger.info("no rows skipped; trained on %d", kept)
    return reasons


# ---------------------------------------------------------------------------------------------------
# Format detection and reading
# ---------------------------------------------------------------------------------------------------


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; supported: {list(FORMATS)}")
    return format


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; supported: {list(KINDS)}")
    return kind


def _is_disk_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


def format_of_record(record: dict) -> str:
    """The format a single row is written in, judged from its keys (and the type of its contents)."""
    if not isinstance(record, dict):
        raise ValueError(f"a row must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return "sharegpt" if "images" in record else "llava"
    if "messages" in record:
        messages = record["messages"] if isinstance(record["messages"], list) else []
        structured = any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages)
        return "trl" if structured else "sharegpt"
    if {"question", "chosen", "rejected"} <= record.keys():
        return "rlaif_v"
    if "prompt" in record:
        return "trl"
    raise ValueError(
        f"cannot tell the format from the keys {sorted(record)}; expected `conversations` (llava, sharegpt), "
        "`messages` (trl, sharegpt), `prompt` (trl) or `question`/`chosen`/`rejected` (rlaif_v)"
    )


def _read_records(path: Path) -> list:
    """Rows of a JSON list or a JSONL file; a JSONL line that is not JSON becomes a `RowRejected`."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            if path.suffix == ".json" and "Extra data" not in str(error):
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict):
                return [data]
            raise ValueError(f"{path} must hold a JSON list of rows, got {type(data).__name__}")
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            records.append(RowRejected(MALFORMED, f"not JSON: {error}"))
    return records


def _format_of_records(path: Path, records: list) -> str:
    first = next((r for r in records if not isinstance(r, RowRejected)), None)
    if first is None:
        raise ValueError(f"{path} holds no rows")
    try:
        return format_of_record(first)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def detect_format(path: str | os.PathLike) -> str:
    """The format of a local dataset: "disk" for a `save_to_disk` folder, else read from the first row.

    Raises:
        ValueError: when the path is missing, empty or in none of `FORMATS`.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset path {path} does not exist")
    if path.is_dir():
        if _is_disk_dataset(path):
            return "disk"
        raise ValueError(f"{path} is a folder but not a `save_to_disk` dataset (no dataset_dict.json or state.json)")
    return _format_of_records(path, _read_records(path))


# ---------------------------------------------------------------------------------------------------
# Rows to the canonical shape: {"images": [raw image refs], "messages": ...} or prompt/chosen/rejected
# ---------------------------------------------------------------------------------------------------


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image_item() -> dict:
    return {"type": "image", "text": None}


def _require(record: dict, *keys: str) -> None:
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise RowRejected(MISSING_FIELD, f"no {', '.join(missing)}")


def _image_refs(record: dict, keys: Iterable[str]) -> list:
    for key in keys:
        value = record.get(key)
        if value is not None:
            return list(value) if isinstance(value, list | tuple) else [value]
    return []


def _split_image_tags(text: str) -> list[dict]:
    """ "<image>\\nWhat is it?" -> [image item, text item]: each tag becomes an image item in place."""
    items = []
    for k, part in enumerate(text.split(IMAGE_TAG)):
        if k:
            items.append(_image_item())
        if part.strip():
            items.append(_text(part.strip()))
    return items


def _prepend_images(messages: list[dict], n_images: int) -> list[dict]:
    """Images with no placeholder anywhere go first in the first user turn (LLaVA's and TRL's convention)."""
    if n_images == 0 or _image_items(messages) > 0:
        return messages
    for message in messages:
        if message["role"] == "user":
            message["content"] = [_image_item() for _ in range(n_images)] + message["content"]
            break
    return messages


def _role(value) -> str:
    role = _ROLES.get(value) if isinstance(value, str) else None
    if role is None:
        raise RowRejected(MALFORMED, f"unknown role {value!r}; supported: {sorted(_ROLES)}")
    return role


def _tagged_conversation(turns, role_key: str, text_key: str, system=None) -> list[dict]:
    """String turns with `<image>` tags (LLaVA, ShareGPT) as structured messages."""
    if not isinstance(turns, list) or not turns:
        raise RowRejected(MALFORMED, "the conversation must be a non-empty list of turns")
    messages = [{"role": "system", "content": [_text(system)]}] if isinstance(system, str) and system else []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise RowRejected(MALFORMED, f"each turn needs a string {text_key!r}")
        messages.append({"role": _role(turn.get(role_key)), "content": _split_image_tags(turn[text_key])})
    return messages


def _structured_content(content) -> list[dict]:
    if isinstance(content, str):
        return [_text(content)]
    if not isinstance(content, list):
        raise RowRejected(MALFORMED, f"message content must be a string or a list, got {type(content).__name__}")
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            items.append(_image_item())
        elif kind == "text" and isinstance(item.get("text", ""), str | None):
            items.append(_text(item.get("text") or ""))
        else:
            raise RowRejected(MALFORMED, f"content items must be {{'type': 'text' | 'image'}}, got {item!r}")
    return items


def _trl_messages(value, default_role: str) -> list[dict]:
    """A TRL conversational value (or a plain string) as structured messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": [_text(value)]}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise RowRejected(MALFORMED, "messages must be a list of {'role', 'content'} objects")
    return [{"role": _role(m["role"]), "content": _structured_content(m.get("content", ""))} for m in value]


def _from_trl(record: dict) -> dict:
    images = _image_refs(record, ("images", "image"))
    if "messages" in record:
        _require(record, "messages")
        return {"images": images, "messages": _prepend_images(_trl_messages(record["messages"], "user"), len(images))}
    _require(record, "prompt")
    prompt = _prepend_images(_trl_messages(record["prompt"], "user"), len(images))
    if "chosen" in record or "rejected" in record:
        _require(record, "chosen", "rejected")
        return {
            "images": images,
            "prompt": prompt,
            "chosen": _trl_messages(record["chosen"], "assistant"),
            "rejected": _trl_messages(record["rejected"], "assistant"),
        }
    if record.get("completion") is not None:
        return {"images": images, "messages": prompt + _trl_messages(record["completion"], "assistant")}
    return {"images": images, "prompt": prompt}


def _from_llava(record: dict) -> dict:
    _require(record, "conversations")
    images = _image_refs(record, ("image", "images"))
    messages = _tagged_conversation(record["conversations"], "from", "value", record.get("system"))
    return {"images": images, "messages": _prepend_images(messages, len(images))}


def _from_sharegpt(record: dict) -> dict:
    images = _image_refs(record, ("images", "image"))
    if "conversations" in record:
        _require(record, "conversations")
        messages = _tagged_conversation(record["conversations"], "from", "value", record.get("system"))
    else:
        _require(record, "messages")
        messages = _tagged_conversation(record["messages"], "role", "content", record.get("system"))
    return {"images": images, "messages": _prepend_images(messages, len(images))}


def _from_rlaif_v(record: dict) -> dict:
    _require(record, "question", "chosen", "rejected")
    if not all(isinstance(record[k], str) for k in ("question", "chosen", "rejected")):
        raise RowRejected(MALFORMED, "question, chosen and rejected must be strings")
    images = _image_refs(record, ("image", "images", "image_path"))
    prompt = [{"role": "user", "content": _split_image_tags(record["question"])}]
    return {
        "images": images,
        "prompt": _prepend_images(prompt, len(images)),
        "chosen": [{"role": "assistant", "content": [_text(record["chosen"].strip())]}],
        "rejected": [{"role": "assistant", "content": [_text(record["rejected"].strip())]}],
    }


_CONVERTERS = {"trl": _from_trl, "llava": _from_llava, "sharegpt": _from_sharegpt, "rlaif_v": _from_rlaif_v}


def _shape(row: dict) -> str:
    if "messages" in row:
        return "sft"
    return "preference" if "chosen" in row else "prompt"


def _to_kind(row: dict, kind: str) -> dict:
    """Project a canonical row onto `kind`: preference -> sft keeps the chosen answer; sft -> prompt drops
    the final assistant turn."""
    shape = _shape(row)
    if shape == kind:
        return row
    if kind == "sft" and shape == "preference":
        return {"images": row["images"], "messages": row["prompt"] + row["chosen"]}
    if kind == "prompt" and shape == "preference":
        return {"images": row["images"], "prompt": row["prompt"]}
    if kind == "prompt" and shape == "sft":
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return {"images": row["images"], "prompt": messages[:last]}
    needs = ", ".join(c for c in KIND_COLUMNS[kind] if c != "images")
    raise RowRejected(MISSING_FIELD, f"kind={kind!r} needs {needs}; the row holds {shape} data")


# ---------------------------------------------------------------------------------------------------
# Row checks
# ---------------------------------------------------------------------------------------------------


def _content_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content.strip()
    return " ".join((item.get("text") or "").strip() for item in content or [] if item.get("type") == "text").strip()


def _image_items(messages: list[dict]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for item in m["content"]
        if item.get("type") == "image"
    )


def row_problem(row: dict, kind: str) -> tuple[str, str] | None:
    """The first text-level problem of an internal-format row as (reason, detail), or None.

    Checks the image count against the image items, empty or absent assistant answers and, for
    preference rows, chosen == rejected. Images themselves are checked by the caller.
    """
    columns = [c for c in KIND_COLUMNS[kind] if c != "images"]
    missing = [c for c in KIND_COLUMNS[kind] if row.get(c) is None]
    if missing:
        return MISSING_FIELD, f"no {', '.join(missing)}"
    n_items = sum(_image_items(row[c]) for c in columns)
    if n_items != len(row["images"]):
        return IMAGE_COUNT, f"{len(row['images'])} images but {n_items} image placeholders"
    if kind == "sft":
        answers = [_content_text(m) for m in row["messages"] if m.get("role") == "assistant"]
        if not answers:
            return EMPTY_ANSWER, "no assistant turn"
        if not all(answers):
            return EMPTY_ANSWER, f"assistant turn {answers.index('') + 1} is empty"
    elif kind == "preference":
        chosen = [_content_text(m) for m in row["chosen"]]
        rejected = [_content_text(m) for m in row["rejected"]]
        if not any(chosen) or not any(rejected):
            return EMPTY_ANSWER, "chosen is empty" if not any(chosen) else "rejected is empty"
        if chosen == rejected:
            return SAME_PAIR, chosen[-1][:200]
    if not any(m.get("role") == "user" for m in row["messages" if kind == "sft" else "prompt"]):
        return MISSING_FIELD, "no user turn"
    return None


def _decode_problem(open_image) -> str | None:
    try:
        with open_image() as image:
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"{type(error).__name__}: {error}"
    return None


def check_image(value) -> tuple[str, str] | None:
    """Whether an image value (PIL image, path, or a `datasets` {"bytes", "path"} dict) decodes."""
    if isinstance(value, PIL.Image.Image):
        return None
    if isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
        problem = _decode_problem(lambda: PIL.Image.open(io.BytesIO(data)))
        return (CORRUPT_IMAGE, problem) if problem else None
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        return MISSING_IMAGE, f"no image data in {value!r}"[:300]
    if not os.path.isfile(path):
        return MISSING_IMAGE, path
    problem = _decode_problem(lambda: PIL.Image.open(path))
    return (CORRUPT_IMAGE, f"{path}: {problem}") if problem else None


def _resolve_image(ref, root: str) -> dict:
    """A path from a data file, resolved under `root`, as a `datasets` image value."""
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return {"bytes": ref["bytes"], "path": None}
        ref = ref.get("path")
    if not isinstance(ref, str) or not ref.strip():
        raise RowRejected(MISSING_IMAGE, f"not an image path: {ref!r}"[:300])
    if "://" in ref:
        raise RowRejected(MISSING_IMAGE, f"{ref}: remote images are not fetched; download them first")
    # Lexical check, not realpath: an image folder that is a symlink placed by the user stays allowed,
    # while "../x.png" and absolute paths elsewhere are refused.
    path = os.path.abspath(os.path.join(root, ref))
    if os.path.commonpath([root, path]) != root:
        raise RowRejected(IMAGE_OUTSIDE_ROOT, f"{ref} is outside {root}")
    return {"bytes": None, "path": path}


def _row_id(record) -> str | None:
    if isinstance(record, dict):
        for key in _ID_KEYS:
            if isinstance(record.get(key), str | int):
                return record[key]
    return None


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _convert_all(records: Iterable, format: str, kind: str, root: str, report: RejectReport) -> list[dict]:
    """Convert rows one by one; a bad row is recorded in `report` and skipped."""
    rows = []
    for index, record in enumerate(records):
        report.total += 1
        try:
            if isinstance(record, RowRejected):
                raise record
            if not isinstance(record, dict):
                raise RowRejected(MALFORMED, f"a row must be an object, got {type(record).__name__}")
            row = _to_kind(_CONVERTERS[format](record), kind)
            problem = row_problem(row, kind)
            if problem:
                raise RowRejected(*problem)
            images = [_resolve_image(ref, root) for ref in row["images"]]
            for image in images:
                problem = check_image(image)
                if problem:
                    raise RowRejected(*problem)
            row["images"] = images
        except RowRejected as rejected:
            report.add(index, _row_id(record), rejected.reason, rejected.detail)
            continue
        rows.append(row)
    return rows


def _open_disk(path: Path, split: str | None) -> Dataset:
    data = datasets.load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        split = split or "train"
        if split not in data:
            raise ValueError(f"{path} has no split {split!r}; splits: {list(data)}")
        data = data[split]
    return data


def _raw_rows(dataset: Dataset, batch_size: int = 256) -> Iterable[dict]:
    """Rows as stored, images as {"bytes", "path"} dicts: a broken image becomes a bad row rather than
    an exception inside `datasets`, and nothing is decoded twice."""
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()


def load_dataset_local(
    path: str | os.PathLike,
    format: str | None = None,
    kind: str = "sft",
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    rejects_path: str | os.PathLike | None = None,
    append_rejects: bool = False,
) -> tuple[Dataset, RejectReport]:
    """Load a local dataset in one of `FORMATS` as internal-format rows of `kind`, skipping bad rows.

    Args:
        path: a JSON/JSONL file, or a folder written by `save_to_disk`.
        format: one of `FORMATS`; detected from the data when None.
        kind: "sft" (`images`, `messages`), "preference" (`images`, `prompt`, `chosen`, `rejected`) or
            "prompt" (`images`, `prompt`). Preference data can feed "sft" (the chosen answer) and "prompt";
            conversations can feed "prompt" (the final answer dropped).
        image_root: folder that image paths are relative to (default: the data file's folder, or the saved
            dataset's folder); a path that leaves it is refused like a missing file.
        split: the split of a saved `DatasetDict` (default "train"); ignored for files.
        rejects_path: where to write one JSON line per skipped row (source, row, id, reason, detail).
        append_rejects: add to the rejects file instead of replacing it (a mixture writes all its sources
            to one file).

    Returns:
        The rows as a `datasets.Dataset` with features `KIND_FEATURES[kind]`, and the `RejectReport`.

    Raises:
        ValueError: unknown format or kind, unreadable file, data of another kind, or no usable rows.
    """
    _check_kind(kind)
    path = Path(path)
    if format is not None:
        _check_format(format)
    elif not path.exists():
        raise ValueError(f"dataset path {path} does not exist")
    if format == "disk" or (format is None and path.is_dir()):
        if not _is_disk_dataset(path):
            raise ValueError(f"{path} is not a folder written by save_to_disk (no dataset_dict.json or state.json)")
        format = "disk"
        data = _open_disk(path, split)
        row_format = _format_of_records(path, list(_raw_rows(data.select(range(min(1, len(data)))))))
        records = _raw_rows(data)
        default_root = path
    else:
        if not path.is_file():
            raise ValueError(f"format={format!r} needs a JSON or JSONL file, got {path}")
        records = _read_records(path)
        row_format = format = format or _format_of_records(path, records)
        default_root = path.parent
    if kind == "preference" and row_format in ("llava", "sharegpt"):
        raise ValueError(f"{path} holds {row_format} conversations, not preference pairs; use kind='sft' or 'prompt'")
    root = os.path.abspath(image_root if image_root is not None else default_root)
    report = RejectReport(source=str(path))
    rows = _convert_all(records, row_format, kind, root, report)
    if rejects_path is not None:
        report.write(rejects_path, append=append_rejects)
    report.log(rejects_path)
    if not rows:
        if report.total == 0:
            raise ValueError(f"{path} holds no rows")
        first = report.rejects[0]
        raise ValueError(
            f"{path} ({format}): no usable rows, {report.summary()}; first: row {first['row']}, "
            f"{first['reason']} ({first['detail']})"
        )
    columns = {name: [row[name] for row in rows] for name in KIND_COLUMNS[kind]}
    return Dataset.from_dict(columns, features=KIND_FEATURES[kind]), report


def validate_rows(dataset: Dataset, kind: str, source: str = "<in-memory>") -> tuple[Dataset, RejectReport]:
    """Drop the bad rows of an internal-format `dataset` of `kind`, keeping all its columns.

    Same checks as `load_dataset_local`: image count against image items, empty assistant answers,
    chosen == rejected, and images that cannot be decoded.

    Returns:
        The clean dataset and the `RejectReport` (rows numbered as in `dataset`; ids from an `id`,
        `idx` or `image_id` column when there is one).
    """
    _check_kind(kind)
    missing = [c for c in KIND_COLUMNS[kind] if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: kind={kind!r} needs columns {list(KIND_COLUMNS[kind])}; missing {missing}")
    id_column = next((c for c in _ID_KEYS if c in dataset.column_names), None)
    view = _raw_rows(dataset.select_columns(list(KIND_COLUMNS[kind]) + ([id_column] if id_column else [])))
    report = RejectReport(source=source, total=len(dataset))
    keep = []
    for index, row in enumerate(view):
        problem = row_problem(row, kind)
        for image in row["images"] if problem is None else []:
            problem = check_image(image)
            if problem:
                break
        if problem:
            report.add(index, row.get(id_column) if id_column else None, *problem)
        else:
            keep.append(index)
    report.log()
    clean = dataset if len(keep) == len(dataset) else dataset.select(keep)
    return clean, report
