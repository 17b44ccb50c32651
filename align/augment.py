"""Synthetic question-answer data: a text-only LLM writes Q&A pairs from captions, and only checked pairs are kept.

The pipeline, after Self-Instruct (arXiv:2212.10560) and LLaVA's text-only GPT-4 instruction data
(arXiv:2304.08485), with a verifier instead of trust in the generator:

1. prompt a causal LM with each caption and the cue "Question:" (`PROMPT_TEMPLATE`), sample several texts;
2. read the "Question: ... Answer: ..." lines (`parse_qa_pairs`), stopping at the first line that is not one;
3. drop questions asked before for the same image, by this LLM or in the dataset (`deduplicate`);
4. keep a pair only when it passes a filter (`filter_pairs`): the world's verifier where the image has a scene
   graph (`record_for_question` + `verify`, so the question must be answerable and the answer right), a reward
   model's score above a threshold otherwise;
5. write the kept pairs as SFT rows (`augment`), one image and one question-answer turn each.

Every candidate line is accounted for: generated = kept + unparseable + duplicate + outside grammar + wrong
answer + low reward.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Value

from align.data.world import open_world, with_images
from align.evaluation import stop_token_ids
from align.runs import RunArguments, atomic_file
from align.world import WorldConfig, question_category, record_for_question, verify
from align.world.dataset import MESSAGES_FEATURE
from align.world.verify import normalize

logger = logging.getLogger(__name__)

QUESTION_CUE = "Question:"
ANSWER_CUE = "Answer:"
# The default LLM was pretrained on documents "<detailed caption>\nQuestion: <q> Answer: <a>\n..." (one per world
# image, `align.world.text_corpus`), so a caption followed by the cue "Question:" makes it go on writing Q&A lines
# about that caption. A template for another LLM (few-shot examples first, say) must keep `{caption}` and end with
# the cue, which is handed back to the parser in front of each generated text.
PROMPT_TEMPLATE = "{caption}\n" + QUESTION_CUE

FILTERS = ("auto", "verifier", "reward")
KEPT = "kept"
UNPARSEABLE = "unparseable"
DUPLICATE = "duplicate"
OUTSIDE_GRAMMAR = "outside grammar"
WRONG_ANSWER = "wrong answer"
LOW_REWARD = "low reward"
REJECTION_REASONS = (UNPARSEABLE, DUPLICATE, OUTSIDE_GRAMMAR, WRONG_ANSWER, LOW_REWARD)
UNKNOWN_CATEGORY = "other"

ScoreFn = Callable[[list[dict]], Sequence[float]]
_QA_LINE = re.compile(r"^question:\s*(?P<question>.*?)\s*answer:\s*(?P<answer>.*?)\s*$", re.IGNORECASE)
_CUE = re.compile(r"\b(?:question|answer):", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# Configuration (the recipe's dataclasses)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AugmentArguments:
    """Which captions, which LLM writes the pairs, and how they are filtered."""

    llm_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Causal LM folder (with its tokenizer); default: the zoo's Llama, .cache/zoo/llama."},
    )
    world_path: str | None = field(
        default=None,
        metadata={
            "help": "Captioned images: a `save_to_disk` folder with `images` and a caption column, and optionally "
            "`scene` (a scene graph, for the verifier), `questions` and `image_id`. Default: the zoo's world."
        },
    )
    world_split: str = field(default="train", metadata={"help": "Split of a saved DatasetDict."})
    world_images: int | None = field(default=None, metadata={"help": "Use only the first N images (default: all)."})
    caption_column: str = field(
        default="caption_detailed", metadata={"help": "Column holding the caption each prompt is built from."}
    )
    filter: str = field(
        default="auto",
        metadata={
            "help": f"How pairs are checked, one of {list(FILTERS)}: `verifier` (needs a scene graph per image), "
            "`reward` (reward-model score >= reward_threshold), `auto` (verifier where the image has a scene graph, "
            "reward model elsewhere)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model folder (align.reward), needed when a pair has no scene graph."}
    )
    reward_threshold: float = field(default=0.0, metadata={"help": "Least reward-model score of a kept pair."})
    reward_batch_size: int = field(default=16, metadata={"help": "Pairs per reward-model forward pass."})
    dtype: str = field(default="float32", metadata={"help": "LLM weights dtype: auto, float32, bfloat16 or float16."})

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {list(FILTERS)}, got {self.filter!r}")
        if self.world_images is not None and self.world_images < 1:
            raise ValueError(f"world_images must be >= 1 or unset (all), got {self.world_images}")
        if self.filter == "reward" and not self.reward_model_name_or_path:
            raise ValueError("filter='reward' needs reward_model_name_or_path (a reward model folder)")
        if self.reward_batch_size < 1:
            raise ValueError(f"reward_batch_size must be >= 1, got {self.reward_batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class GenerationArguments:
    """How the LLM samples: `samples_per_caption` texts per caption, nucleus sampling (arXiv:1904.09751)."""

    samples_per_caption: int = field(default=4, metadata={"help": "Texts sampled per caption."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    max_new_tokens: int = field(default=192, metadata={"help": "Length limit of each sampled text, in tokens."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    prompt_template: str = field(
        default=PROMPT_TEMPLATE,
        metadata={"help": f"Prompt with a {{caption}} slot, ending with {QUESTION_CUE!r}."},
    )

    def __post_init__(self):
        check_generation(self.samples_per_caption, self.temperature, self.top_p, self.max_new_tokens, self.batch_size)
        check_template(self.prompt_template)


@dataclass
class AugmentOutputArguments(RunArguments):
    """Where the outputs go."""

    output_dir: str = field(metadata={"help": "Folder for data/, generated.jsonl, metrics.json and config.yaml."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})


def check_generation(samples_per_caption, temperature, top_p, max_new_tokens, batch_size) -> None:
    """Raise a ValueError naming the first sampling setting out of range."""
    for name, value in (("samples_per_caption", samples_per_caption), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_template(template: str) -> None:
    if "{caption}" not in template or not template.rstrip().endswith(QUESTION_CUE):
        raise ValueError(f"prompt_template must contain {{caption}} and end with {QUESTION_CUE!r}, got {template!r}")


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def qa_prompts(captions: Iterable[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    """One prompt per caption: `template` with the caption (stripped) in its `{caption}` slot."""
    check_template(template)
    return [template.format(caption=" ".join(str(caption).split())) for caption in captions]


def _left_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _completion_text(tokenizer, ids: list[int], stop: set[int]) -> str:
    """The generated text up to the first stop token, behind the prompt's cue; a text cut by the length limit
    loses its unfinished last line, which would otherwise read as a truncated answer ("Answer: the gre")."""
    end = next((i for i, token in enumerate(ids) if token in stop), None)
    text = QUESTION_CUE + tokenizer.decode(ids[:end], skip_special_tokens=True)
    if end is None:
        text = text[: text.rfind("\n") + 1] if "\n" in text else ""
    return text.rstrip()


@torch.no_grad()
def generate_qa(
    model,
    tokenizer,
    captions: Sequence[str],
    samples_per_caption: int = 4,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 192,
    batch_size: int = 64,
    seed: int = 0,
    template: str = PROMPT_TEMPLATE,
) -> list[list[str]]:
    """Sample Q&A texts from a causal LM, `samples_per_caption` per caption.

    Prompts (`qa_prompts`, after the tokenizer's bos token) are sorted by length, left-padded and sampled in batches
    with the KV cache. Each text starts with the cue "Question:" and ends at the first eos token; a text that hit
    `max_new_tokens` loses its unfinished last line.

    Returns:
        One list of `samples_per_caption` texts per caption, in the captions' order.
    """
    check_generation(samples_per_caption, temperature, top_p, max_new_tokens, batch_size)
    prompts = qa_prompts(captions, template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    jobs = [(i, s) for i in range(len(prompts)) for s in range(samples_per_caption)]
    jobs.sort(key=lambda job: len(encoded[job[0]]))
    stop = set(stop_token_ids(model, tokenizer))  # the eos and end-of-turn tokens, as evaluation stops at
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    texts = [[""] * samples_per_caption for _ in prompts]
    start, batches = time.perf_counter(), math.ceil(len(jobs) / batch_size)
    for number, first in enumerate(range(0, len(jobs), batch_size), start=1):
        batch = jobs[first : first + batch_size]
        input_ids, attention_mask = _left_padded([encoded[i] for i, _ in batch], pad_id, device)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature, top_p=top_p,
            top_k=0, max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=sorted(stop), pad_token_id=pad_id,
        )
        for (i, s), ids in zip(batch, output[:, input_ids.shape[1] :].tolist()):
            texts[i][s] = _completion_text(tokenizer, ids, stop)
        if number % 10 == 0 or number == batches:
            logger.info("generated %d of %d batches (%.1f s)", number, batches, time.perf_counter() - start)
    model.train(was_training)
    return texts


# ---------------------------------------------------------------------------------------------------------------
# Parsing and deduplication
# ---------------------------------------------------------------------------------------------------------------


def qa_lines(text: str) -> list[str]:
    """The non-empty lines of a generated text: each is one attempted question-answer pair."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def parse_qa_line(line: str) -> tuple[str, str] | None:
    """ "Question: What color is the circle? Answer: red" -> ("What color is the circle?", "red"), else None.

    The question must hold a "?" and the answer must be non-empty; a line with a second cue ("... Answer: red
    Question: ...") is run-on text, not a pair.
    """
    found = _QA_LINE.match(line.strip())
    if found is None:
        return None
    question, answer = found.group("question"), found.group("answer")
    if "?" not in question or not answer or _CUE.search(question) or _CUE.search(answer):
        return None
    return question, answer


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a generated text, one per line, up to the first line that is not a pair
    (what follows junk is not trusted: the model has left the format)."""
    pairs = []
    for line in qa_lines(text):
        pair = parse_qa_line(line)
        if pair is None:
            break
        pairs.append(pair)
    return pairs


def question_key(question: str) -> str:
    """The normalised question text duplicates are judged by: case, punctuation and spacing ignored."""
    return " ".join(normalize(question))


def duplicate_flags(questions: Sequence[str], existing: Iterable[str] = ()) -> list[bool]:
    """For each question (of one image), whether it repeats an earlier one or one of `existing`."""
    seen = {question_key(q) for q in existing}
    flags = []
    for question in questions:
        key = question_key(question)
        flags.append(key in seen)
        seen.add(key)
    return flags


def deduplicate(pairs: Sequence[tuple[str, str]], existing: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The pairs (of one image) whose question was not asked before: neither earlier in `pairs` nor among the
    image's `existing` questions. The first occurrence is kept."""
    flags = duplicate_flags([q for q, _ in pairs], existing)
    return [pair for pair, duplicate in zip(pairs, flags) if not duplicate]


# ---------------------------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------------------------


def user_turn(question: str, n_images: int = 1) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image", "text": None} for _ in range(n_images)] + [{"type": "text", "text": question}],
    }


def assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def filter_pairs(
    candidates: Sequence[dict],
    method: str = "auto",
    score_fn: ScoreFn | None = None,
    threshold: float = 0.0,
    config: WorldConfig | None = None,
) -> list[dict]:
    """Judge candidate pairs; each candidate is a dict with `question`, `answer`, `scene` (a scene graph, or None)
    and, for the reward model, `images`.

    With a scene graph the question is read into a record (`record_for_question`): outside the grammar (or not
    answerable beyond doubt) it is dropped, and it is kept only when `verify(record, answer)` holds. Without one
    (or with `method="reward"`) the pairs are scored in one `score_fn` call on rows `{"images", "prompt"
    (a user turn with the image and the question), "completion" (the answer)}` and kept when score >= threshold.

    Args:
        candidates: the pairs to judge.
        method: "auto" (verifier where there is a scene graph), "verifier" (every candidate needs one) or "reward".
        score_fn: scorer of reward rows, e.g. `reward_score_fn(path)`; needed when any pair goes to the reward model.
        threshold: least score of a kept pair.
        config: the world's parameters (default `WorldConfig()`).

    Returns:
        One verdict per candidate: `kept`, `reason` (None or one of `REJECTION_REASONS`), `category`, `record`
        (the question record, verifier only) and `score` (reward model only).
    """
    if method not in FILTERS:
        raise ValueError(f"filter must be one of {list(FILTERS)}, got {method!r}")
    verdicts: list[dict | None] = [None] * len(candidates)
    to_score = []
    for index, candidate in enumerate(candidates):
        scene = candidate.get("scene") or None
        if method == "verifier" and scene is None:
            raise ValueError(f"filter='verifier' needs a scene graph for every image; candidate {index} has none")
        if method == "reward" or scene is None:
            to_score.append(index)
            continue
        record = record_for_question(scene, candidate["question"], config)
        if record is None:
            verdicts[index] = _verdict(OUTSIDE_GRAMMAR, question_category(candidate["question"]))
        elif not verify(record, candidate["answer"]):
            verdicts[index] = _verdict(WRONG_ANSWER, record["category"], record=record)
        else:
            verdicts[index] = _verdict(None, record["category"], record=record)
    if to_score:
        if score_fn is None:
            raise ValueError(
                f"{len(to_score)} pairs have no scene graph to verify against and need a reward model "
                "(score_fn / reward_model_name_or_path)"
            )
        rows = [
            {
                "images": list(candidates[i].get("images") or []),
                "prompt": [user_turn(candidates[i]["question"], len(candidates[i].get("images") or []))],
                "completion": candidates[i]["answer"],
            }
            for i in to_score
        ]
        scores = [float(s) for s in score_fn(rows)]
        if len(scores) != len(rows):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(rows)} rows")
        for index, score in zip(to_score, scores):
            category = question_category(candidates[index]["question"])
            verdicts[index] = _verdict(None if score >= threshold else LOW_REWARD, category, score=score)
    return verdicts


