"""The shapes world generator: determinism, answers re-derived from the scene graph, the verifier, rendering."""

import itertools
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from align.world import (
    CATEGORIES,
    COLORS,
    REFUSAL,
    SHAPES,
    Scene,
    SceneObject,
    WorldConfig,
    generate_scene,
    image_rng,
    make_captions,
    make_conversation,
    make_example,
    make_questions,
    render,
    verify,
)
from align.world.language import NUMBER_WORDS
from align.world.scene import place_boxes

REPO = Path(__file__).resolve().parents[2]

# The scene graph read back from JSON, as a test would see it from the dataset; answers below are
# recomputed from it with the test's own parsing, not with the generator's helpers.
SIZE_RE = "small|large"
COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES) + "|object"
REF_RE = rf"(?:({SIZE_RE}) )?(?:({COLOR_RE}) )?({SHAPE_RE})"


def scenes_with_questions(count, seed=0, config=None):
    config = config or WorldConfig()
    for index in range(count):
        rng = image_rng(seed, "test-suite", index)
        scene = generate_scene(config, rng)
        make_captions(scene, rng)
        yield json.loads(scene.to_json()), make_questions(scene, rng, config)


def parse_ref(size, color, shape):
    return {k: v for k, v in (("size", size), ("color", color), ("shape", None if shape == "object" else shape)) if v}


def matching(scene, query):
    return [o for o in scene["objects"] if all(o[k] == v for k, v in query.items())]


def the_one(scene, query):
    found = matching(scene, query)
    assert len(found) == 1, f"reference {query} picks {len(found)} objects"
    return found[0]


def assert_shortest(scene, query, allowed, required=()):
    """No description with fewer of the `allowed` attributes (always with the `required` ones) picks
    the same single object."""
    obj = the_one(scene, query)
    assert set(required) <= set(query) <= set(allowed)
    for k in range(1, len(query)):
        for subset in itertools.combinations(allowed, k):
            if set(required) <= set(subset) and len(matching(scene, {a: obj[a] for a in subset})) == 1:
                pytest.fail(f"{query} is not the shortest reference: {subset} already names the object")


def separated(a, b, predicate, gap):
    """a <predicate> b with at least `gap` pixels between the boxes on that axis."""
    ax0, ay0, ax1, ay1 = a["bbox"]
    bx0, by0, bx1, by1 = b["bbox"]
    return {
        "left_of": ax1 + gap <= bx0,
        "right_of": bx1 + gap <= ax0,
        "above": ay1 + gap <= by0,
        "below": by1 + gap <= ay0,
    }[predicate]


def derive_answer(scene, record):
    """The answer to `record["question"]` computed from the scene graph by the test's own reading."""
    q, gap = record["question"], scene["spatial_px"]
    if record["category"] == "color":
        m = re.fullmatch(rf"(?:What color is|What is the color of|Which color is) the {REF_RE}\?", q)
        query = parse_ref(*m.groups())
        assert "color" not in query
        assert_shortest(scene, query, ("size", "shape"))
        return the_one(scene, query)["color"]
    if record["category"] == "shape":
        m = re.fullmatch(rf"(?:What shape is|What is the shape of|Which shape is) the {REF_RE}\?", q)
        query = parse_ref(*m.groups())
        assert "shape" not in query
        assert_shortest(scene, query, ("size", "color"))
        return the_one(scene, query)["shape"]
    if record["category"] == "count":
        m = re.fullmatch(rf"How many {REF_RE}s (?:are there|are in the image|can you see)\?", q)
        return str(len(matching(scene, parse_ref(*m.groups()))))
    if record["category"] == "existence":
        m = re.fullmatch(rf"(?:Is there|Can you see|Does the image contain) an? {REF_RE}(?: in the image)?\?", q)
        return "yes" if matching(scene, parse_ref(*m.groups())) else "no"
    if record["category"] == "spatial":
        words = {"to the left of": "left_of", "to the right of": "right_of", "above": "above", "below": "below"}
        m = re.fullmatch(rf"Is the {REF_RE} (to the left of|to the right of|above|below) the {REF_RE}\?", q)
        if m:
            g = m.groups()
            x, y = parse_ref(*g[:3]), parse_ref(*g[4:])
            for query in (x, y):
                assert_shortest(scene, query, ("size", "color", "shape"), required=("color", "shape"))
            predicate = words[g[3]]
            a, b = the_one(scene, x), the_one(scene, y)
            opposite = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}[predicate]
            assert separated(a, b, predicate, gap) or separated(a, b, opposite, gap), f"ambiguous gap: {q}"
            return "yes" if separated(a, b, predicate, gap) else "no"
        m = re.fullmatch(rf"Which (?:object )?is (further left|further right|higher|lower), the {REF_RE} or the {REF_RE}\?", q)
        g = m.groups()
        x, y = parse_ref(*g[1:4]), parse_ref(*g[4:])
        for query in (x, y):
            assert_shortest(scene, query, ("size", "color", "shape"), required=("color", "shape"))
        a, b = the_one(scene, x), the_one(scene, y)
        predicate = {"further left": "left_of", "further right": "right_of", "higher": "above", "lower": "below"}[g[0]]
        opposite = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}[predicate]
        assert separated(a, b, predicate, gap) or separated(a, b, opposite, gap), f"ambiguous gap: {q}"
        return "the " + " ".join(w for w in (g[1:4] if separated(a, b, predicate, gap) else g[4:]) if w)
    if record["category"] == "unanswerable":
        m = re.search(rf"the {REF_RE}", q)
        if m:
            the_one(scene, parse_ref(*m.groups()))
        return REFUSAL
    raise AssertionError(f"unknown category {record['category']}")


