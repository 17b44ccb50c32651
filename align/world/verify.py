"""Checking a free-text answer against a question record.

Answers are normalised (case, punctuation, contractions, number words) and then read by type: a
right answer commits to exactly one value and it is the record's. Hedges ("maybe", "red or blue")
and refusals to a question the image does answer are wrong.
"""

from __future__ import annotations

import re

from .language import NUMBER_WORDS, REASON_WORDS, is_spatial_yes_no, yes_no_objects
from .scene import COLORS, SHAPES

# Colors and shapes outside the world still count as a commitment: "It is pink" is a wrong color.
_COLOR_WORDS = {name: name for name in COLORS} | {
    w: w for w in ("pink", "brown", "cyan", "magenta", "violet", "indigo", "teal", "gold", "silver", "beige",
                   "turquoise", "maroon", "navy", "lime", "olive")
} | {"grey": "gray"}
_SHAPE_WORDS = {}
for _shape in (*SHAPES, "rectangle", "oval", "ellipse", "star", "hexagon", "pentagon", "octagon", "heart",
               "cross", "rhombus", "cube", "sphere", "pyramid", "disk", "disc", "polygon", "line", "arrow"):
    _SHAPE_WORDS[_shape] = _shape
    _SHAPE_WORDS[_shape + "s"] = _shape
_NUMBERS = {word: n for n, word in enumerate(NUMBER_WORDS)}
_YES = {"yes", "yeah", "yep", "yup", "correct", "true"}
_NO = {"no", "nope", "false"}
_NEGATIONS = {"no", "not", "none", "nope", "nothing", "never", "neither", "nor"}
_HEDGES = {"maybe", "perhaps", "possibly", "probably", "might", "unsure", "guess", "either", "likely", "unclear"}
_REFUSALS = (
    "does not show", "do not show", "not shown", "can not tell", "not possible to tell", "not possible to know",
    "impossible to tell", "impossible to know", "unanswerable", "no way to know", "no way to tell",
    "not visible", "can not be determined", "can not determine", "can not know", "can not say",
    "do not know", "not enough information", "no information",
)
_ARTICLES = {"the", "a", "an"}
_LEADING_YES_NO = re.compile(r"^\W*(yes|yeah|yep|yup|no|nope)\s*([,.!;:]|$)")


def normalize(text: str) -> list[str]:
    """Lowercase word tokens with contractions expanded: "Can't tell!" -> ["can", "not", "tell"]."""
    text = text.lower().replace("\u2019", "'")
    for contraction, expanded in (("can't", "can not"), ("cannot", "can not"), ("won't", "will not"), ("n't", " not")):
        text = text.replace(contraction, expanded)
    return re.findall(r"[a-z0-9]+", text)


def _contains(tokens: list[str], phrase_tokens: list[str]) -> bool:
    k = len(phrase_tokens)
    return any(tokens[i : i + k] == phrase_tokens for i in range(len(tokens) - k + 1))


def is_refusal(text: str) -> bool:
    """Whether the answer declines to answer ("The image does not show that.", "I can't tell.")."""
    tokens = normalize(text)
    return any(_contains(tokens, phrase.split()) for phrase in _REFUSALS)


def _hedged(tokens: list[str]) -> bool:
    return bool(_HEDGES.intersection(tokens)) or _contains(tokens, ["not", "sure"])


def _yes_no(text: str, tokens: list[str]) -> str | None:
    leading = _LEADING_YES_NO.match(text.lower())
    if leading:
        said = "yes" if leading.group(1) in _YES else "no"
        rest = normalize(text[leading.end() :])
        contradiction = _NEGATIONS if said == "yes" else _YES
        return None if contradiction.intersection(rest) else said
    if is_refusal(text):
        return None
    positive, negative = bool(_YES.intersection(tokens)), bool(_NEGATIONS.intersection(tokens))
    if positive != negative:
        return "yes" if positive else "no"
    return None


def _numbers(tokens: list[str]) -> set[int]:
    found = {int(t) for t in tokens if t.isdigit()} | {_NUMBERS[t] for t in tokens if t in _NUMBERS}
    if not found and {"no", "none", "nothing"}.intersection(tokens):
        found = {0}
    return found


# A stated reason, as `reasoned_answer` words it: "The red circle is further left, so yes."
_STATED_REASON = re.compile(r"^the (.+?) is (" + "|".join(REASON_WORDS.values()) + r")\b")


def stated_reason(answer_text: str) -> tuple[str, str] | None:
    """The reason an answer states first, as (object, relation words): "The red circle is further left, so yes." ->
    ("red circle", "further left"); None when it states none."""
    found = _STATED_REASON.match(" ".join(normalize(answer_text)))
    return (found.group(1), found.group(2)) if found else None


