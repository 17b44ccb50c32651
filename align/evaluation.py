"""Evaluation of a VLM on the shapes world: batched greedy answers, per-category accuracy with standard errors,
a text-only regression check against the base LLM, and Markdown tables (one run, or a scoreboard of stages).

Answers are scored by the world's verifier through the `shapes_qa` evaluate module (`align.metrics`), so "two",
"2" and "There are two circles." all count for a count of 2. The answer source is pluggable: `evaluate_qa` takes
an `answer_fn`, and `score_answers(records, predictions)` scores answers from anywhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset

from align.families import FAMILIES, family_of, known_family
from align.loading import is_adapter_dir
from align.metrics import load_metric
from align.sampling import generate_groups, generate_sharing_images, without_peft
from align.world import CATEGORIES, prompt_rows, spatial_pair, verify
from align.world.verify import conclusion_follows, normalize, reason_holds, stated_reason
from model.chat_template import end_of_turn_token
from model.pretrain import encode_documents

logger = logging.getLogger(__name__)

QUESTION_COLUMNS = ("images", "prompt", "answer", "category", "record")

# ---------------------------------------------------------------------------------------------------------------
# Held-out questions
# ---------------------------------------------------------------------------------------------------------------


def question_rows(split_dataset: Dataset, n: int | None = None, categories: Sequence[str] | None = None) -> Dataset:
    """The questions of a held-out split, one row per question (`images`, `prompt`, `answer`, `category`,
    `record`, ...), the first `n` of them when `n` is set.

    Args:
        split_dataset: a world split (`questions` column, expanded with `align.world.prompt_rows`) or prompt rows
            that already carry a `record` column (JSON question records).
        n: keep the first `n` questions (all when None or larger than the split).
        categories: keep only the questions of these categories (before the first `n` are taken).
    """
    if "record" not in split_dataset.column_names:
        if "questions" not in split_dataset.column_names:
            raise ValueError(
                "expected a shapes-world split (with a `questions` column) or prompt rows with a `record` column "
                f"(JSON question records to verify answers against); got columns {split_dataset.column_names}"
            )
        split_dataset = prompt_rows(split_dataset)
    missing = [c for c in ("images", "prompt") if c not in split_dataset.column_names]
    if missing:
        raise ValueError(f"the questions lack the columns {missing}; got {split_dataset.column_names}")
    if categories:
        if "category" not in split_dataset.column_names:
            raise ValueError(f"categories {list(categories)} given, but the questions have no `category` column")
        present = set(split_dataset["category"])
        if not present & set(categories):
            raise ValueError(f"no questions of the categories {list(categories)}; the questions have {sorted(present)}")
        wanted = set(categories)
        split_dataset = split_dataset.filter(lambda category: category in wanted, input_columns="category")
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if n < len(split_dataset):
            split_dataset = split_dataset.select(range(n))
    if len(split_dataset) == 0:
        raise ValueError("no questions to evaluate")
    return split_dataset


def _record_json(record) -> str:
    return record if isinstance(record, str) else json.dumps(record)


def load_eval_questions(
    path: str | os.PathLike, split: str = "test", n: int | None = None, categories: Sequence[str] | None = None
) -> Dataset:
    """Held-out questions from disk, as `question_rows`.

    Args:
        path: a shapes world written by `build_world` (a `DatasetDict`; `split` is taken), a folder written by
            `save_to_disk` holding prompt rows with a `record` column, or a TRL-format JSON/JSONL file of prompt
            rows (`images` paths, `prompt`) each with a `record` (question record, object or JSON string). Rows
            with unreadable images or mismatched image counts are skipped by `align.data`'s checks.
        split: the split of a `DatasetDict`.
        n: keep the first `n` questions.
        categories: keep only the questions of these categories (`question_rows`).
    """
    from align.data import load_dataset_local, validate_rows
    from align.data.world import open_world

    path = Path(path)
    if path.is_dir():
        data = open_world(path, split)
        if "record" in data.column_names:
            data, _ = validate_rows(data, "prompt", source=str(path))
        return question_rows(data, n, categories)
    if not path.is_file():
        raise ValueError(f"evaluation data {path} does not exist")
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()] if path.suffix == ".jsonl" else json.load(f)
    if not isinstance(raw, list) or not all(isinstance(row, dict) and "record" in row for row in raw):
        raise ValueError(f"{path}: every row needs a `record` (the question record its answer is verified against)")
    rows, report = load_dataset_local(path, format="trl", kind="prompt")
    rejected = {r["row"] for r in report.rejects}
    records = [_record_json(row["record"]) for index, row in enumerate(raw) if index not in rejected]
    parsed = [json.loads(r) for r in records]
    rows = rows.add_column("record", records)
    rows = rows.add_column("answer", [str(r["answer"]) for r in parsed])
    rows = rows.add_column("category", [r["category"] for r in parsed])
    return question_rows(rows, n, categories)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def stop_token_ids(model, processor) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids, the tokenizer's eos and end-of-turn tokens,
    and the model family's own (`align.families`: `<end_of_turn>`, `<end_of_utterance>`, `<|im_end|>`, ...). Also
    for a text-only LM (`align.augment`'s Q&A generator), whose family the registry does not know."""
    tokenizer = _tokenizer(processor)
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None) if config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    vocabulary = tokenizer.get_vocab()
    family = known_family(model)
    for token in (tokenizer.eos_token, end_of_turn_token(tokenizer), *(family.stop_tokens if family else ())):
        token_id = vocabulary.get(token) if token is not None else None
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def decode_completions(tokenizer, completion_ids: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> list[str]:
    """Answer texts from generated token ids (prompt already removed): each is cut at its first stop token
    (end of turn / eos; what follows is padding), decoded without special tokens and stripped."""
    stop = set(stop_ids)
    texts = []
    for ids in completion_ids:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        end = next((i for i, token in enumerate(ids) if token in stop), len(ids))
        texts.append(tokenizer.decode(ids[:end], skip_special_tokens=True).strip())
    return texts


def _rows_at(rows, column: str, indices: list[int]) -> list:
    if isinstance(rows, Dataset):
        return rows.select_columns([column])[indices][column]
    return [rows[i][column] for i in indices]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_answers(
    model, processor, prompt_rows, batch_size: int = 16, max_new_tokens: int = 32, log_every: int = 10,
    share_images: bool = False,
) -> list[str]:
    """Greedy answers to conversational prompts with images, in the rows' order.

    Prompts are rendered with the processor's chat template (generation prompt added), left-padded and decoded
    in batches with the KV cache; rows are batched by prompt length so that little padding is decoded. Works for
    prepend and cross-attention VLMs and for PEFT-wrapped models (anything with `generate`).

    Args:
        model: the VLM (or a `PeftModel` around it).
        processor: its `VLMProcessor`.
        prompt_rows: a `Dataset` or a list of dicts with `images` (list of images) and `prompt` (messages).
        batch_size: prompts per `generate` call.
        max_new_tokens: answer length limit.
        log_every: log progress every this many batches.
        share_images: batch the questions of one image together (rows with the same `image_id`) and encode and
            prefill the image and the prompt up to it once per image (`align.sampling.generate_sharing_images`):
            the suite's prepend VLMs only, the ordinary way otherwise. Batches then follow the images, not the
            prompts' lengths.

    Returns:
        One answer text per row, without the prompt and without the end-of-turn token.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    tokenizer = _tokenizer(processor)
    prompts = list(prompt_rows["prompt"]) if isinstance(prompt_rows, Dataset) else [r["prompt"] for r in prompt_rows]
    texts = [processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    image_ids = _shared_image_ids(model, prompt_rows) if share_images else None
    if image_ids is not None:
        # The questions of one image side by side (in the order the images first appear), so a batch holds few images.
        first_seen = {}
        for i, image_id in enumerate(image_ids):
            first_seen.setdefault(image_id, i)
        order = sorted(range(len(texts)), key=lambda i: first_seen[image_ids[i]])
    else:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    stop_ids = stop_token_ids(model, processor)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    answers: list[str | None] = [None] * len(texts)
    start, batches = time.perf_counter(), math.ceil(len(texts) / batch_size)
    for number, first in enumerate(range(0, len(order), batch_size), start=1):
        indices = order[first : first + batch_size]
        images = [list(item) if isinstance(item, (list, tuple)) else [item] for item in _rows_at(prompt_rows, "images", indices)]
        inputs = processor(
            images=images, text=[texts[i] for i in indices], padding=True, padding_side="left", return_tensors="pt"
        ).to(device)
        settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "use_cache": True,
                    "eos_token_id": stop_ids, "pad_token_id": tokenizer.pad_token_id}
        if image_ids is not None and all(len(row_images) == 1 for row_images in images):
            groups = torch.tensor([first_seen[image_ids[i]] for i in indices])
            completions = generate_sharing_images(model, dict(inputs), groups, **settings).cpu()
        else:
            output = model.generate(**inputs, **settings)
            completions = output[:, inputs["input_ids"].shape[1] :].cpu()
        for index, text in zip(indices, decode_completions(tokenizer, completions, stop_ids)):
            answers[index] = text
        if log_every and (number % log_every == 0 or number == batches):
            seconds = time.perf_counter() - start
            done = min(first + batch_size, len(order))
            logger.info("answered %d/%d questions (%.1f per second)", done, len(order), done / max(seconds, 1e-9))
    model.train(was_training)
    return answers


def _shared_image_ids(model, prompt_rows) -> list | None:
    """Each row's `image_id` when `generate_answers` can share its image's prefill (a suite VLM with prepend fusion,
    rows with an `image_id`); else None (the ordinary way), logged. A batch whose rows do not hold one image each
    takes the ordinary way on its own (its images are only read batch by batch)."""
    columns = prompt_rows.column_names if isinstance(prompt_rows, Dataset) else list(prompt_rows[0]) if prompt_rows else []
    if family_of(model) is not FAMILIES["vlm"] or without_peft(model).config.fusion != "prepend" or "image_id" not in columns:
        logger.info("share_images: needs the suite's prepend VLM and rows with an image_id; answering the ordinary way")
        return None
    return list(prompt_rows["image_id"]) if isinstance(prompt_rows, Dataset) else [r["image_id"] for r in prompt_rows]


def _images_of(row: dict) -> list:
    images = row["images"]
    return list(images) if isinstance(images, (list, tuple)) else [images]


@torch.no_grad()
def sample_batch(
    model, processor, rows: Sequence[dict], num_samples: int, temperature: float = 1.0, top_p: float = 1.0,
    max_new_tokens: int = 32, seed: int | None = None,
) -> list[list[str]]:
    """`num_samples` sampled answers to each prompt row (`images`, `prompt` messages), one list per row.

    Best-of-N decoding with a shared prefill (`align.sampling.generate_groups`): the rows' images are encoded once
    and each prompt is prefilled once; its answers are decoded together from copies of that KV cache, left-padded.
    With `seed`, the batch's draws are reproducible on their own.
    """
    tokenizer = _tokenizer(processor)
    texts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    images = [_images_of(r) for r in rows]
    inputs = processor(
        images=images if any(images) else None, text=texts, padding=True, padding_side="left", return_tensors="pt"
    ).to(_model_device(model))
    if seed is not None:
        torch.manual_seed(seed)
    stop_ids = stop_token_ids(model, processor)
    was_training = model.training
    model.eval()
    try:
        output = generate_groups(
            model, inputs, num_samples, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        model.train(was_training)
    answers = decode_completions(tokenizer, output[:, inputs["input_ids"].shape[1] :].cpu(), stop_ids)
    return [answers[i * num_samples : (i + 1) * num_samples] for i in range(len(rows))]


def sample_answers(
    model, processor, prompt_rows, num_samples: int, temperature: float = 1.0, top_p: float = 1.0,
    max_new_tokens: int = 32, batch_size: int = 16, seed: int = 0,
) -> list[list[str]]:
    """`num_samples` sampled answers per row of `prompt_rows` (as `generate_answers` takes them), in the rows'
    order: `sample_batch` over batches of `batch_size` prompts, each seeded with `seed` plus its first row's index."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    rows = list(prompt_rows.select_columns(["images", "prompt"])) if isinstance(prompt_rows, Dataset) else list(prompt_rows)
    samples = []
    for first in range(0, len(rows), batch_size):
        samples += sample_batch(
            model, processor, rows[first : first + batch_size], num_samples, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, seed=seed + first,
        )
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `c` correct of `n` samples (Chen et al. 2021, arXiv:2107.03374): 1 - C(n-c, k)/C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(samples: Sequence[str]) -> str:
    """The most frequent answer among `samples`, compared as normalized word tokens (ties: the first seen), for
    majority voting (self-consistency, Wang et al. 2022, arXiv:2203.11171)."""
    keys = [" ".join(normalize(text)) for text in samples]
    winner = Counter(keys).most_common(1)[0][0] if keys else None
    return samples[keys.index(winner)] if keys else ""


def sampled_metrics(records: Sequence, samples: Sequence[Sequence[str]]) -> dict:
    """Figures of N sampled answers per question: `pass@k` (unbiased, for k = 1, 2, 4, ... and N: the chance that
    one of k samples is right; pass@1 is the mean sampled accuracy) and `maj@N` (the majority answer right),
    overall and per category (`pass@k_<c>`, `maj@N_<c>`), with `num_samples`."""
    if len(records) != len(samples) or not records:
        raise ValueError(f"{len(samples)} sample lists for {len(records)} question records")
    n = len(samples[0])
    if n < 1 or any(len(group) != n for group in samples):
        raise ValueError("every question needs the same number (>= 1) of samples")
    records = [json.loads(r) if isinstance(r, str) else r for r in records]
    correct = [sum(bool(verify(record, text)) for text in group) for record, group in zip(records, samples)]
    majority = [bool(verify(record, majority_answer(group))) for record, group in zip(records, samples)]
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    result = {"num_samples": n}
    groups = {"": list(range(len(records)))}
    for index, record in enumerate(records):
        groups.setdefault(f"_{record['category']}", []).append(index)
    for suffix, indices in groups.items():
        for k in ks:
            result[f"pass@{k}{suffix}"] = sum(pass_at_k(n, correct[i], k) for i in indices) / len(indices)
        result[f"maj@{n}{suffix}"] = sum(majority[i] for i in indices) / len(indices)
    return result




def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy `p` measured on `n` questions: sqrt(p(1-p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def categories_of(metrics: dict) -> list[str]:
    """Categories with results in `metrics`: the world's, in their order, then any others."""
    present = [key.removeprefix("total_") for key in metrics if key.startswith("total_")]
    return [c for c in CATEGORIES if c in present] + sorted(set(present) - set(CATEGORIES))


def score_answers(records: Sequence, predictions: Sequence[str]) -> dict:
    """Accuracy of `predictions` against question `records` (dicts or JSON strings), via `shapes_qa`.

    Returns:
        `accuracy`, `correct`, `total`, `stderr` overall and `accuracy_<c>`, `correct_<c>`, `total_<c>` (held-out
        questions of the category), `stderr_<c>` for each category present; stderr = sqrt(p(1-p)/n).
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} question records")
    if not records:
        raise ValueError("no answers to score")
    metric = load_metric("shapes_qa")
    result = metric.compute(predictions=list(predictions), references=[_record_json(r) for r in records])
    result["stderr"] = standard_error(result["accuracy"], result["total"])
    for category in categories_of(result):
        result[f"stderr_{category}"] = standard_error(result[f"accuracy_{category}"], result[f"total_{category}"])
    return result


PREDICTIONS = "predictions.jsonl"  # what recipes/evaluate.py writes next to metrics.json, one row per question


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The rows of an evaluation's `predictions.jsonl` (`prediction_rows`); a bad line is an error naming it."""
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                rows.append({**row, "correct": bool(row["correct"]), "key": (row.get("image_id"), row["question"])})
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: not a prediction row ({error})") from error
    return rows


def paired_difference(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """Accuracy of `a` minus accuracy of `b` on the same questions (prediction rows, matched by image and
    question), with the standard error of the paired difference.

    Two models scored on one question set are correlated: most questions both get right or both get wrong, so the
    difference is far more certain than the two rows' own standard errors suggest, and this is the figure to
    compare. With d_i = a_i - b_i in {-1, 0, 1} per question, se = sqrt((mean(d²) - mean(d)²) / n).

    Returns:
        `questions`, `difference`, `stderr`, `a_only` (questions only `a` gets right), `b_only`, and per category
        `difference_<c>`, `stderr_<c>`, `questions_<c>`.
    """
    for name, rows in (("first", a), ("second", b)):
        repeated = [key for key, n in Counter(row["key"] for row in rows).items() if n > 1]
        if repeated:
            raise ValueError(f"the {name} evaluation holds question {repeated[0]} more than once: cannot pair it")
    by_key = {row["key"]: row for row in b}
    pairs = [(row, by_key[row["key"]]) for row in a if row["key"] in by_key]
    if len(pairs) != len(a) or len(pairs) != len(b):
        raise ValueError(f"the two evaluations are not on the same questions ({len(a)} and {len(b)}, {len(pairs)} shared)")

    def compare(group: list[tuple[dict, dict]]) -> tuple[float, float, int, int]:
        a_only = sum(x["correct"] and not y["correct"] for x, y in group)
        b_only = sum(y["correct"] and not x["correct"] for x, y in group)
        n = len(group)
        mean = (a_only - b_only) / n
        return mean, math.sqrt(max((a_only + b_only) / n - mean**2, 0.0) / n), a_only, b_only

    difference, stderr, a_only, b_only = compare(pairs)
    result = {"questions": len(pairs), "difference": difference, "stderr": stderr, "a_only": a_only, "b_only": b_only}
    for category in dict.fromkeys(x["category"] for x, _ in pairs):
        group = [(x, y) for x, y in pairs if x["category"] == category]
        result[f"difference_{category}"], result[f"stderr_{category}"], _, _ = compare(group)
        result[f"questions_{category}"] = len(group)
    return result


def prediction_rows(questions: Dataset, predictions: Sequence[str]) -> list[dict]:
    """One record per question for `predictions.jsonl`: question, answer, prediction, correct, category, answer_type
    (the question's form, `align.world.ANSWER_TYPES`), relation (a spatial question's, else None), image_id."""
    rows = []
    image_ids = questions["image_id"] if "image_id" in questions.column_names else [None] * len(questions)
    for record, prediction, image_id in zip(questions["record"], predictions, image_ids):
        record = json.loads(record) if isinstance(record, str) else record
        rows.append({
            "question": record["question"], "answer": str(record["answer"]), "prediction": prediction,
            "correct": bool(verify(record, prediction)), "category": record["category"],
            "answer_type": record.get("answer_type"), "relation": record.get("relation"), "image_id": image_id,
        })
    return rows


def form_table(evaluations: dict[str, Sequence[dict]]) -> str:
    """Accuracy per question form within each category asked in more than one form (spatial: "yes_no", "Is A left of
    B?", and "choice", "Which is further left, A or B?"), one row per named evaluation, as a Markdown table.
    Each cell is `accuracy (questions)`. Raises ValueError naming an evaluation whose rows carry no `answer_type`
    (written before prediction rows had it: evaluate again)."""
    forms: dict[str, set] = {}
    for name, rows in evaluations.items():
        for row in rows:
            if row.get("answer_type") is None:
                raise ValueError(f"{name}: prediction rows without `answer_type` (written before evaluation recorded "
                                 "it, or of records that name no form): no forms to split by; evaluate again")
            forms.setdefault(row["category"], set()).add(row["answer_type"])
    columns = [(category, form) for category in sorted(forms) if len(forms[category]) > 1 for form in sorted(forms[category])]
    lines = ["| evaluation | " + " | ".join(f"{category}: {form}" for category, form in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, rows in evaluations.items():
        cells = []
        for category, form in columns:
            picked = [row["correct"] for row in rows if row["category"] == category and row["answer_type"] == form]
            cells.append(f"{100 * sum(picked) / len(picked):.1f}% ({len(picked)})" if picked else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reasoned_record(row: dict) -> dict | None:
    """The question record a yes/no spatial prediction row was asked from, as far as reasons need it."""
    if row.get("category") != "spatial" or row.get("answer_type") != "yes_no":
        return None
    if row.get("relation") is None:
        raise ValueError("a yes/no spatial prediction row without `relation` (written before evaluation recorded it): "
                         "evaluate again")
    return {key: row[key] for key in ("question", "answer", "category", "answer_type", "relation")}


def reasons_table(evaluations: dict[str, Sequence[dict]]) -> str:
    """How the yes/no spatial answers that state their reason first ("The red circle is further left, so yes.",
    `align.world.reasoned_answer`) go wrong, one row per named evaluation, as a Markdown table: how many state a
    reason, how often the reason is true (`reason_holds`), how often the yes/no follows from it, true or false
    (`conclusion_follows`), that split by whether the question's two objects are of one shape ("the red square ...
    the orange square": the names differ only in color or size) or of two, and how many answers are right with a
    false reason. Percentages of the reasoned answers (of the split, for the split columns)."""
    lines = [
        "| evaluation | yes/no spatial | reasoned | reason true | yes/no follows the reason | follows: one shape "
        "| follows: two shapes | right, reason false |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def percent(hits: int, total: int) -> str:
        return f"{100 * hits / total:.1f}% ({total})" if total else "—"

    for name, rows in evaluations.items():
        records = [(record, row) for row in rows if (record := _reasoned_record(row)) is not None]
        reasoned = [(record, row) for record, row in records if stated_reason(row["prediction"]) is not None]
        true = sum(reason_holds(record, row["prediction"]) for record, row in reasoned)
        follows = {}
        for record, row in reasoned:
            follows.setdefault(spatial_pair(record) == "one_shape", []).append(conclusion_follows(record, row["prediction"]))
        lucky = sum(row["correct"] and not reason_holds(record, row["prediction"]) for record, row in reasoned)
        everything = follows.get(True, []) + follows.get(False, [])
        lines.append(
            f"| {name} | {len(records)} | {len(reasoned)} | {percent(true, len(reasoned))} "
            f"| {percent(sum(everything), len(everything))} | {percent(sum(follows.get(True, [])), len(follows.get(True, [])))} "
            f"| {percent(sum(follows.get(False, [])), len(follows.get(False, [])))} | {percent(lucky, len(reasoned))} |"
        )
    return "\n".join(lines)


def count_table(evaluations: dict[str, Sequence[dict]]) -> str:
    """How the count answers go wrong, one row per named evaluation, as a Markdown table: the accuracy of the count
    questions by their true number ("How many red objects are there?" -> "3"), and of the wrong answers, how many
    state a single number one away from the truth. Each cell is `accuracy (questions)`."""
    numbers = sorted({int(row["answer"]) for rows in evaluations.values() for row in rows if row["category"] == "count"})
    lines = ["| evaluation | " + " | ".join(f"answer {n}" for n in numbers) + " | wrong answers one away |",
             "|---|" + "---:|" * (len(numbers) + 1)]
    for name, rows in evaluations.items():
        counts = [row for row in rows if row["category"] == "count"]
        cells = []
        for number in numbers:
            picked = [row["correct"] for row in counts if int(row["answer"]) == number]
            cells.append(f"{100 * sum(picked) / len(picked):.1f}% ({len(picked)})" if picked else "—")
        wrong = [row for row in counts if not row["correct"]]
        stated = [{int(token) for token in normalize(row["prediction"]) if token.isdigit()} for row in wrong]
        near = sum(len(said) == 1 and abs(min(said) - int(row["answer"])) == 1 for said, row in zip(stated, wrong))
        cells.append(f"{100 * near / len(wrong):.1f}% ({len(wrong)})" if wrong else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_qa(
    model,
    processor,
    split_dataset: Dataset,
    n: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    answer_fn: Callable[[Dataset], list[str]] | None = None,
    return_predictions: bool = False,
) -> dict | tuple[dict, list[dict]]:
    """Answer the held-out questions of `split_dataset` and score them per category.

    Args:
        model, processor: the VLM and its processor (unused when `answer_fn` is given).
        split_dataset: a world split or prompt rows with `record` (see `question_rows`).
        n: evaluate the first `n` questions only.
        batch_size, max_new_tokens: generation settings of `generate_answers`.
        answer_fn: the answer source, `question rows -> answer texts`; default greedy generation with `model`.
        return_predictions: also return the per-question records of `prediction_rows`.

    Returns:
        The metrics of `score_answers` plus `seconds` and `questions_per_second` (and the prediction records when
        `return_predictions`).
    """
    questions = question_rows(split_dataset, n)
    if answer_fn is None:
        def answer_fn(rows):
            return generate_answers(model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    predictions = list(answer_fn(questions))
    seconds = time.perf_counter() - start
    metrics = score_answers(questions["record"], predictions)
    metrics["seconds"] = round(seconds, 3)
    metrics["questions_per_second"] = round(len(questions) / max(seconds, 1e-9), 3)
    if return_predictions:
        return metrics, prediction_rows(questions, predictions)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Text-only regression against the base LLM
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def text_regression(
    model, processor, base_llm, texts: Sequence[str], batch_size: int = 8, max_length: int = 256
) -> dict:
    """Compare the VLM's text-only next-token loss with its base LLM's on held-out text.

    Cross-attention fusion leaves an untouched LLM exactly as it was on text (the losses and logits are equal);
    after LLM finetuning the difference measures drift.

    Args:
        model: the VLM (or a `PeftModel` around it); called with `input_ids` only.
        processor: its processor (the tokenizer encodes `texts`; both models see the same ids).
        base_llm: the base causal LM, or its path (loaded with `AutoModelForCausalLM` in the VLM's dtype).
        texts: held-out documents, e.g. `align.zoo.lm_documents(world, "test", tokenizer)`.
        batch_size: documents per forward.
        max_length: documents are cut to this many tokens.

    Returns:
        `documents`, `tokens` (scored next-token predictions), `vlm_loss`, `base_loss`, `loss_diff` (VLM - base),
        `vlm_perplexity`, `base_perplexity`, `max_abs_logit_diff` (over every scored position, on the vocabulary
        both models share) and `compared_vocab`.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(processor)
    device = _model_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    if isinstance(base_llm, (str, os.PathLike)):
        base_llm = AutoModelForCausalLM.from_pretrained(base_llm, dtype=dtype).to(device)
    base_llm.eval()
    was_training = model.training
    model.eval()
    docs = encode_documents(tokenizer, texts, max_length)
    if not docs:
        raise ValueError("no held-out text of at least 2 tokens to compare on")
    vocab = min(model.get_output_embeddings().out_features, base_llm.get_output_embeddings().out_features)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = {"vlm": 0.0, "base": 0.0}
    tokens, max_diff = 0, 0.0
    for first in range(0, len(docs), batch_size):
        batch = docs[first : first + batch_size]
        length = max(len(doc) for doc in batch)
        input_ids = torch.tensor([doc + [pad_id] * (length - len(doc)) for doc in batch], device=device)
        attention_mask = torch.tensor([[1] * len(doc) + [0] * (length - len(doc)) for doc in batch], device=device)
        scored = attention_mask[:, 1:].bool()
        targets = input_ids[:, 1:]
        logits = {
            "vlm": model(input_ids=input_ids, attention_mask=attention_mask).logits.float(),
            "base": base_llm(input_ids=input_ids, attention_mask=attention_mask).logits.float(),
        }
        for name, values in logits.items():
            losses = F.cross_entropy(values[:, :-1].transpose(1, 2), targets, reduction="none")
            nll[name] += losses[scored].sum().item()
        diff = (logits["vlm"][..., :vocab] - logits["base"][..., :vocab]).abs()[attention_mask.bool()]
        max_diff = max(max_diff, diff.max().item())
        tokens += int(scored.sum())
    model.train(was_training)
    vlm_loss, base_loss = nll["vlm"] / tokens, nll["base"] / tokens
    return {
        "documents": len(docs),
        "tokens": tokens,
        "vlm_loss": vlm_loss,
        "base_loss": base_loss,
        "loss_diff": vlm_loss - base_loss,
        "vlm_perplexity": math.exp(vlm_loss),
        "base_perplexity": math.exp(base_loss),
        "max_abs_logit_diff": max_diff,
        "compared_vocab": vocab,
    }


# ---------------------------------------------------------------------------------------------------------------
# Loading a model to evaluate
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def category_table(metrics: dict) -> str:
    """Markdown table of one evaluation: per category (and overall) questions, correct, accuracy, ± s.e."""
    lines = ["| category | questions | correct | accuracy | ± s.e. |", "|---|---:|---:|---:|---:|"]
    for category in categories_of(metrics):
        lines.append(
            f"| {category} | {metrics[f'total_{category}']} | {metrics[f'correct_{category}']} "
            f"| {_percent(metrics[f'accuracy_{category}'])} | {_percent(metrics.get(f'stderr_{category}'))} |"
        )
    lines.append(
        f"| **overall** | {metrics['total']} | {metrics['correct']} | **{_percent(metrics['accuracy'])}** "
        f"| {_percent(metrics.get('stderr'))} |"
    )
    return "\n".join(lines)


def sampled_table(metrics: dict) -> str:
    """Markdown table of `sampled_metrics` (merged into an evaluation's metrics): per category (and overall) the
    greedy accuracy, pass@k for each k and maj@N."""
    n = metrics["num_samples"]
    ks = sorted(int(key.split("@")[1]) for key in metrics if key.startswith("pass@") and "_" not in key)
    header = ["category", "greedy", *(f"pass@{k}" for k in ks), f"maj@{n}"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for suffix, name in [*((f"_{c}", c) for c in categories_of(metrics)), ("", "**overall**")]:
        figures = [metrics[f"accuracy{suffix}"], *(metrics[f"pass@{k}{suffix}"] for k in ks), metrics[f"maj@{n}{suffix}"]]
        lines.append(f"| {name} | " + " | ".join(_percent(value) for value in figures) + " |")
    return "\n".join(lines)


def text_regression_table(result: dict) -> str:
    """Markdown table of `text_regression`: loss and perplexity of the VLM and of the base LLM on text."""
    return "\n".join([
        "| model | text loss | perplexity |",
        "|---|---:|---:|",
        f"| VLM (text only) | {result['vlm_loss']:.4f} | {result['vlm_perplexity']:.3f} |",
        f"| base LLM | {result['base_loss']:.4f} | {result['base_perplexity']:.3f} |",
        "",
        f"{result['documents']} documents, {result['tokens']} tokens; loss difference {result['loss_diff']:+.2e}, "
        f"max |logit difference| {result['max_abs_logit_diff']:.2e}.",
    ])


def scoreboard(results: dict[str, dict]) -> str:
    """Markdown table comparing named evaluations (e.g. {"stage 1": m1, "SFT": m2, "DPO": m3}).

    Rows are the stages in the given order; columns: questions, overall accuracy ± standard error, then the
    accuracy of each category present in any result.
    """
    if not results:
        raise ValueError("scoreboard needs at least one named result")
    categories = []
    for metrics in results.values():
        categories += [c for c in categories_of(metrics) if c not in categories]
    categories = [c for c in CATEGORIES if c in categories] + [c for c in categories if c not in CATEGORIES]
    lines = [
        "| stage | questions | overall | " + " | ".join(categories) + " |",
        "|---|---:|---:|" + "---:|" * len(categories),
    ]
    for stage, metrics in results.items():
        overall = f"{_percent(metrics['accuracy'])} ± {100 * metrics.get('stderr', standard_error(metrics['accuracy'], metrics['total'])):.1f}"
        cells = [_percent(metrics.get(f"accuracy_{c}")) for c in categories]
        lines.append(f"| {stage} | {metrics['total']} | {overall} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(comparisons: dict[str, dict]) -> str:
    """Markdown table of named `paired_difference` results: questions, the overall difference in points ± its paired
    standard error, the questions only one side gets right, then the difference ± its standard error per category."""
    if not comparisons:
        raise ValueError("paired_table needs at least one comparison")
    categories = []
    for result in comparisons.values():
        categories += [k.removeprefix("difference_") for k in result if k.startswith("difference_")]
    categories = [c for c in CATEGORIES if c in categories] + sorted(set(categories) - set(CATEGORIES))
    lines = [
        "| comparison | questions | difference | only the first right | only the second right | "
        + " | ".join(categories) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(categories),
    ]
    for name, result in comparisons.items():
        cells = [
            f"{100 * result[f'difference_{c}']:+.1f} ± {100 * result[f'stderr_{c}']:.1f}" if f"difference_{c}" in result
            else "–"
            for c in categories
        ]
        overall = f"{100 * result['difference']:+.1f} ± {100 * result['stderr']:.1f}"
        lines.append(
            f"| {name} | {result['questions']} | {overall} | {result['a_only']} | {result['b_only']} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


__all__ = [
    "PREDICTIONS",
    "categories_of",
    "category_table",
    "decode_completions",
    "evaluate_qa",
    "generate_answers",
    "is_adapter_dir",
    "load_eval_questions",
    "majority_answer",
    "paired_difference",
    "paired_table",
    "prediction_rows",
    "pass_at_k",
    "question_rows",
    "read_predictions",
    "reasons_table",
    "sample_answers",
    "sample_batch",
    "sampled_metrics",
    "sampled_table",
    "score_answers",
    "scoreboard",
    "form_table",
    "count_table",
    "standard_error",
    "stop_token_ids",
    "text_regression",
    "text_regression_table",
]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m align.evaluation BASELINE OTHER [OTHER ...]`: each evaluation folder (as `recipes/evaluate.py`
    writes it) minus the first, paired on the questions both answered, as a Markdown table. With `--forms`, each
    folder's accuracy per question form instead (`form_table`; one folder is enough); with `--reasons`, how its
    reasoned yes/no spatial answers go wrong (`reasons_table`); with `--counts`, its count answers (`count_table`)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("baseline", help="Evaluation folder the others are compared with (its predictions.jsonl).")
    parser.add_argument("others", nargs="*", help="Evaluation folders to compare with the baseline.")
    parser.add_argument("--forms", action="store_true",
                        help="Print each folder's accuracy per question form (yes/no vs choice spatial questions).")
    parser.add_argument("--reasons", action="store_true",
                        help="Print how each folder's reasoned yes/no spatial answers go wrong (`reasons_table`).")
    parser.add_argument("--counts", action="store_true",
                        help="Print each folder's count accuracy by the true number, and how many wrong counts are one "
                        "away (`count_table`).")
    args = parser.parse_args(argv)
    tables = {"forms": form_table, "reasons": reasons_table, "counts": count_table}
    chosen = [table for name, table in tables.items() if getattr(args, name)]
    if len(chosen) > 1:
        parser.error("--forms, --reasons and --counts each print their own table: give one")
    if chosen:
        folders = [args.baseline, *args.others]
        evaluations = {folder: read_predictions(Path(folder) / PREDICTIONS) for folder in folders}
        print(chosen[0](evaluations))
        return
    if not args.others:
        parser.error("give at least one evaluation folder to compare with the baseline (or --forms, --reasons or --counts)")
    baseline = read_predictions(Path(args.baseline) / PREDICTIONS)
    print(paired_table({
        f"{other} − {args.baseline}": paired_difference(read_predictions(Path(other) / PREDICTIONS), baseline)
        for other in args.others
    }))


if __name__ == "__main__":
    main()
