"""Reading a free-text question in the world's grammar back into a question record, answered from a scene graph.

The inverse of `make_questions`: a question written with the templates of `language.py` (by a person, or by a
language model that learnt them) becomes a record with the same keys, its answer computed from the scene, so that
`verify` can check any answer to it. Anything the scene cannot answer beyond doubt is refused (None): text outside
the templates, attribute values the world does not have, a reference that does not pick exactly one object, or a
spatial relation that is not clear-cut.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .language import (
    _SPATIAL_CHOICE,
    _SPATIAL_YES_NO,
    _UNANSWERABLE_ABOUT_IMAGE,
    _UNANSWERABLE_ABOUT_OBJECT,
    CHOICE_LEADS,
    COLOR_TEMPLATES,
    COUNT_TEMPLATES,
    EXISTENCE_TEMPLATES,
    REFUSAL,
    SHAPE_TEMPLATES,
    SPATIAL_CHOICE_TEMPLATE,
    SPATIAL_YES_NO_TEMPLATE,
    _record,
    article,
    count_sentence,
    phrase,
)
from .scene import SIZES, Scene, SceneObject, WorldConfig, relation_holds

_NOUN = r"[a-z]+(?: [a-z]+)*?"


def _alternatives(options) -> str:
    return "(?:" + "|".join(re.escape(o.lower()) for o in options) + ")"


_SLOTS = {
    "ref": _NOUN, "rx": _NOUN, "ry": _NOUN, "n": _NOUN, "p": _NOUN,
    "a": "(?:a|an)",
    "lead": _alternatives(CHOICE_LEADS),
}


def _pattern(template: str, **slots: str) -> re.Pattern:
    """A template such as "What color is the {ref}?" as an anchored regex over a normalised question."""
    parts = re.split(r"\{(\w+)\}", _normalise(template))
    regex = ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            regex += re.escape(part)
        else:
            slot = slots.get(part, _SLOTS.get(part))
            # Articles and leads are free choices of wording; every other slot is read back.
            regex += slot if part in ("a", "lead") else f"(?P<{part}>{slot})"
    return re.compile(f"^{regex}$")


def _normalise(question: str) -> str:
    """Lowercase, single spaces, no trailing question mark: "What  color is the Circle ?" -> "what color is the
    circle"."""
    return " ".join(question.lower().split()).rstrip("?").rstrip()


@lru_cache(maxsize=1)
def _patterns() -> list[tuple[str, re.Pattern]]:
    """(kind, regex) for every template; kind names the record builder."""
    yes_no = _alternatives(words for words, _ in _SPATIAL_YES_NO.values())
    choice = _alternatives(words for words, _ in _SPATIAL_CHOICE.values())
    return (
        [("color", _pattern(t)) for t in COLOR_TEMPLATES]
        + [("shape", _pattern(t)) for t in SHAPE_TEMPLATES]
        + [("count", _pattern(t)) for t in COUNT_TEMPLATES]
        + [("existence", _pattern(t)) for t in EXISTENCE_TEMPLATES]
        + [("spatial_yes_no", _pattern(SPATIAL_YES_NO_TEMPLATE, words=yes_no))]
        + [("spatial_choice", _pattern(SPATIAL_CHOICE_TEMPLATE, words=choice))]
        + [("unanswerable_object", _pattern(t)) for t in _UNANSWERABLE_ABOUT_OBJECT]
        + [("unanswerable_image", _pattern(t)) for t in _UNANSWERABLE_ABOUT_IMAGE]
    )


def _query(noun_phrase: str, config: WorldConfig, plural_noun: bool = False) -> dict | None:
    """ "small red circle" -> {"size": "small", "color": "red", "shape": "circle"}; "object" leaves the shape open.

    Word order is the world's (size, color, shape); a value outside `config` (or SIZES) gives None.
    """
    *modifiers, noun = noun_phrase.split()
    if plural_noun:
        if not noun.endswith("s"):
            return None
        noun = noun[:-1]
    query = {}
    if noun != "object":
        if noun not in config.shapes:
            return None
        query["shape"] = noun
    if len(modifiers) > 2:
        return None
    if modifiers and modifiers[0] in SIZES:
        query["size"] = modifiers.pop(0)
    if modifiers:
        if len(modifiers) > 1 or modifiers[0] not in config.colors:
            return None
        query["color"] = modifiers[0]
    return query


def _the_one(scene: Scene, query: dict | None) -> SceneObject | None:
    """The single object matching `query`, or None when there is none or more than one."""
    if query is None:
        return None
    found = [o for o in scene.objects if all(getattr(o, key) == value for key, value in query.items())]
    return found[0] if len(found) == 1 else None


def _color_or_shape(kind: str, question: str, slots: dict, scene: Scene, config: WorldConfig) -> dict | None:
    query = _query(slots["ref"], config)
    obj = _the_one(scene, query)
    if obj is None:
        return None
    ref = phrase(query)
    if kind == "color":
        return _record("color", question, obj.color, f"The {ref} is {obj.color}.", "color", objects=[obj.id],
                       query=query)
    return _record("shape", question, obj.shape, f"The {ref} is {article(obj.shape)} {obj.shape}.", "shape",
                   objects=[obj.id], query=query)


def _count(question: str, slots: dict, scene: Scene, config: WorldConfig) -> dict | None:
    query = _query(slots["p"], config, plural_noun=True)
    if query is None:
        return None
    n = scene.count(query)
    return _record("count", question, str(n), count_sentence(n, phrase(query)), "number", query=query)


