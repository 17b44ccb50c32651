"""Captions, question-answer records and conversations derived from a scene graph.

Every question has exactly one right answer given the scene: an object is named by the shortest
description that picks it alone, and spatial questions are asked only when the gap is unambiguous.
"""

from __future__ import annotations

import random

from .scene import SIZES, Scene, SceneObject, WorldConfig, coarse_position, relation_holds

CATEGORIES = ("color", "shape", "count", "existence", "spatial", "unanswerable")
ANSWER_TYPES = ("yes_no", "number", "color", "shape", "choice", "refusal")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
REFUSAL = "The image does not show that."
CAPTION_REQUESTS = (
    "Describe the image.",
    "What is in this image?",
    "Describe this picture.",
    "What do you see in the image?",
)

# Per image: up to this many questions of each category (existence comes as a present/absent pair,
# so exactly half of the existence questions are about absent objects).
COLOR_QUESTIONS = 2
SHAPE_QUESTIONS = 2
COUNT_QUESTIONS = 3
EXISTENCE_PAIRS = 1
SPATIAL_QUESTIONS = 2
UNANSWERABLE_QUESTIONS = 1
ZERO_COUNT_PROBABILITY = 0.3

# The question templates (align/world/parse.py reads questions back with the same ones).
COLOR_TEMPLATES = ("What color is the {ref}?", "What is the color of the {ref}?", "Which color is the {ref}?")
SHAPE_TEMPLATES = ("What shape is the {ref}?", "What is the shape of the {ref}?", "Which shape is the {ref}?")
COUNT_TEMPLATES = ("How many {p} are there?", "How many {p} are in the image?", "How many {p} can you see?")
EXISTENCE_TEMPLATES = (
    "Is there {a} {n}?", "Is there {a} {n} in the image?", "Can you see {a} {n}?", "Does the image contain {a} {n}?",
)
SPATIAL_YES_NO_TEMPLATE = "Is the {rx} {words} the {ry}?"
SPATIAL_CHOICE_TEMPLATE = "{lead} {words}, the {rx} or the {ry}?"
CHOICE_LEADS = ("Which is", "Which object is")

# Shortest first: the first level that picks exactly one object names it.
COLOR_REFERENCES = (("shape",), ("size",), ("size", "shape"))
SHAPE_REFERENCES = (("color",), ("size",), ("size", "color"))
OBJECT_REFERENCES = (("color", "shape"), ("size", "color", "shape"))
EXISTENCE_LEVELS = (("shape",), ("color",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))

_POSITION_PHRASES = {
    "top left": "at the top left",
    "top center": "at the top",
    "top right": "at the top right",
    "middle left": "on the left",
    "middle center": "in the center",
    "middle right": "on the right",
    "bottom left": "at the bottom left",
    "bottom center": "at the bottom",
    "bottom right": "at the bottom right",
}
_SPATIAL_YES_NO = {
    "left_of": ("to the left of", "right_of"),
    "right_of": ("to the right of", "left_of"),
    "above": ("above", "below"),
    "below": ("below", "above"),
}
# yes/no relation -> its phrase in the question
SPATIAL_YES_NO_WORDS = {relation: words for relation, (words, _) in _SPATIAL_YES_NO.items()}
# "which" relation -> (phrase, predicate the winner satisfies towards the other object)
_SPATIAL_CHOICE = {
    "further_left": ("further left", "left_of"),
    "further_right": ("further right", "right_of"),
    "higher": ("higher", "above"),
    "lower": ("lower", "below"),
}
# yes/no relation -> the "which" phrase of the object it favours, said first in a reasoned answer
REASON_WORDS = {predicate: words for words, predicate in _SPATIAL_CHOICE.values()}
_UNANSWERABLE_ABOUT_OBJECT = (
    "What is written on the {ref}?",
    "What is the {ref} made of?",
    "How heavy is the {ref}?",
    "What is hidden behind the {ref}?",
    "How old is the {ref}?",
    "What does the {ref} smell like?",
)
_UNANSWERABLE_ABOUT_IMAGE = (
    "Who drew this picture?",
    "Where was this picture taken?",
    "What time of day is it in this picture?",
    "What is the name of the artist?",
    "What is just outside the frame of this picture?",
)