def wrong_answers(record):
    """Every other answer of the record's type, short and as a sentence."""
    answer, kind = record["answer"], record["answer_type"]
    if kind == "color":
        return [c for c in COLORS if c != answer] + [f"It is {c}." for c in COLORS if c != answer]
    if kind == "shape":
        return [s for s in SHAPES if s != answer] + [f"It is a {s}." for s in SHAPES if s != answer]
    if kind == "number":
        others = [n for n in range(11) if str(n) != answer]
        return [str(n) for n in others] + [f"There are {NUMBER_WORDS[n]}." for n in others]
    if kind == "yes_no":
        flipped = "no" if answer == "yes" else "yes"
        return [flipped, flipped.capitalize() + ".", f"{flipped.capitalize()}, it is."]
    if kind == "choice":
        other = next(c for c in record["choices"] if c != answer)
        return [other, f"{other.capitalize()}.", f"{other} or {answer}"]
    if kind == "refusal":
        return ["red", "yes", "2", "the red circle", "It is made of wood."]
    raise AssertionError(kind)


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_world_and_splits_differ():
    a = [make_example("train", i, seed=3) for i in range(8)]
    b = [make_example("train", i, seed=3) for i in range(8)]
    for x, y in zip(a, b):
        assert x["images"][0].tobytes() == y["images"][0].tobytes()
        assert {k: v for k, v in x.items() if k != "images"} == {k: v for k, v in y.items() if k != "images"}
    other_split = {make_example("validation", i, seed=3)["scene"] for i in range(8)}
    other_seed = {make_example("train", i, seed=4)["scene"] for i in range(8)}
    scenes = {x["scene"] for x in a}
    assert not scenes & other_split
    assert not scenes & other_seed