def _verdict(reason: str | None, category: str | None, record: dict | None = None, score: float | None = None) -> dict:
    return {"kept": reason is None, "reason": reason, "category": category or UNKNOWN_CATEGORY, "record": record,
            "score": score}


def reward_score_fn(model_name_or_path: str, batch_size: int = 16, device=None) -> ScoreFn:
    """A `score_fn` for `filter_pairs` from a trained reward model (`align.reward`), loaded from a local folder."""
    from align.reward import load_reward_model, reward_scores

    model, processor = load_reward_model(model_name_or_path, device=device)

    def score(rows: list[dict]) -> list[float]:
        return [float(s) for s in reward_scores(model, processor, rows, batch_size=batch_size)]

    return score


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline over a dataset
# ---------------------------------------------------------------------------------------------------------------


def load_captioned_images(path: str | Path | None = None, split: str = "train", n: int | None = None) -> Dataset:
    """Captioned images from a `save_to_disk` folder (a `Dataset`, or a `DatasetDict` and its `split`), the first
    `n` rows when `n` is set; default: the zoo's shapes world."""
    data = open_world(path, split, hint="set world_path")
    if n is not None:
        data = data.select(range(min(n, len(data))))
    logger.info("captioned images: %d of %s (%s)", len(data), path or "the zoo's world", split)
    return data