def reason_holds(record: dict, answer_text: str) -> bool:
    """Whether the reason `answer_text` states is true of the image: for a yes/no spatial question answered with its
    reason first (`reasoned_answer`), the object it names is the one the question's relation favours, in the
    relation's words. An answer that states no reason, or to another question, has none to be false."""
    if not isinstance(answer_text, str) or not is_spatial_yes_no(record):
        return True
    reason = stated_reason(answer_text)
    if reason is None:
        return True
    subject, other = yes_no_objects(record)
    favoured = subject if str(record["answer"]).strip().lower() == "yes" else other
    return reason == (" ".join(normalize(favoured)), REASON_WORDS[record["relation"]])


def conclusion_follows(record: dict, answer_text: str) -> bool | None:
    """Whether the yes or no of a reasoned answer follows from the reason it states, true or false: yes after naming
    the question's subject ("Is the red circle left of the blue square?" -> "The red circle is further left, so
    yes."), no after naming the other object. None when the record is not a yes/no spatial question or the answer
    states no reason; False when the reason names neither object or the answer commits to no yes/no."""
    if not isinstance(answer_text, str) or not is_spatial_yes_no(record):
        return None
    reason = stated_reason(answer_text)
    if reason is None:
        return None
    subject, other = (" ".join(normalize(name)) for name in yes_no_objects(record))
    said = _yes_no(answer_text, normalize(answer_text))
    return (reason[0] == subject and said == "yes") or (reason[0] == other and said == "no")


def verify(record: dict, answer_text: str, reasons: bool = False) -> bool:
    """Whether `answer_text` is a right answer to the question `record` (from `make_questions`).

    Short and sentence answers both count: "2", "two", "There are two circles." for 2; "Yes, there is."
    for yes; "The circle is red." for red. For a "which" question the answer must name exactly one of
    the two candidates. For an unanswerable question only a refusal is right. With `reasons`, an answer that states
    its reason first must state a true one too (`reason_holds`): "The blue square is further left, so yes." is then
    wrong when the blue square is not further left, even if the answer is yes. GRPO's `verify_reasons` rewards
    answers with it, so that a lucky yes/no after a false reason is not reinforced; evaluation reads the answer alone.
    """
    if not isinstance(answer_text, str):
        return False
    if reasons and not reason_holds(record, answer_text):
        return False
    answer_type = record["answer_type"]
    tokens = normalize(answer_text)
    if answer_type == "refusal":
        return is_refusal(answer_text)
    if not tokens or _hedged(tokens):
        return False
    expected = str(record["answer"]).strip().lower()
    if answer_type == "yes_no":
        return _yes_no(answer_text, tokens) == expected
    if is_refusal(answer_text):
        return False
    if answer_type == "number":
        return _numbers(tokens) == {int(expected)}
    if _NEGATIONS.intersection(tokens):
        # "not red", "no circle": a negated value is not an answer to a color, shape or "which" question.
        return False
    if answer_type == "color":
        return {_COLOR_WORDS[t] for t in tokens if t in _COLOR_WORDS} == {expected}
    if answer_type == "shape":
        return {_SHAPE_WORDS[t] for t in tokens if t in _SHAPE_WORDS} == {expected}
    if answer_type == "choice":
        content = [t for t in tokens if t not in _ARTICLES]
        named = [c for c in record["choices"] if _contains(content, [t for t in normalize(c) if t not in _ARTICLES])]
        return len(named) == 1 and normalize(named[0]) == normalize(expected)
    raise ValueError(f"unknown answer_type {answer_type!r}; supported: yes_no, number, color, shape, choice, refusal")


def well_formed(record: dict, answer_text: str) -> bool:
    """Whether `answer_text` has the form of an answer to the question `record`, right or wrong: it declines, or it
    commits to exactly one value of the question's answer type (yes or no, one number, one color, one shape, one of
    the two candidates). Hedges, several values and empty answers are not well formed. Every answer `verify`
    accepts is well formed; for an unanswerable question any committed answer is (whether it should have declined
    is the verifier's call)."""
    if not isinstance(answer_text, str):
        return False
    tokens = normalize(answer_text)
    if not tokens:
        return False
    if is_refusal(answer_text):
        return True
    if _hedged(tokens):
        return False
    answer_type = record["answer_type"]
    if answer_type == "refusal":
        return True
    if answer_type == "yes_no":
        return _yes_no(answer_text, tokens) is not None
    if answer_type == "number":
        return len(_numbers(tokens)) == 1
    if _NEGATIONS.intersection(tokens):
        return False
    if answer_type == "color":
        return len({_COLOR_WORDS[t] for t in tokens if t in _COLOR_WORDS}) == 1
    if answer_type == "shape":
        return len({_SHAPE_WORDS[t] for t in tokens if t in _SHAPE_WORDS}) == 1
    if answer_type == "choice":
        content = [t for t in tokens if t not in _ARTICLES]
        return sum(_contains(content, [t for t in normalize(c) if t not in _ARTICLES]) for c in record["choices"]) == 1
    raise ValueError(f"unknown answer_type {answer_type!r}; supported: yes_no, number, color, shape, choice, refusal")