def _existence(question: str, slots: dict, scene: Scene, config: WorldConfig) -> dict | None:
    query = _query(slots["n"], config)
    if query is None:
        return None
    present, noun = scene.count(query) > 0, phrase(query)
    long = f"Yes, there is {article(noun)} {noun}." if present else f"No, there is no {noun}."
    return _record("existence", question, "yes" if present else "no", long, "yes_no", query=query)


def _pair(slots: dict, scene: Scene, config: WorldConfig):
    qx, qy = _query(slots["rx"], config), _query(slots["ry"], config)
    x, y = _the_one(scene, qx), _the_one(scene, qy)
    if x is None or y is None or x is y:
        return None
    return x, y, phrase(qx), phrase(qy)


def _spatial_yes_no(question: str, slots: dict, scene: Scene, config: WorldConfig) -> dict | None:
    pair = _pair(slots, scene, config)
    if pair is None:
        return None
    x, y, rx, ry = pair
    relation = next(r for r, (words, _) in _SPATIAL_YES_NO.items() if words == slots["words"])
    opposite = _SPATIAL_YES_NO[relation][1]
    # Asked only when one of the two directions holds beyond doubt, as language.py does.
    if relation_holds(x, y, relation, scene.spatial_px):
        answer, long = "yes", f"Yes, the {rx} is {slots['words']} the {ry}."
    elif relation_holds(x, y, opposite, scene.spatial_px):
        answer, long = "no", f"No, the {rx} is {_SPATIAL_YES_NO[opposite][0]} the {ry}."
    else:
        return None
    return _record("spatial", question, answer, long, "yes_no", objects=[x.id, y.id], relation=relation)


def _spatial_choice(question: str, slots: dict, scene: Scene, config: WorldConfig) -> dict | None:
    pair = _pair(slots, scene, config)
    if pair is None:
        return None
    x, y, rx, ry = pair
    relation = next(r for r, (words, _) in _SPATIAL_CHOICE.items() if words == slots["words"])
    words, predicate = _SPATIAL_CHOICE[relation]
    if relation_holds(x, y, predicate, scene.spatial_px):
        winner = rx
    elif relation_holds(y, x, predicate, scene.spatial_px):
        winner = ry
    else:
        return None
    return _record("spatial", question, f"the {winner}", f"The {winner} is {words}.", "choice",
                   choices=[f"the {rx}", f"the {ry}"], objects=[x.id, y.id], relation=relation)


def _unanswerable(kind: str, question: str, slots: dict, scene: Scene, config: WorldConfig) -> dict | None:
    objects = []
    if kind == "unanswerable_object":
        query = _query(slots["ref"], config)
        if query is None:
            return None
        # Whatever the reference picks (one object, several, none), the image cannot answer: a refusal is right.
        objects = [o.id for o in scene.objects if all(getattr(o, key) == value for key, value in query.items())]
    return _record("unanswerable", question, REFUSAL, "It is not possible to tell from the image.", "refusal",
                   objects=objects)


def _matches(question: str):
    text = _normalise(question)
    for kind, pattern in _patterns():
        found = pattern.match(text)
        if found:
            yield kind, found.groupdict()


def _scene(scene) -> Scene:
    if isinstance(scene, Scene):
        return scene
    if isinstance(scene, str):
        return Scene.from_json(scene)
    if isinstance(scene, dict):
        return Scene.from_dict(scene)
    raise ValueError(f"scene must be a Scene, its JSON or its dict, got {type(scene).__name__}")


def record_for_question(scene, question: str, config: WorldConfig | None = None) -> dict | None:
    """The question record for a free-text `question` about `scene`, answered from the scene graph, or None.

    Reads every template of `make_questions` (case and spacing aside): color and shape of a referenced object,
    counts, existence, spatial yes/no and "which ..., the A or the B?", and the unanswerable questions. Object
    references may use any of size, color and shape, in the world's word order ("small red circle", "red object").

    Args:
        scene: a `Scene`, its JSON string or its dict (`Scene.to_dict`).
        question: the question text.
        config: the world's parameters (its colors and shapes); default `WorldConfig()`, the zoo's.

    Returns:
        A record with the keys of `make_questions`' records (`category`, `question`, `answer`, `answer_long`,
        `answer_type`, `choices`, `objects`, `query`, `relation`), or None when the question is outside the
        grammar, names a color or shape the world does not have, refers to no object or several where exactly
        one is meant (color, shape, spatial), or asks about a spatial relation that does not hold clearly in
        one direction.
    """
    if not isinstance(question, str):
        return None
    scene, config = _scene(scene), config or WorldConfig()
    question = " ".join(question.split())
    for kind, slots in _matches(question):
        if kind in ("color", "shape"):
            record = _color_or_shape(kind, question, slots, scene, config)
        elif kind == "count":
            record = _count(question, slots, scene, config)
        elif kind == "existence":
            record = _existence(question, slots, scene, config)
        elif kind == "spatial_yes_no":
            record = _spatial_yes_no(question, slots, scene, config)
        elif kind == "spatial_choice":
            record = _spatial_choice(question, slots, scene, config)
        else:
            record = _unanswerable(kind, question, slots, scene, config)
        if record is not None:
            return record
    return None


def question_category(question: str) -> str | None:
    """The category a question's template belongs to (no scene needed), or None outside the grammar."""
    if not isinstance(question, str):
        return None
    for kind, _ in _matches(question):
        return kind.split("_")[0]
    return None


__all__ = ["question_category", "record_for_question"]