def phrase(query: dict) -> str:
    """Noun phrase for a query such as {"size": "small", "color": "red"} -> "small red object"."""
    parts = [query[k] for k in ("size", "color") if query.get(k)]
    return " ".join([*parts, query.get("shape") or "object"])


def plural(noun_phrase: str) -> str:
    return noun_phrase + "s"


def article(noun_phrase: str) -> str:
    return "an" if noun_phrase[0] in "aeiou" else "a"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def reference(scene: Scene, obj: SceneObject, levels) -> dict | None:
    """The shortest query among `levels` that matches `obj` and no other object, or None."""
    for level in levels:
        query = {key: getattr(obj, key) for key in level}
        if scene.count(query) == 1:
            return query
    return None


def count_sentence(n: int, noun: str) -> str:
    """The sentence answer to a count question: "There are no red circles." / "There is one ..." / "There are two ..."."""
    if n == 0:
        return f"There are no {plural(noun)}."
    if n == 1:
        return f"There is one {noun}."
    return f"There are {number_word(n)} {plural(noun)}."


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _counted(n: int, noun_phrase: str) -> str:
    return f"{article(noun_phrase)} {noun_phrase}" if n == 1 else f"{number_word(n)} {plural(noun_phrase)}"


def _reading_order(scene: Scene) -> list[SceneObject]:
    rows = {"top": 0, "middle": 1, "bottom": 2}
    return sorted(
        scene.objects, key=lambda o: (rows[coarse_position(o, scene.image_size).split()[0]], o.center[0], o.center[1])
    )


