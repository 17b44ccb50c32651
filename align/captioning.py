"""Captioning on the shapes world: the image-caption pairs of adapter pretraining, and the caption evaluation.

    world = open_world()                                     # the zoo's world (.cache/zoo/world), align.data.world
    train = caption_training_rows(world["train"])            # images + messages, for SFTTrainer
    figures = evaluate_captions(model, processor, world["test"], n=100)

`evaluate_captions` generates one caption per held-out image (greedy, batched with left padding) and scores them
with the shipped `caption_match` metric against the scene graphs, plus BLEU / ROUGE-L against the world's captions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import datasets
import torch
from datasets import Dataset, DatasetDict

from align.data import load_dataset_local
from align.data.world import open_world
from align.evaluation import generate_answers
from align.metrics import load_metric
from align.world import ANSWER_TYPES, SPATIAL_PAIRS, caption_rows, question_rows

CAPTION_PROMPT = "Describe the image."
CAPTION_STYLES = ("short", "detailed")
# `question_repeats` key qualifier: a category's questions of scenes with two objects or more ("What is the color of
# the circle?" among several objects: the question's object must be found among the visual tokens, not just read).
SEVERAL = "several"


def _caption_column(style: str) -> str:
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r}; supported: {list(CAPTION_STYLES)}")
    return "caption_detailed" if style == "detailed" else "caption"


def caption_training_rows(world_split: Dataset, style: str = "short", limit: int | None = None) -> Dataset:
    """Image-caption pairs in TRL's format: `images` and `messages` (a caption request, e.g. "Describe the image.",
    with the image, answered by the caption), from a split of the world.

    Args:
        world_split: a split of the world (`build_world`'s columns).
        style: "short" ("two red circles and a blue square.") or "detailed" (sizes and positions too).
        limit: keep the first `limit` rows.
    """
    _caption_column(style)
    if limit is not None:
        world_split = world_split.select(range(min(limit, len(world_split))))
    return caption_rows(world_split, detailed=style == "detailed").select_columns(["images", "messages"])


def load_training_pairs(
    world_path: str | os.PathLike | None = None,
    dataset_path: str | os.PathLike | None = None,
    split: str = "train",
    style: str = "short",
    limit: int | None = None,
    rejects_path: str | os.PathLike | None = None,
    questions: Sequence[str] = (),
    question_turns: int = 4,
    seed: int = 0,
    question_repeats: Mapping[str, int] | None = None,
    spatial_reasoning: bool = False,
) -> Dataset:
    """The image-caption rows of adapter pretraining: the world's captions of `split` by default, or any dataset in
    TRL's internal format (`images` + `messages`) saved with `save_to_disk` at `dataset_path` (a `Dataset`, or a
    `DatasetDict` and its `split`), or a data file in one of `align.data.FORMATS` (TRL JSON/JSONL, LLaVA-Instruct,
    ShareGPT), converted on load; rows refused by the conversion are listed in `rejects_path`. `limit` keeps the
    first rows (images, for the world).

    With `questions` (world categories, e.g. `CATEGORIES`), the world's captions come with every question of those
    categories about the same images (`align.world.question_rows`, conversations of up to `question_turns` turns),
    shuffled with `seed`: grounded pretraining, where the LLM trains too and learns to answer from the visual tokens
    (a second stage after adapter pretraining, as Llama 3.2's annealing on grounded data). `question_repeats` weighs
    the mixture: {"spatial": 4} asks every spatial question four times, once among its image's other questions and
    three times more in conversations of that category alone (a curated annealing mixture, upweighting what lags).
    A key `category:answer_type` weighs one form of a category's questions: {"spatial:yes_no": 8} asks the yes/no
    spatial questions eight times and the choice ones once (`align.world.ANSWER_TYPES`), and
    `spatial:yes_no:one_shape` those of them that name two objects of one shape ("Is the red square above the orange
    square?"; `align.world.SPATIAL_PAIRS`); `category:several` its questions of scenes with two objects or more
    ({"color:several": 8}: the color of one object among several, the questions that need binding). With
    `spatial_reasoning`
    the yes/no spatial questions are answered with their reason first (`align.world.reasoned_answer`)."""
    repeats = {key: (split_repeat_key(key, questions), times) for key, times in (question_repeats or {}).items()}
    for key, (_, times) in repeats.items():
        if times < 1:
            raise ValueError(f"question_repeats for {key!r} must be at least 1, got {times}")
    if dataset_path is None:
        world = open_world(world_path, split, hint="give world_path")
        captions = caption_training_rows(world, style=style, limit=limit)
        if not questions:
            return captions
        images = world if limit is None else world.select(range(min(limit, len(world))))
        answered = [question_rows(images, categories=questions, max_turns=question_turns, reasoned=spatial_reasoning)]
        for (category, form, pair, several), times in repeats.values():
            if times > 1:
                extra = question_rows(images, categories=[category], max_turns=question_turns,
                                      answer_types=[form] if form else None, reasoned=spatial_reasoning,
                                      spatial_pairs=[pair] if pair else None, min_objects=2 if several else 0)
                answered += [extra] * (times - 1)
        answered = [rows.select_columns(["images", "messages"]) for rows in answered]
        return datasets.concatenate_datasets([captions, *answered]).shuffle(seed=seed)
    if questions or spatial_reasoning:
        raise ValueError("questions (and spatial_reasoning) are the shapes world's: give no dataset_path with them")
    if os.path.isfile(dataset_path):
        dataset, _ = load_dataset_local(dataset_path, kind="sft", rejects_path=rejects_path)
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
    if not os.path.isdir(dataset_path):
        raise ValueError(
            f"dataset_path {str(dataset_path)!r} is not a data file and not a folder written by save_to_disk"
        )
    dataset = datasets.load_from_disk(str(dataset_path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"the dataset at {str(dataset_path)!r} has no split {split!r}; it has {list(dataset)}")
        dataset = dataset[split]
    missing = {"images", "messages"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"the dataset at {str(dataset_path)!r} lacks {sorted(missing)}: expected TRL's internal format, `images` "
            f"(a list of images per row) and `messages` (a conversation); it has {dataset.column_names}"
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def split_repeat_key(key: str, questions: Sequence[str]) -> tuple[str, str | None, str | None, bool]:
    """A `question_repeats` key, `category`, `category:answer_type`, `spatial:yes_no:<pair>` or
    `category:several` (`SEVERAL`: its questions of scenes with two objects or more), as (category, answer_type or
    None, pair or None, several); raises ValueError naming the key when the category is not among `questions`, the
    answer type is not the world's, or a pair (`align.world.SPATIAL_PAIRS`) follows anything but spatial:yes_no."""
    category, _, rest = key.partition(":")
    if rest == SEVERAL:
        if category not in questions:
            raise ValueError(f"question_repeats names {category!r}, which is not among the questions {list(questions)}")
        return category, None, None, True
    form, _, pair = rest.partition(":")
    if category not in questions:
        raise ValueError(f"question_repeats names {category!r}, which is not among the questions {list(questions)}")
    if form and form not in ANSWER_TYPES:
        raise ValueError(f"question_repeats names the answer type {form!r} in {key!r}; the world's: {list(ANSWER_TYPES)}")
    if pair and (category != "spatial" or form != "yes_no" or pair not in SPATIAL_PAIRS):
        raise ValueError(f"question_repeats names the pair {pair!r} in {key!r}: only spatial:yes_no questions are "
                         f"split by the objects they name, as {list(SPATIAL_PAIRS)}")
    return category, form or None, pair or None, False


@torch.no_grad()
def generate_captions(
    model,
    processor,
    images: list,
    prompt: str = CAPTION_PROMPT,
    batch_size: int = 16,
    max_new_tokens: int = 64,
) -> list[str]:
    """One greedy caption per image (`align.evaluation.generate_answers`: batched, left-padded, the KV cache, stopping
    at the end of the turn)."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    rows = [{"images": [image], "prompt": conversation} for image in images]
    answers = generate_answers(model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, log_every=0)
    return [answer.strip() for answer in answers]


def evaluate_captions(
    model,
    processor,
    world_split: Dataset,
    n: int,
    style: str = "short",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    prompt: str = CAPTION_PROMPT,
    examples: int = 3,
) -> dict:
    """Caption the first `n` images of a world split and score the captions.

    Args:
        model, processor: a VLM and its processor.
        world_split: a held-out split of the world (`images`, `scene`, `caption`, `caption_detailed`).
        n: images to caption (all of the split if it is smaller).
        style: the captions BLEU / ROUGE-L compare with ("short" or "detailed"; the style trained on).
        batch_size, max_new_tokens, prompt: generation settings.
        examples: generated captions to return next to their references, for reading.

    Returns:
        The `caption_match` figures (`caption_match`: fraction of captions naming exactly the scene's objects;
        `mention_precision`/`mention_recall`/`mention_f1`, `count_agreement`, `num_captions`, `bleu`, `rouge_l`),
        plus `examples`: `[{"prediction", "reference"}]`.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    column = _caption_column(style)
    rows = world_split.select(range(min(n, len(world_split))))
    images = [row_images[0] for row_images in rows["images"]]
    predictions = generate_captions(model, processor, images, prompt, batch_size, max_new_tokens)
    references = list(rows[column])
    figures = load_metric("caption_match").compute(
        predictions=predictions, references=list(rows["scene"]), reference_captions=references
    )
    figures["examples"] = [
        {"prediction": p, "reference": r} for p, r in zip(predictions[:examples], references[:examples])
    ]
    return figures


__all__ = [
    "CAPTION_PROMPT",
    "CAPTION_STYLES",
    "caption_training_rows",
    "evaluate_captions",
    "generate_captions",
    "load_training_pairs",
    "split_repeat_key",
]
