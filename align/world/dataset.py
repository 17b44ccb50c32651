"""The shapes world as Hugging Face datasets in TRL's column conventions, and the views derived from it."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable

import datasets
from datasets import Dataset, DatasetDict, Features, Image, List, Value

from .language import (
    ANSWER_TYPES,
    CATEGORIES,
    COLOR_TEMPLATES,
    SHAPE_TEMPLATES,
    SPATIAL_PAIRS,
    caption_messages,
    conversation_messages,
    is_spatial_yes_no,
    make_captions,
    make_conversation,
    make_questions,
    spatial_pair,
)
from .render import render
from .scene import WorldConfig, generate_scene, image_rng

DEFAULT_SIZES = {"train": 4000, "validation": 200, "test": 500}

MESSAGES_FEATURE = List(
    {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
)
WORLD_FEATURES = Features(
    {
        "image_id": Value("string"),
        "images": List(Image()),
        "scene": Value("string"),
        "caption": Value("string"),
        "caption_detailed": Value("string"),
        "questions": Value("string"),
        "messages": MESSAGES_FEATURE,
    }
)


def make_example(split: str, index: int, seed: int = 0, config: WorldConfig | None = None) -> dict:
    """Row `index` of `split` exactly as `build_world` writes it (the image as a PIL image)."""
    config = config or WorldConfig()
    rng = image_rng(seed, split, index)
    scene = generate_scene(config, rng)
    short, detailed = make_captions(scene, rng)
    questions = make_questions(scene, rng, config)
    return {
        "image_id": f"{split}-{index:06d}",
        "images": [render(scene)],
        "scene": scene.to_json(),
        "caption": short,
        "caption_detailed": detailed,
        "questions": json.dumps(questions),
        "messages": make_conversation(questions, rng, config.min_turns, config.max_turns),
    }


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_split(split: str, size: int, seed: int = 0, config: WorldConfig | None = None) -> Dataset:
    """One split of the world as an in-memory `Dataset` with the columns of `WORLD_FEATURES`."""
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"sizes[{split!r}] must be an integer >= 0, got {size!r}")
    rows = [make_example(split, i, seed, config) for i in range(size)]
    columns = {name: [row[name] for row in rows] for name in WORLD_FEATURES}
    # Handing `datasets` PNG bytes halves the build time: given PIL images it encodes each one twice.
    columns["images"] = [[{"bytes": _png(image), "path": None} for image in images] for images in columns["images"]]
    return Dataset.from_dict(columns, features=WORLD_FEATURES, split=datasets.NamedSplit(split))


def build_world(
    output_dir: str | None,
    sizes: dict[str, int] | None = None,
    config: WorldConfig | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Generate every split and save the `DatasetDict` to `output_dir` (skipped when it is None).

    Each split draws from its own seed stream (derived from `seed` and the split name), one row per
    image with columns `image_id`, `images`, `scene`, `caption`, `caption_detailed`, `questions`
    (JSON list of question records) and `messages` (a 2-4 turn TRL conversation).
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    if not sizes:
        raise ValueError("sizes must name at least one split, e.g. {'train': 4000}")
    config = config or WorldConfig()
    world = DatasetDict({split: generate_split(split, n, seed, config) for split, n in sizes.items()})
    if output_dir is not None:
        world.save_to_disk(str(output_dir))
    return world


def _per_split(view):
    def wrapper(ds, *args, **kwargs):
        if isinstance(ds, DatasetDict):
            return DatasetDict({split: view(part, *args, **kwargs) for split, part in ds.items()})
        return view(ds, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = view.__name__, view.__doc__
    return wrapper


def _with_columns(base: Dataset, indices: list[int] | None, columns: dict, features: Features) -> Dataset:
    # The images are taken over as stored (Arrow take of the PNG bytes), never decoded and re-encoded.
    if indices is not None:
        base = base.select(indices).flatten_indices(keep_in_memory=True)
    return datasets.concatenate_datasets([base, Dataset.from_dict(columns, features=features)], axis=1)


@_per_split
def caption_rows(ds: Dataset, detailed: bool = True) -> Dataset:
    """Captioning view, one row per image: `images`, `messages` (a caption request and the caption),
    `caption` (detailed or short) and `scene`. Works on a split or a whole `DatasetDict`."""
    captions = ds["caption_detailed" if detailed else "caption"]
    messages = [caption_messages(c, random.Random(f"caption:{i}")) for c, i in zip(captions, ds["image_id"])]
    features = Features({"messages": MESSAGES_FEATURE, "caption": Value("string"), "scene": Value("string")})
    columns = {"messages": messages, "caption": list(captions), "scene": list(ds["scene"])}
    return _with_columns(ds.select_columns(["images"]), None, columns, features)


@_per_split
def question_rows(
    ds: Dataset, categories: Iterable[str] | None = None, max_turns: int = 4, answer_types: Iterable[str] | None = None,
    reasoned: bool = False, spatial_pairs: Iterable[str] | None = None, min_objects: int = 0,
) -> Dataset:
    """Every question of every image as conversations: `images`, `messages`, `image_id`.

    Each image's questions of `categories` (default: all), and of `answer_types` (default: all; e.g. ["yes_no"] keeps
    "Is the red circle left of the blue square?" and drops "Which is further left, ...?"), and with `spatial_pairs`
    only the yes/no spatial ones naming objects of those kinds (`SPATIAL_PAIRS`, e.g. ["one_shape"]: "Is the red
    square above the orange square?"; `align.world.spatial_pair`), of images whose scene holds at least
    `min_objects` objects (e.g. 2: "What is the color of the circle?" asked where the circle is one of several
    objects, so the answer must be found, not just read), are shuffled (seeded by the image id) and cut into
    conversations of at most `max_turns` question-answer turns, the image in the first user turn, answered with the
    short canonical answers (with `reasoned`, the yes/no spatial ones with their reason first: `reasoned_answer`). Where `messages` holds one 2-4 turn conversation per image, this view uses all of its
    6-12 questions: the grounded data of a second pretraining stage, which needs many more answered questions per
    image than the conversations give.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    wanted = set(CATEGORIES if categories is None else categories)
    unknown = wanted - set(CATEGORIES)
    if unknown:
        raise ValueError(f"categories has unknown names {sorted(unknown)}; supported: {list(CATEGORIES)}")
    forms = set(ANSWER_TYPES if answer_types is None else answer_types)
    if forms - set(ANSWER_TYPES):
        raise ValueError(f"answer_types has unknown names {sorted(forms - set(ANSWER_TYPES))}; supported: {list(ANSWER_TYPES)}")
    pairs = None if spatial_pairs is None else set(spatial_pairs)
    if pairs is not None and (not pairs or pairs - set(SPATIAL_PAIRS)):
        raise ValueError(f"spatial_pairs must name some of {list(SPATIAL_PAIRS)}, got {sorted(pairs)}")
    scenes = ds["scene"] if min_objects > 1 else [None] * len(ds)
    indices, conversations, ids = [], [], []
    for row, (image_id, questions, scene) in enumerate(zip(ds["image_id"], ds["questions"], scenes)):
        if scene is not None and len(json.loads(scene)["objects"]) < min_objects:
            continue
        records = [r for r in json.loads(questions) if r["category"] in wanted and r["answer_type"] in forms]
        if pairs is not None:
            records = [r for r in records if is_spatial_yes_no(r) and spatial_pair(r) in pairs]
        random.Random(f"questions:{image_id}").shuffle(records)
        for start in range(0, len(records), max_turns):
            indices.append(row)
            conversations.append(conversation_messages(records[start : start + max_turns], reasoned))
            ids.append(image_id)
    features = Features({"messages": MESSAGES_FEATURE, "image_id": Value("string")})
    return _with_columns(ds.select_columns(["images"]), indices, {"messages": conversations, "image_id": ids}, features)


@_per_split
def prompt_rows(ds: Dataset, categories: Iterable[str] | None = None) -> Dataset:
    """Prompt-only view for RL and evaluation, one row per question: `images`, `prompt` (a TRL
    conversational prompt), `answer`, `category`, `record` (JSON question record for `verify`) and
    `image_id`. `categories` keeps only those categories."""
    wanted = set(CATEGORIES if categories is None else categories)
    unknown = wanted - set(CATEGORIES)
    if unknown:
        raise ValueError(f"categories has unknown names {sorted(unknown)}; supported: {list(CATEGORIES)}")
    indices, prompts, answers, kinds, records, ids = [], [], [], [], [], []
    for row, (image_id, questions) in enumerate(zip(ds["image_id"], ds["questions"])):
        for record in json.loads(questions):
            if record["category"] not in wanted:
                continue
            indices.append(row)
            prompts.append(
                [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": record["question"]}]}]
            )
            answers.append(record["answer"])
            kinds.append(record["category"])
            records.append(json.dumps(record))
            ids.append(image_id)
    features = Features(
        {
            "prompt": MESSAGES_FEATURE,
            "answer": Value("string"),
            "category": Value("string"),
            "record": Value("string"),
            "image_id": Value("string"),
        }
    )
    columns = {"prompt": prompts, "answer": answers, "category": kinds, "record": records, "image_id": ids}
    return _with_columns(ds.select_columns(["images"]), indices, columns, features)


def text_corpus(ds: Dataset | DatasetDict) -> list[str]:
    """Plain-text documents for language-model pretraining, two per image: the detailed caption
    followed by that image's "Question: ... Answer: ..." lines, then the short caption on its own."""
    parts = ds.values() if isinstance(ds, DatasetDict) else [ds]
    documents = []
    for part in parts:
        for short, detailed, questions in zip(part["caption"], part["caption_detailed"], part["questions"]):
            lines = [f"Question: {r['question']} Answer: {r['answer']}" for r in json.loads(questions)]
            documents.append("\n".join([detailed, *lines]))
            documents.append(short)
    return documents


def object_documents(ds: Dataset, seed: int = 0) -> list[str]:
    """One short document per object of every scene: the object described alone ("a small red square."), then its
    color and its shape asked and answered with the world's templates.

    Each answer is the one color or shape word of the document, so a language model trained on them learns to
    answer from the description in its context, the read-out a VLM's LLM later needs for visual tokens in that
    place. In the detailed-caption documents of `text_corpus` the same skill also needs the question's object found
    among several, and a tiny LLM does not pick it up from those alone (`python -m align.probe --llm`).
    """
    rng = random.Random(seed)
    documents = []
    for scene in ds["scene"]:
        for obj in json.loads(scene)["objects"]:
            color, shape = obj["color"], obj["shape"]
            color_question = rng.choice(COLOR_TEMPLATES).format(ref=shape)
            shape_question = rng.choice(SHAPE_TEMPLATES).format(ref=f"{color} object")
            documents.append(
                f"a {obj['size']} {color} {shape}.\nQuestion: {color_question} Answer: {color}\n"
                f"Question: {shape_question} Answer: {shape}"
            )
    return documents