def make_captions(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A short caption (colors, shapes, counts) and a detailed one (also sizes and coarse positions)."""
    ordered = _reading_order(scene)
    groups: dict[tuple[str, str], int] = {}
    for obj in ordered:
        groups[(obj.color, obj.shape)] = groups.get((obj.color, obj.shape), 0) + 1
    items = _join([_counted(n, f"{color} {shape}") for (color, shape), n in groups.items()])
    short = rng.choice(
        [f"{items}.", f"an image of {items}.", f"a picture of {items}.", f"{items} on a {scene.background} background."]
    )

    described = []
    for obj in ordered:
        noun = f"{obj.size} {obj.color} {obj.shape}"
        described.append(f"{article(noun)} {noun} {_POSITION_PHRASES[coarse_position(obj, scene.image_size)]}")
    details = _join(described)
    n = len(scene.objects)
    objects = _counted(n, "object") if n > 1 else "one object"
    detailed = rng.choice(
        [
            f"{details}.",
            f"{objects} on a {scene.background} background: {details}.",
            f"there {'is' if n == 1 else 'are'} {objects}: {details}.",
        ]
    )
    return short, detailed


def _record(category, question, answer, answer_long, answer_type, **extra) -> dict:
    return {
        "category": category,
        "question": question,
        "answer": answer,
        "answer_long": answer_long,
        "answer_type": answer_type,
        "choices": extra.get("choices", []),
        "objects": extra.get("objects", []),
        "query": extra.get("query"),
        "relation": extra.get("relation"),
    }


def _color_questions(scene: Scene, rng: random.Random) -> list[dict]:
    named = [(o, q) for o in scene.objects if (q := reference(scene, o, COLOR_REFERENCES))]
    records = []
    for obj, query in rng.sample(named, min(COLOR_QUESTIONS, len(named))):
        ref = phrase(query)
        template = rng.choice(COLOR_TEMPLATES)
        records.append(
            _record("color", template.format(ref=ref), obj.color, f"The {ref} is {obj.color}.", "color",
                    objects=[obj.id], query=query)
        )
    return records


def _shape_questions(scene: Scene, rng: random.Random) -> list[dict]:
    named = [(o, q) for o in scene.objects if (q := reference(scene, o, SHAPE_REFERENCES))]
    records = []
    for obj, query in rng.sample(named, min(SHAPE_QUESTIONS, len(named))):
        ref = phrase(query)
        template = rng.choice(SHAPE_TEMPLATES)
        records.append(
            _record("shape", template.format(ref=ref), obj.shape, f"The {ref} is {article(obj.shape)} {obj.shape}.",
                    "shape", objects=[obj.id], query=query)
        )
    return records


def _count_questions(scene: Scene, rng: random.Random, config: WorldConfig) -> list[dict]:
    kinds = {
        "total": [{}],
        "shape": [{"shape": s} for s in config.shapes],
        "color": [{"color": c} for c in config.colors],
        "size": [{"size": s} for s in SIZES],
        "color_shape": [{"color": c, "shape": s} for c in config.colors for s in config.shapes],
    }
    records = []
    for kind in rng.sample(list(kinds), COUNT_QUESTIONS):
        present = [q for q in kinds[kind] if scene.count(q) > 0]
        absent = [q for q in kinds[kind] if scene.count(q) == 0]
        pool = absent if absent and (not present or rng.random() < ZERO_COUNT_PROBABILITY) else present
        query = rng.choice(pool)
        n = scene.count(query)
        noun = phrase(query)
        template = rng.choice(COUNT_TEMPLATES)
        records.append(
            _record("count", template.format(p=plural(noun)), str(n), count_sentence(n, noun), "number", query=query)
        )
    return records


def _absent_queries(scene: Scene, config: WorldConfig) -> list[dict]:
    # Near misses first: an object that is there with one attribute changed makes the sharpest
    # hallucination check ("a blue circle" when there is a red circle).
    vocabulary = {"color": config.colors, "shape": config.shapes, "size": list(SIZES)}
    candidates: list[dict] = []
    seen: set[tuple] = set()
    for level in (("color", "shape"), ("size", "color", "shape")):
        present = {tuple(getattr(o, key) for key in level) for o in scene.objects}
        for obj in scene.objects:
            for changed in level:
                for value in vocabulary[changed]:
                    values = tuple(value if key == changed else getattr(obj, key) for key in level)
                    if values not in present and (level, values) not in seen:
                        seen.add((level, values))
                        candidates.append(dict(zip(level, values)))
    if not candidates:
        for key in ("shape", "color"):
            candidates += [{key: v} for v in vocabulary[key] if scene.count({key: v}) == 0]
    return candidates


def _existence_questions(scene: Scene, rng: random.Random, config: WorldConfig) -> list[dict]:
    records = []
    absent = _absent_queries(scene, config)
    if not absent:
        return records
    for _ in range(EXISTENCE_PAIRS):
        obj = rng.choice(scene.objects)
        level = rng.choice(EXISTENCE_LEVELS)
        pair = [({key: getattr(obj, key) for key in level}, True), (rng.choice(absent), False)]
        rng.shuffle(pair)
        for query, present in pair:
            noun = phrase(query)
            template = rng.choice(EXISTENCE_TEMPLATES)
            long = f"Yes, there is {article(noun)} {noun}." if present else f"No, there is no {noun}."
            records.append(
                _record("existence", template.format(a=article(noun), n=noun), "yes" if present else "no", long,
                        "yes_no", query=query)
            )
    return records


def _spatial_questions(scene: Scene, rng: random.Random) -> list[dict]:
    named = [(o, phrase(q)) for o in scene.objects if (q := reference(scene, o, OBJECT_REFERENCES))]
    pairs = []
    for i, (a, _) in enumerate(named):
        for b, _ in named[i + 1 :]:
            axes = [
                axis
                for axis, predicate in (("horizontal", "left_of"), ("vertical", "above"))
                if relation_holds(a, b, predicate, scene.spatial_px) or relation_holds(b, a, predicate, scene.spatial_px)
            ]
            if axes:
                pairs.append((a, b, axes))
    refs = {o.id: ref for o, ref in named}
    records = []
    for a, b, axes in rng.sample(pairs, min(SPATIAL_QUESTIONS, len(pairs))):
        axis = rng.choice(axes)
        x, y = rng.sample([a, b], 2)
        rx, ry = refs[x.id], refs[y.id]
        if rng.random() < 0.5:
            relation = rng.choice(["left_of", "right_of"] if axis == "horizontal" else ["above", "below"])
            words, opposite = _SPATIAL_YES_NO[relation]
            holds = relation_holds(x, y, relation, scene.spatial_px)
            long = (
                f"Yes, the {rx} is {words} the {ry}."
                if holds
                else f"No, the {rx} is {_SPATIAL_YES_NO[opposite][0]} the {ry}."
            )
            records.append(
                _record("spatial", SPATIAL_YES_NO_TEMPLATE.format(rx=rx, words=words, ry=ry), "yes" if holds else "no", long, "yes_no",
                        objects=[x.id, y.id], relation=relation)
            )
        else:
            relation = rng.choice(["further_left", "further_right"] if axis == "horizontal" else ["higher", "lower"])
            words, predicate = _SPATIAL_CHOICE[relation]
            winner = rx if relation_holds(x, y, predicate, scene.spatial_px) else ry
            lead = rng.choice(CHOICE_LEADS)
            records.append(
                _record("spatial", SPATIAL_CHOICE_TEMPLATE.format(lead=lead, words=words, rx=rx, ry=ry), f"the {winner}",
                        f"The {winner} is {words}.", "choice", choices=[f"the {rx}", f"the {ry}"],
                        objects=[x.id, y.id], relation=relation)
            )
    return records


def _unanswerable_questions(scene: Scene, rng: random.Random) -> list[dict]:
    named = [(o, phrase(q)) for o in scene.objects if (q := reference(scene, o, OBJECT_REFERENCES))]
    records = []
    for _ in range(UNANSWERABLE_QUESTIONS):
        if named and rng.random() < 0.6:
            obj, ref = rng.choice(named)
            question, objects = rng.choice(_UNANSWERABLE_ABOUT_OBJECT).format(ref=ref), [obj.id]
        else:
            question, objects = rng.choice(_UNANSWERABLE_ABOUT_IMAGE), []
        records.append(
            _record("unanswerable", question, REFUSAL, "It is not possible to tell from the image.", "refusal",
                    objects=objects)
        )
    return records


def make_questions(scene: Scene, rng: random.Random, config: WorldConfig | None = None) -> list[dict]:
    """Question-answer records for every category that applies to the scene (6-12 for 1-6 objects).

    A record is a JSON-serialisable dict: `category`, `question`, `answer` (short canonical answer),
    `answer_long` (a sentence), `answer_type` (one of `ANSWER_TYPES`), `choices` (the two candidates
    of a "which" question), `objects` (ids of the objects it is about), `query` (attribute filter of
    count/existence questions) and `relation` (spatial questions). `verify` needs only the record.
    """
    config = config or WorldConfig()
    records = (
        _color_questions(scene, rng)
        + _shape_questions(scene, rng)
        + _count_questions(scene, rng, config)
        + _existence_questions(scene, rng, config)
        + _spatial_questions(scene, rng)
        + _unanswerable_questions(scene, rng)
    )
    seen, unique = set(), []
    for record in records:
        if record["question"] not in seen:
            seen.add(record["question"])
            unique.append(record)
    return unique


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


IMAGE_ITEM = {"type": "image", "text": None}


def make_conversation(
    questions: list[dict], rng: random.Random, min_turns: int = 2, max_turns: int = 4
) -> list[dict]:
    """A TRL conversational sample of 2-4 question-answer turns about one image.

    Turns are drawn with as many different categories as possible; the first user turn starts with
    the image placeholder `{"type": "image", "text": None}`.
    """
    if not questions:
        raise ValueError("questions must not be empty")
    n = rng.randint(min(min_turns, len(questions)), min(max_turns, len(questions)))
    shuffled = rng.sample(questions, len(questions))
    picked, categories = [], set()
    for record in shuffled:
        if len(picked) < n and record["category"] not in categories:
            picked.append(record)
            categories.add(record["category"])
    picked += [r for r in shuffled if r not in picked][: n - len(picked)]
    picked.sort(key=shuffled.index)
    return conversation_messages(picked)


def is_spatial_yes_no(record: dict) -> bool:
    """Whether the record is a yes/no spatial question ("Is the red circle to the left of the blue square?")."""
    return record["category"] == "spatial" and record["answer_type"] == "yes_no"


def yes_no_objects(record: dict) -> tuple[str, str]:
    """The two objects a yes/no spatial record names, as the question names them: (subject, other)."""
    if not is_spatial_yes_no(record):
        raise ValueError(f"not a yes/no spatial question: {record['question']!r}")
    words = SPATIAL_YES_NO_WORDS[record["relation"]]
    subject, other = record["question"].removeprefix("Is the ").removesuffix("?").split(f" {words} the ")
    return subject, other


# The yes/no spatial questions by the two objects they name: of one shape ("the red square ... the orange square": the
# names differ only in the words before the shape) or of two shapes.
SPATIAL_PAIRS = ("one_shape", "two_shapes")


def spatial_pair(record: dict) -> str:
    """Whether a yes/no spatial record names two objects of one shape or of two (`SPATIAL_PAIRS`). After one-shape
    names the reasoned answer's yes/no turns on the words before the shape ("Is the red square above the orange
    square?" -> "The orange square is higher, so no."), after two shapes the shape word alone settles it."""
    subject, other = yes_no_objects(record)
    return "one_shape" if subject.split()[-1] == other.split()[-1] else "two_shapes"


def reasoned_answer(record: dict, correct: bool = True) -> str:
    """A yes/no spatial record's answer with its reason first: the object the relation favours, then yes or no
    ("Is the red circle to the left of the blue square?" -> "The red circle is further left, so yes."; the world asks
    only when one of the two is clearly further). The yes/no is then a comparison of two names in the text, and
    finding the object further left is the choice form's skill. `correct=False` gives the wrong answer reasoned the
    same way (the other object, the other word): the rejected side of a preference pair. `verify` reads the yes/no.
    """
    subject, other = yes_no_objects(record)
    holds = (record["answer"] == "yes") == correct
    return f"The {subject if holds else other} is {REASON_WORDS[record['relation']]}, so {'yes' if holds else 'no'}."


def answer_text(record: dict, reasoned: bool = False) -> str:
    """The answer a conversation gives to `record`: its short canonical answer, or with `reasoned` the
    `reasoned_answer` for a yes/no spatial question."""
    return reasoned_answer(record) if reasoned and is_spatial_yes_no(record) else record["answer"]


def conversation_messages(records: list[dict], reasoned: bool = False) -> list[dict]:
    """The question records as turns of one conversation, the image in the first user turn, each answered with its
    short canonical answer (`answer_text`: with `reasoned`, the yes/no spatial ones with their reason first)."""
    messages = []
    for turn, record in enumerate(records):
        content = [IMAGE_ITEM.copy(), _text(record["question"])] if turn == 0 else [_text(record["question"])]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [_text(answer_text(record, reasoned))]})
    return messages


def reasoned_messages(messages: list[dict], records: list[dict]) -> list[dict]:
    """A world conversation (`messages`) with each yes/no spatial question's answer replaced by `reasoned_answer`
    (`records`: the image's question records); other turns unchanged."""
    by_question = {record["question"]: record for record in records if is_spatial_yes_no(record)}
    out, question = [], None
    for message in messages:
        if message["role"] == "user":
            question = next((item["text"] for item in message["content"] if item.get("type") == "text"), None)
        elif message["role"] == "assistant" and question in by_question:
            message = {**message, "content": [_text(reasoned_answer(by_question[question]))]}
        out.append(message)
    return out


def caption_messages(caption: str, rng: random.Random) -> list[dict]:
    """A one-turn conversation asking for a description of the image and answering with `caption`."""
    return [
        {"role": "user", "content": [IMAGE_ITEM.copy(), _text(rng.choice(CAPTION_REQUESTS))]},
        {"role": "assistant", "content": [_text(caption)]},
    ]