def needs_reward_model(dataset: Dataset, method: str) -> bool:
    """Whether some pair of `dataset` goes to the reward model: always for "reward", for "auto" when an image has
    no scene graph."""
    if method in ("reward", "verifier"):
        return method == "reward"
    return "scene" not in dataset.column_names or not all(dataset["scene"])


SFT_FEATURES = Features(
    {"messages": MESSAGES_FEATURE, "category": Value("string"), "record": Value("string"), "image_id": Value("string")}
)


def _column(dataset: Dataset, name: str, default=None) -> list:
    return list(dataset[name]) if name in dataset.column_names else [default] * len(dataset)


def _image_counts(dataset: Dataset) -> list[int]:
    """Images per row, read as list lengths from Arrow: no image is decoded or copied."""
    if len(dataset) == 0:
        return []
    column = dataset.select_columns(["images"]).with_format("arrow")[:]["images"]
    return pc.list_value_length(column).to_pylist()


def augment(
    world_split: Dataset,
    llm,
    tokenizer,
    caption_column: str = "caption_detailed",
    samples_per_caption: int = 4,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 192,
    batch_size: int = 64,
    seed: int = 0,
    method: str = "auto",
    score_fn: ScoreFn | None = None,
    threshold: float = 0.0,
    template: str = PROMPT_TEMPLATE,
    config: WorldConfig | None = None,
    generations_path: str | Path | None = None,
) -> tuple[Dataset, dict]:
    """Generate, parse, deduplicate and filter Q&A pairs for every image of `world_split`.

    Args:
        world_split: rows with `images` and `caption_column`; `scene` (scene graph JSON) enables the verifier,
            `questions` (JSON records) are the image's existing questions for deduplication, `image_id` names rows.
        llm, tokenizer: the causal LM that writes the pairs.
        method, score_fn, threshold, config: see `filter_pairs`.
        generations_path: where to write one JSON line per sampled text with each line's outcome.
        The rest: see `generate_qa`.

    Returns:
        The kept pairs as SFT rows (`images`, `messages`: a user turn with the image and the question and an
        assistant turn with the answer, `category`, `record` (JSON question record, None without a scene graph),
        `image_id`), and the stats: captions, texts, generated (candidate lines), parsed, unique, kept, yield
        (kept / generated), kept_per_category, rejected (count per reason), images_with_kept and
        generation_seconds.
    """
    if method not in FILTERS:
        raise ValueError(f"filter must be one of {list(FILTERS)}, got {method!r}")
    missing = [c for c in ("images", caption_column) if c not in world_split.column_names]
    if missing:
        raise ValueError(f"the captioned images lack the columns {missing}; got {world_split.column_names}")
    scenes = [scene or None for scene in _column(world_split, "scene")]
    if method == "verifier" and any(scene is None for scene in scenes):
        raise ValueError(
            "filter='verifier' needs a scene graph (a `scene` column) for every image; use 'auto' or 'reward'"
        )
    if score_fn is None and needs_reward_model(world_split, method):
        raise ValueError(f"filter={method!r} sends pairs without a scene graph to the reward model: give score_fn")
    start = time.perf_counter()
    texts = generate_qa(
        llm, tokenizer, list(world_split[caption_column]), samples_per_caption, temperature, top_p, max_new_tokens,
        batch_size, seed, template,
    )
    seconds = time.perf_counter() - start
    existing = [[r["question"] for r in json.loads(q)] if q else [] for q in _column(world_split, "questions")]
    image_ids = [str(i) if i is not None else str(n) for n, i in enumerate(_column(world_split, "image_id"))]
    n_images = _image_counts(world_split)

    # Every candidate line, with its outcome filled in as the pipeline goes.
    log = []
    candidates, candidate_images = [], []
    needs_images = method == "reward" or any(scene is None for scene in scenes)
    for image, samples in enumerate(texts):
        pairs_of_image = []
        for sample, text in enumerate(samples):
            pairs = parse_qa_pairs(text)
            entry = {"image_id": image_ids[image], "sample": sample, "text": text, "lines": len(qa_lines(text)),
                     "pairs": [{"question": q, "answer": a} for q, a in pairs]}
            log.append(entry)
            pairs_of_image += entry["pairs"]
        flags = duplicate_flags([p["question"] for p in pairs_of_image], existing[image])
        for pair, duplicate in zip(pairs_of_image, flags):
            if duplicate:
                pair.update(outcome=DUPLICATE, category=question_category(pair["question"]) or UNKNOWN_CATEGORY)
                continue
            candidates.append({"question": pair["question"], "answer": pair["answer"], "scene": scenes[image]})
            candidate_images.append((image, pair))
    if needs_images:
        decoded = {}
        for candidate, (image, _) in zip(candidates, candidate_images):
            if image not in decoded:
                decoded[image] = world_split[image]["images"]
            candidate["images"] = decoded[image]
    verdicts = filter_pairs(candidates, method, score_fn, threshold, config)

    kept_rows, kept_indices = {"messages": [], "category": [], "record": [], "image_id": []}, []
    for (image, pair), verdict in zip(candidate_images, verdicts):
        pair.update(outcome=KEPT if verdict["kept"] else verdict["reason"], category=verdict["category"])
        if verdict["score"] is not None:
            pair["score"] = verdict["score"]
        if verdict["kept"]:
            kept_indices.append(image)
            kept_rows["messages"].append([user_turn(pair["question"], n_images[image]), assistant_turn(pair["answer"])])
            kept_rows["category"].append(verdict["category"])
            kept_rows["record"].append(json.dumps(verdict["record"]) if verdict["record"] else None)
            kept_rows["image_id"].append(image_ids[image])
    dataset = with_images(world_split, kept_indices, kept_rows, SFT_FEATURES)

    stats = augment_stats(log, len(texts), seconds)
    if generations_path is not None:
        with atomic_file(generations_path) as f:
            f.writelines(json.dumps(entry) + "\n" for entry in log)
    logger.info(
        "kept %d of %d generated pairs (%.1f%%) from %d captions; rejected: %s", stats["kept"], stats["generated"],
        100 * stats["yield"], stats["captions"], ", ".join(f"{n} {reason}" for reason, n in stats["rejected"].items()),
    )
    return dataset, stats