def test_determinism_does_not_depend_on_hash_seed():
    # Set iteration order changes with PYTHONHASHSEED; the generator must never depend on it.
    code = "from align.world import make_example as m; import json; print(json.dumps([m('train', i)['questions'] for i in range(5)]))"
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        for hash_seed in ("1", "2")
    ]
    outputs = {run.communicate()[0] for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(outputs) == 1


# --- questions -----------------------------------------------------------------------------------


def test_every_answer_rederived_from_scene_and_unique_under_verify():
    seen = Counter()
    for scene, questions in scenes_with_questions(300):
        assert scene["spatial_px"] == 3  # 5% of 64 px: the least gap that makes "left of" beyond doubt
        assert 6 <= len(questions) <= 12
        assert len({q["question"] for q in questions}) == len(questions)
        for record in questions:
            json.dumps(record)
            seen[record["category"]] += 1
            assert record["answer"] == derive_answer(scene, record), record
            assert verify(record, record["answer"]), record
            assert verify(record, record["answer_long"]), record
            for wrong in wrong_answers(record):
                assert not verify(record, wrong), (record, wrong)
            if record["answer_type"] != "refusal":
                assert not verify(record, REFUSAL)
    assert set(seen) == set(CATEGORIES)


def test_questions_rederived_for_a_non_default_world():
    config = WorldConfig(image_size=96, min_objects=4, max_objects=9, colors=["red", "white", "black"],
                         shapes=["circle", "diamond"], background="gray")
    for scene, questions in scenes_with_questions(60, seed=1, config=config):
        for record in questions:
            assert record["answer"] == derive_answer(scene, record), record
            assert verify(record, record["answer"]) and verify(record, record["answer_long"])


def test_existence_half_absent_and_count_includes_zero():
    answers, counts = Counter(), Counter()
    for _, questions in scenes_with_questions(200, seed=2):
        existence = [q["answer"] for q in questions if q["category"] == "existence"]
        assert sorted(existence) == ["no", "yes"]
        answers.update(existence)
        counts.update(q["answer"] for q in questions if q["category"] == "count")
    assert answers["yes"] == answers["no"] == 200
    assert counts["0"] > 0.1 * sum(counts.values())
    assert {str(n) for n in range(7)} <= set(counts)


def test_spatial_questions_only_with_a_clear_gap():
    config = WorldConfig()
    # Diagonal neighbours whose boxes are closer than spatial_px on both axes: nothing to ask.
    close = Scene(64, "gray", [SceneObject(0, "circle", "red", "small", 10, 10, 11),
                               SceneObject(1, "square", "blue", "small", 23, 23, 11)], config.spatial_px)
    far = Scene(64, "gray", [SceneObject(0, "circle", "red", "small", 5, 5, 11),
                             SceneObject(1, "square", "blue", "small", 40, 8, 11)], config.spatial_px)


    close_spatial = [q for s in range(30) for q in make_questions(close, random.Random(s)) if q["category"] == "spatial"]
    far_spatial = [q for s in range(30) for q in make_questions(far, random.Random(s)) if q["category"] == "spatial"]
    assert close_spatial == []
    assert far_spatial and all(q["relation"] in {"left_of", "right_of", "further_left", "further_right"} for q in far_spatial)
    which = [q for q in far_spatial if q["answer_type"] == "choice"]
    assert which and all(
        q["answer"] == ("the red circle" if q["relation"] == "further_left" else "the blue square") for q in which
    )


def test_conversation_mixes_categories_and_starts_with_the_image():
    for _, questions in scenes_with_questions(50, seed=5):


        messages = make_conversation(questions, random.Random(0))
        assert 4 <= len(messages) <= 8 and len(messages) % 2 == 0
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert messages[0]["content"][0] == {"type": "image", "text": None}
        assert all(item["type"] == "text" for m in messages[1:] for item in m["content"])
        by_question = {q["question"]: q for q in questions}
        asked = [m["content"][-1]["text"] for m in messages[::2]]
        assert len(set(asked)) == len(asked)
        for question, reply in zip(asked, messages[1::2]):
            assert reply["content"][0]["text"] == by_question[question]["answer"]
        categories = {by_question[q]["category"] for q in asked}
        assert len(categories) == min(len(asked), len({q["category"] for q in questions}))


def test_captions_name_every_object():
    for scene, _ in scenes_with_questions(50, seed=6):
        rng = image_rng(6, "captions", 0)
        short, detailed = make_captions(Scene.from_dict(scene), rng)
        for obj in scene["objects"]:
            assert f"{obj['color']} {obj['shape']}" in short
            assert f"{obj['size']} {obj['color']} {obj['shape']}" in detailed
        assert detailed.count(" at the ") + detailed.count(" on the ") + detailed.count(" in the center") == len(scene["objects"])


# --- verifier ------------------------------------------------------------------------------------

COLOR_Q = {"category": "color", "question": "What color is the circle?", "answer": "red", "answer_type": "color", "choices": []}
SHAPE_Q = {"category": "shape", "question": "What shape is the red object?", "answer": "circle", "answer_type": "shape", "choices": []}
COUNT_Q = {"category": "count", "question": "How many circles are there?", "answer": "2", "answer_type": "number", "choices": []}
ZERO_Q = {"category": "count", "question": "How many squares are there?", "answer": "0", "answer_type": "number", "choices": []}
YES_Q = {"category": "existence", "question": "Is there a red circle?", "answer": "yes", "answer_type": "yes_no", "choices": []}
NO_Q = {"category": "existence", "question": "Is there a blue square?", "answer": "no", "answer_type": "yes_no", "choices": []}
WHICH_Q = {"category": "spatial", "question": "Which is higher, the red circle or the large blue square?",
           "answer": "the red circle", "answer_type": "choice", "choices": ["the red circle", "the large blue square"]}
REFUSE_Q = {"category": "unanswerable", "question": "What is written on the red square?", "answer": REFUSAL,
            "answer_type": "refusal", "choices": []}

VERIFIER_CASES = [
    (COLOR_Q, "red", True), (COLOR_Q, "Red.", True), (COLOR_Q, "The circle is red.", True), (COLOR_Q, "RED!", True),
    (COLOR_Q, "It is red or blue", False), (COLOR_Q, "The circle is red and blue.", False), (COLOR_Q, "blue", False),
    (COLOR_Q, "It is not red.", False), (COLOR_Q, "Maybe red.", False), (COLOR_Q, "pink", False),
    (COLOR_Q, "reddish", False), (COLOR_Q, "", False), (COLOR_Q, "I can't tell.", False),
    (SHAPE_Q, "circle", True), (SHAPE_Q, "A circle.", True), (SHAPE_Q, "The red object is a circle.", True),
    (SHAPE_Q, "square", False), (SHAPE_Q, "a circle or a square", False), (SHAPE_Q, "It's a rectangle.", False),
    (COUNT_Q, "2", True), (COUNT_Q, "two", True), (COUNT_Q, "Two.", True), (COUNT_Q, "There are two circles.", True),
    (COUNT_Q, "There are 2 circles.", True), (COUNT_Q, "2 or 3", False), (COUNT_Q, "three", False),
    (COUNT_Q, "There are 3 circles.", False), (COUNT_Q, "Probably two.", False), (COUNT_Q, "many", False),
    (ZERO_Q, "0", True), (ZERO_Q, "zero", True), (ZERO_Q, "There are no squares.", True), (ZERO_Q, "None.", True),
    (ZERO_Q, "one", False),
    (YES_Q, "yes", True), (YES_Q, "Yes, there is.", True), (YES_Q, "YES!", True), (YES_Q, "yes there is", True),
    (YES_Q, "No.", False), (YES_Q, "Yes, there is not.", False), (YES_Q, "Maybe yes.", False),
    (YES_Q, "yes or no", False), (YES_Q, "There is a red circle.", False),
    (NO_Q, "no", True), (NO_Q, "No, there isn't.", True), (NO_Q, "There is no blue square.", True),
    (NO_Q, "No, it is not visible.", True), (NO_Q, "Yes.", False), (NO_Q, "No way to know.", False),
    (NO_Q, "I cannot tell.", False), (NO_Q, "Perhaps not.", False),
    (WHICH_Q, "the red circle", True), (WHICH_Q, "The red circle.", True), (WHICH_Q, "red circle", True),
    (WHICH_Q, "The red circle is higher.", True), (WHICH_Q, "the large blue square", False),
    (WHICH_Q, "the red circle or the large blue square", False), (WHICH_Q, "the blue square", False),
    (WHICH_Q, "The red circle is not higher.", False), (WHICH_Q, "the circle", False),
    (REFUSE_Q, "The image does not show that.", True), (REFUSE_Q, "I can't tell from the image.", True),
    (REFUSE_Q, "It is not possible to tell.", True), (REFUSE_Q, "Unanswerable.", True),
    (REFUSE_Q, "There is no way to know.", True), (REFUSE_Q, "The writing is not visible.", True),
    (REFUSE_Q, "CANNOT TELL", True), (REFUSE_Q, "hello", False), (REFUSE_Q, "It says hello.", False),
    (REFUSE_Q, "red", False), (REFUSE_Q, "no", False),
]


@pytest.mark.parametrize("record, answer, expected", VERIFIER_CASES)
def test_verifier_table(record, answer, expected):
    assert verify(record, answer) is expected


def test_verifier_accepts_every_number_word():
    for n, word in enumerate(NUMBER_WORDS):
        record = dict(COUNT_Q, answer=str(n))
        assert verify(record, word) and verify(record, str(n)) and verify(record, f"I count {word}.")
        assert not verify(record, NUMBER_WORDS[(n + 1) % len(NUMBER_WORDS)])


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, small, large",
    [
        (WorldConfig(), 11, 18),
        (WorldConfig(image_size=40, colors=["white", "red", "green"], shapes=["diamond", "circle"], background="black"), 7, 11),
    ],
)
def test_rendered_pixels_match_the_scene_graph(config, small, large):
    background, size = COLORS[config.background], config.image_size
    for scene, _ in scenes_with_questions(100, seed=7, config=config):
        image = render(Scene.from_dict(scene))
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = image.load()
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            width = x1 - x0
            assert width == (large if obj["size"] == "large" else small)
            assert pixels[x0 + width // 2, y0 + width // 2] == COLORS[obj["color"]]
            inside = {pixels[x, y] for x in range(x0, x1) for y in range(y0, y1)}
            assert inside <= {COLORS[obj["color"]], background}
            # Filled: a square covers its box, a circle or triangle most of it.
            share = sum(pixels[x, y] == COLORS[obj["color"]] for x in range(x0, x1) for y in range(y0, y1)) / width**2
            assert share > {"square": 0.99, "circle": 0.7, "triangle": 0.4, "diamond": 0.4}[obj["shape"]]
        for x, y in itertools.product(range(size), range(size)):
            if not any(o["bbox"][0] <= x < o["bbox"][2] and o["bbox"][1] <= y < o["bbox"][3] for o in scene["objects"]):
                assert pixels[x, y] == background


def test_objects_do_not_touch_and_stay_inside():
    config = WorldConfig()
    for scene, _ in scenes_with_questions(200, seed=8):
        boxes = [o["bbox"] for o in scene["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert config.margin_px <= min(x0, y0) and max(x1, y1) <= 64 - config.margin_px
        for a, b in itertools.combinations(boxes, 2):
            apart_x = a[2] + config.gap_px <= b[0] or b[2] + config.gap_px <= a[0]
            apart_y = a[3] + config.gap_px <= b[1] or b[3] + config.gap_px <= a[1]
            assert apart_x or apart_y


# --- bad parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": -2}, "min_objects"),
        ({"max_objects": 0}, "max_objects"),
        ({"min_objects": 4, "max_objects": 3}, "max_objects"),
        ({"max_objects": 11}, "max_objects"),
        ({"colors": ["red", "teal"]}, "colors"),
        ({"colors": ["red"]}, "colors"),
        ({"colors": []}, "colors"),
        ({"shapes": ["circle", "hexagon"]}, "shapes"),
        ({"shapes": []}, "shapes"),
        ({"background": "red"}, "background"),
        ({"background": "mauve"}, "background"),
        ({"image_size": 16}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 32, "max_objects": 10}, "image_size"),
        ({"image_size": 40, "max_objects": 10, "large_frac": 0.35}, "max_objects"),
        ({"small_frac": 0.3, "large_frac": 0.2}, "small_frac"),
        ({"large_frac": 0.18}, "large_frac"),
        ({"min_turns": 0}, "min_turns"),
        ({"min_turns": 3, "max_turns": 2}, "max_turns"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WorldConfig(**kwargs)


def test_placement_gives_up_clearly():


    assert place_boxes([30, 30, 30, 30, 30], 64, 2, 1, random.Random(0)) is None
    config = WorldConfig(min_objects=6, max_objects=6)
    # Past validation: objects this large cannot all be placed, so every attempt fails.
    config.small_frac, config.large_frac = 0.4, 0.45
    with pytest.raises(ValueError, match="could not place 6 objects.*max_objects"):
        generate_scene(config, random.Random(0))


# A yes/no spatial question whose two objects share their shape: the names differ only in color.
ABOVE_Q = {"category": "spatial", "question": "Is the red square above the orange square?", "answer": "no",
           "answer_type": "yes_no", "choices": [], "relation": "above"}


@pytest.mark.parametrize("answer, holds, follows, right, strict", [
    ("The orange square is higher, so no.", True, True, True, True),  # the reasoned answer itself
    ("The red square is higher, so yes.", False, True, False, False),  # false reason, followed
    ("The red square is higher, so no.", False, False, True, False),  # a lucky no after a false reason
    ("The orange square is higher, so yes.", True, False, False, False),  # a true reason, not followed
    ("The orange square is lower, so no.", False, True, True, False),  # the relation's words wrong
    ("The blue circle is higher, so no.", False, False, True, False),  # names neither object
    ("no", True, None, True, True),  # states no reason: nothing to check
])
def test_verifier_checks_a_stated_reason_when_asked(answer, holds, follows, right, strict):
    from align.world import reasoned_answer
    from align.world.verify import conclusion_follows, reason_holds, stated_reason

    assert reasoned_answer(ABOVE_Q) == "The orange square is higher, so no."
    assert reason_holds(ABOVE_Q, answer) is holds
    assert conclusion_follows(ABOVE_Q, answer) is follows
    assert verify(ABOVE_Q, answer) is right  # evaluation reads the yes/no alone
    assert verify(ABOVE_Q, answer, reasons=True) is strict
    assert (stated_reason(answer) is None) == (follows is None)


def test_reasons_are_checked_only_where_a_question_has_them():
    from align.world.verify import conclusion_follows, reason_holds

    # "The red circle is higher." answers a "which" question; there is no yes/no reason to hold it to.
    assert verify(WHICH_Q, "The red circle is higher.", reasons=True)
    assert reason_holds(YES_Q, "The red circle is higher, so yes.") and conclusion_follows(YES_Q, "yes") is None
