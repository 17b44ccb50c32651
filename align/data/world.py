"""Post-training sets drawn from the shapes world: SFT conversations, refusals and preference pairs.

Every answer here is checked with `align.world.verify`: chosen answers and refusals verify, rejected
answers do not, so a preference pair is right or wrong beyond doubt.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import re
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Features, Value

from align.paths import default_cache_dir
from align.world import verify
from align.world.dataset import MESSAGES_FEATURE
from align.world.language import (
    CATEGORIES,
    SPATIAL_YES_NO_WORDS,
    article,
    count_sentence,
    is_spatial_yes_no,
    phrase,
    reasoned_answer,
    reasoned_messages,
    yes_no_objects,
)
from align.world.scene import DEFAULT_COLORS, DEFAULT_SHAPES

logger = logging.getLogger(__name__)


def open_world(path=None, split: str | None = None, hint: str = "set --world_path") -> Dataset | DatasetDict:
    """The shapes world saved by `build_world` at `path` (default: the zoo's, `<cache>/world`): every split, or
    the `split` named (a folder holding one `Dataset` is that split). The one way the library opens a world.

    Raises:
        ValueError: naming the folder, when it holds no world or lacks the split; `hint` says what to set instead.
    """
    path = Path(path) if path else default_cache_dir() / "world"
    if not path.is_dir():
        raise ValueError(f"no shapes world at {path}: build it with `python -m align.zoo`, or {hint}")
    world = datasets.load_from_disk(str(path))
    if split is None or not isinstance(world, DatasetDict):
        return world
    if split not in world:
        raise ValueError(f"the world at {path} has no split {split!r}; splits: {list(world)}")
    return world[split]

# Refusals for questions the image cannot answer; each one passes `verify` for an unanswerable record.
REFUSALS = (
    "The image does not show that.",
    "It is not possible to tell from the image.",
    "I can't tell from this picture.",
    "That is not visible in the image.",
    "There is no way to know that from the picture.",
    "I do not know; the picture does not show it.",
    "The picture does not show that, so I can not say.",
    "Sorry, that can't be determined from the image.",
)
# Made-up answers to unanswerable questions, keyed by a word of the question; none of them is a refusal.
_FABRICATIONS = (
    ("written", ("It says hello.", "The word STOP is written on it.")),
    ("made of", ("It is made of wood.", "It is made of plastic.")),
    ("heavy", ("It weighs about two kilograms.", "It is very light, about ten grams.")),
    ("hidden", ("A small coin is hidden behind it.", "There is a key hidden behind it.")),
    ("old", ("It is three years old.", "It is about a century old.")),
    ("smell", ("It smells like roses.", "It smells like fresh paint.")),
    ("drew", ("A child drew this picture.", "It was drawn by a famous painter.")),
    ("taken", ("It was taken in a park.", "It was taken in a school classroom.")),
    ("time of day", ("It is early morning.", "It is late in the afternoon.")),
    ("artist", ("The artist is Anna Berg.", "The artist is called Tom Lee.")),
    ("outside the frame", ("There is a tall tree just outside the frame.", "A dog sits just outside the frame.")),
)
_GENERIC_FABRICATIONS = ("It is made of metal.", "It was made last year in Paris.")
_OPPOSITE_RELATION = {
    "to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above",
}


def _user(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def with_images(source: Dataset, indices: list[int], columns: dict, features: Features) -> Dataset:
    """The `images` of `source`'s rows `indices` next to new `columns` (one value per index) of `features`.

    The images are taken over as stored (an Arrow take of the PNG bytes), never decoded and re-encoded. With no
    indices the result is an empty dataset with the same columns.
    """
    if not indices:  # an Arrow take of no rows cannot be concatenated column-wise
        features = Features({"images": source.features["images"], **features})
        return Dataset.from_dict({name: [] for name in features}, features=features)
    images = source.select_columns(["images"]).select(indices).flatten_indices(keep_in_memory=True)
    return datasets.concatenate_datasets([images, Dataset.from_dict(columns, features=features)], axis=1)


def world_sft_rows(world_split: Dataset, reasoned: bool = False) -> Dataset:
    """The world's conversations as SFT rows: `images`, `messages` (TRL conversational format). With `reasoned`, each
    yes/no spatial question is answered with its reason first (`align.world.reasoned_answer`: "The red circle is
    further left, so yes.")."""
    if not reasoned:
        return world_split.select_columns(["images", "messages"])
    messages = [reasoned_messages(m, json.loads(q)) for m, q in zip(world_split["messages"], world_split["questions"])]
    return with_images(world_split, list(range(len(world_split))), {"messages": messages},
                       Features({"messages": MESSAGES_FEATURE}))


def refusal_rows(world_split: Dataset, n: int, seed: int = 0) -> Dataset:
    """`n` single-turn SFT rows teaching refusals: an image, one of its unanswerable questions and one of
    `REFUSALS`, which all pass `verify`. Questions repeat (with other phrasings) when `n` exceeds them.

    Returns:
        A `Dataset` with `images` and `messages`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pool = [
        (row, record["question"])
        for row, questions in enumerate(world_split["questions"])
        for record in json.loads(questions)
        if record["category"] == "unanswerable"
    ]
    if not pool:
        raise ValueError("the world split has no unanswerable questions to build refusals from")
    rng = random.Random(seed)
    picked = []
    while len(picked) < n:
        picked += rng.sample(pool, min(len(pool), n - len(picked)))
    messages = [[_user(question), _assistant(rng.choice(REFUSALS))] for _, question in picked]
    features = Features({"messages": MESSAGES_FEATURE})
    return with_images(world_split, [row for row, _ in picked], {"messages": messages}, features)


def _other(rng: random.Random, preferred, fallback, exclude: str) -> str:
    candidates = sorted(set(preferred) - {exclude}) or sorted(set(fallback) - {exclude})
    return rng.choice(candidates)


# A balanced count rejects a number two away once both neighbours are this far ahead of it (rejected minus chosen):
# about one count pair in eight on the world's answers, and each number then rejected within a few percent of as often
# as it is chosen (off by one alone cannot: 1 is chosen more often than 0 and 2 can reject it).
_OFF_BY_TWO_COST = 10


def _wrong_count(rng: random.Random, n: int, balance: collections.Counter | None = None) -> int:
    if balance is not None:  # the number rejected least so far against how often it was chosen; off by two costs more
        balance[n] -= 1
        candidates = [v for v in (n - 2, n - 1, n + 1, n + 2) if v >= 0]
        rng.shuffle(candidates)  # ties go either way
        wrong = min(candidates, key=lambda v: balance[v] + _OFF_BY_TWO_COST * (abs(v - n) - 1))
        balance[wrong] += 1
        return wrong
    if n == 0 or rng.random() < 0.5:
        return n + (1 if rng.random() < 0.85 else 2)
    return n - (1 if rng.random() < 0.85 or n < 2 else 2)


def wrong_answer(
    record: dict, scene: dict, rng: random.Random, long: bool, count_balance: collections.Counter | None = None
) -> str:
    """A plausible wrong answer of the record's own category, as a short answer or a sentence.

    color: another color of the palette, preferably one of another object in the image (the likelier
    mix-up); shape: likewise;
    count: off by one mostly (by two sometimes); yes/no: the opposite; "which": the other candidate;
    unanswerable: a made-up answer instead of a refusal.

    With `count_balance` (a `Counter` shared across calls: per number, times rejected minus times chosen), a count
    is off by one (by two sometimes) towards the number rejected least so far, and the counter is updated: over many
    pairs each number is then rejected about as often as it is chosen, so the pairs carry no preference for small or
    large numbers regardless of the image (the plain draw, always up from 0, rejects the larger number in some 60% of
    the world's count pairs, and DPO on them learned to undercount: README, DPO).
    """
    answer, category, answer_type = record["answer"], record["category"], record["answer_type"]
    if answer_type == "color":
        wrong = _other(rng, [o["color"] for o in scene["objects"]], DEFAULT_COLORS, answer)
        return re.sub(rf"\b{answer}\b(?!.*\b{answer}\b)", wrong, record["answer_long"]) if long else wrong
    if answer_type == "shape":
        wrong = _other(rng, [o["shape"] for o in scene["objects"]], DEFAULT_SHAPES, answer)
        if not long:
            return wrong
        return re.sub(rf"\b(a|an) {answer}\.$", f"{article(wrong)} {wrong}.", record["answer_long"])
    if answer_type == "number":
        wrong = _wrong_count(rng, int(answer), count_balance)
        return count_sentence(wrong, phrase(record["query"] or {})) if long else str(wrong)
    if answer_type == "yes_no" and category == "existence":
        noun = phrase(record["query"])
        if not long:
            return "no" if answer == "yes" else "yes"
        return f"No, there is no {noun}." if answer == "yes" else f"Yes, there is {article(noun)} {noun}."
    if answer_type == "yes_no":  # spatial: "Is the {a} {relation} the {b}?"
        if not long:
            return "no" if answer == "yes" else "yes"
        relation = SPATIAL_YES_NO_WORDS[record["relation"]]
        a, b = yes_no_objects(record)
        if answer == "yes":
            return f"No, the {a} is {_OPPOSITE_RELATION[relation]} the {b}."
        return f"Yes, the {a} is {relation} the {b}."
    if answer_type == "choice":
        loser = next(c for c in record["choices"] if c != answer)
        if not long:
            return loser
        winner = answer.removeprefix("the ")
        words = record["answer_long"].removeprefix(f"The {winner} is ").removesuffix(".")
        return f"The {loser.removeprefix('the ')} is {words}."
    if answer_type == "refusal":
        question = record["question"].lower()
        matching = [texts for key, texts in _FABRICATIONS if re.search(rf"\b{key}\b", question)]
        return rng.choice(matching[0] if matching else _GENERIC_FABRICATIONS)
    raise ValueError(f"unknown answer_type {answer_type!r} in record {record['question']!r}")


def wrong_conclusion(record: dict) -> str:
    """A yes/no spatial record's reasoned answer with its reason right and its yes or no wrong ("The blue square is
    further left, so yes." where the reason says no): against `reasoned_answer(record)`, a pair that differs in the
    conclusion alone."""
    good = reasoned_answer(record)
    stem, _, answer = good.rstrip(".").rpartition(" ")
    return f"{stem} {'no' if answer == 'yes' else 'yes'}."


def world_preference_rows(
    world_split: Dataset, seed: int = 0, per_image: int = 2, long_fraction: float = 0.0, reasoned: bool = False,
    conclusion_fraction: float = 0.0, categories: list[str] | None = None,
) -> Dataset:
    """Preference pairs from the world's questions: `images`, `prompt`, `chosen`, `rejected`, `category`,
    `record` (JSON question record) and `image_id`.

    Up to `per_image` questions per image, of different categories where possible. Chosen is the
    verified answer, in the long (sentence) form for a `long_fraction` of the pairs and short otherwise;
    rejected is `wrong_answer` in the same form, so the pair differs in content, not in length, its counts balanced
    across the pairs (`count_balance`: each number rejected about as often as it is chosen). A pair is
    kept only if chosen verifies and rejected does not. The default is short answers only, the form of the
    world's SFT conversations: pairs in a form the policy was not tuned on pull a small policy towards
    that form, and on the tiny default its generations degenerated (measured with `make demo`). With `reasoned`,
    a yes/no spatial pair is the `reasoned_answer` against the wrong answer reasoned the same way ("The blue square
    is further left, so no."), the form the policy's SFT data then has; and with `conclusion_fraction`, that fraction
    of them rejects the right reason with the wrong yes or no instead (`wrong_conclusion`), a pair that differs in the
    conclusion alone: the step a policy that names the right object can still get wrong (README: spatial).
    `categories` keeps the questions of those categories only (default: all).
    """
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    if not 0.0 <= conclusion_fraction <= 1.0:
        raise ValueError(f"conclusion_fraction must be in [0, 1], got {conclusion_fraction}")
    if conclusion_fraction and not reasoned:
        raise ValueError("conclusion_fraction rejects a reasoned answer's yes or no: it needs reasoned=True")
    wanted = set(CATEGORIES if categories is None else categories)
    if not wanted or wanted - set(CATEGORIES):
        raise ValueError(f"categories must name some of {list(CATEGORIES)}, got {categories}")
    rng = random.Random(seed)
    conclusions = random.Random(f"conclusions:{seed}")  # its own draws: every other pair is the same at any fraction
    count_balance = collections.Counter()
    indices, prompts, chosen, rejected, kinds, records, ids = [], [], [], [], [], [], []
    dropped = 0
    world = zip(world_split["questions"], world_split["scene"], world_split["image_id"])
    for row, (questions, scene, image_id) in enumerate(world):
        scene, questions = json.loads(scene), json.loads(questions)
        if categories is not None:
            questions = [q for q in questions if q["category"] in wanted]
        shuffled = rng.sample(questions, len(questions))
        picked, seen = [], set()
        for record in shuffled:  # one per category first, then any
            if record["category"] not in seen and len(picked) < per_image:
                picked.append(record)
                seen.add(record["category"])
        picked += [r for r in shuffled if r not in picked][: per_image - len(picked)]
        for record in picked:
            long = rng.random() < long_fraction
            good = record["answer_long"] if long else record["answer"]
            bad = wrong_answer(record, scene, rng, long, count_balance)
            if reasoned and is_spatial_yes_no(record):
                good, bad = reasoned_answer(record), reasoned_answer(record, correct=False)
                if conclusion_fraction and conclusions.random() < conclusion_fraction:
                    bad = wrong_conclusion(record)
            if not verify(record, good) or verify(record, bad):
                dropped += 1
                continue
            indices.append(row)
            prompts.append([_user(record["question"])])
            chosen.append([_assistant(good)])
            rejected.append([_assistant(bad)])
            kinds.append(record["category"])
            records.append(json.dumps(record))
            ids.append(image_id)
    if dropped:
        logger.warning("dropped %d preference pairs whose answers did not verify as expected", dropped)
    features = Features(
        {
            "prompt": MESSAGES_FEATURE,
            "chosen": MESSAGES_FEATURE,
            "rejected": MESSAGES_FEATURE,
            "category": Value("string"),
            "record": Value("string"),
            "image_id": Value("string"),
        }
    )
    columns = {
        "prompt": prompts, "chosen": chosen, "rejected": rejected, "category": kinds, "record": records,
        "image_id": ids,
    }
    return with_images(world_split, indices, columns, features)