def augment_stats(log: list[dict], captions: int, seconds: float = 0.0) -> dict:
    """The yield of a run from its generation log (one entry per sampled text, each pair with its `outcome`)."""
    pairs = [pair for entry in log for pair in entry["pairs"]]
    outcomes = Counter(pair["outcome"] for pair in pairs)
    generated = sum(entry["lines"] for entry in log)
    parsed = len(pairs)
    kept = outcomes[KEPT]
    rejected = {reason: outcomes[reason] for reason in REJECTION_REASONS}
    rejected[UNPARSEABLE] = generated - parsed
    images_with_kept = {entry["image_id"] for entry in log if any(p["outcome"] == KEPT for p in entry["pairs"])}
    return {
        "captions": captions,
        "texts": len(log),
        "generated": generated,
        "parsed": parsed,
        "unique": parsed - outcomes[DUPLICATE],
        "kept": kept,
        "yield": kept / generated if generated else 0.0,
        "kept_per_category": dict(sorted(Counter(p["category"] for p in pairs if p["outcome"] == KEPT).items())),
        "rejected": rejected,
        "images_with_kept": len(images_with_kept),
        "generation_seconds": round(seconds, 2),
    }


__all__ = [
    "FILTERS",
    "PROMPT_TEMPLATE",
    "REJECTION_REASONS",
    "AugmentArguments",
    "AugmentOutputArguments",
    "GenerationArguments",
    "augment",
    "augment_stats",
    "deduplicate",
    "duplicate_flags",
    "filter_pairs",
    "generate_qa",
    "load_captioned_images",
    "needs_reward_model",
    "parse_qa_line",
    "parse_qa_pairs",
    "qa_lines",
    "qa_prompts",
    "question_key",
    "reward_score_fn",
    "user_turn",
]
