"""Reading free-text questions back into question records: every generated question round-trips, and questions the
scene cannot answer beyond doubt are refused."""

import json

import pytest

from align.world import (
    CATEGORIES,
    REFUSAL,
    Scene,
    SceneObject,
    WorldConfig,
    generate_scene,
    image_rng,
    make_captions,
    make_questions,
    question_category,
    record_for_question,
    verify,
)

CONFIGS = {
    "default": WorldConfig(),
    # Other colors and shapes (white, diamond) and crowded scenes: many references need size, color and shape.
    "crowded": WorldConfig(max_objects=9, colors=["red", "blue", "white"], shapes=["circle", "diamond"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_generated_question_parses_back_to_its_record(name):
    config = CONFIGS[name]
    seen = set()
    for index in range(300):
        rng = image_rng(0, f"parse-{name}", index)
        scene = generate_scene(config, rng)
        make_captions(scene, rng)
        as_json = scene.to_json()
        for record in make_questions(scene, rng, config):
            assert record_for_question(as_json, record["question"], config) == record, record["question"]
            assert question_category(record["question"]) == record["category"]
            seen.add(record["category"])
    assert seen == set(CATEGORIES)


def test_scene_may_be_a_scene_its_dict_or_its_json():
    config = WorldConfig()
    rng = image_rng(0, "parse-forms", 0)
    scene = generate_scene(config, rng)
    record = make_questions(scene, rng, config)[0]
    for form in (scene, scene.to_dict(), json.loads(scene.to_json()), scene.to_json()):
        assert record_for_question(form, record["question"]) == record
    with pytest.raises(ValueError, match="scene must be"):
        record_for_question(42, record["question"])


@pytest.fixture()
def scene():
    """Four objects, spatial gap 3 px. Boxes (x0, y0, width): small red circle (4, 4, 11), large red circle
    (40, 4, 18), small blue square (4, 40, 11), large green triangle (20, 36, 18). The two circles are side by
    side; the small circle is above the square with the same x-extent; the square is left of the triangle with
    overlapping y-extents."""
    objects = [
        SceneObject(0, "circle", "red", "small", 4, 4, 11),
        SceneObject(1, "circle", "red", "large", 40, 4, 18),
        SceneObject(2, "square", "blue", "small", 4, 40, 11),
        SceneObject(3, "triangle", "green", "large", 20, 36, 18),
    ]
    return Scene(64, "gray", objects, 3)


@pytest.mark.parametrize(
    "question, answer, category",
    [
        ("What color is the large circle?", "red", "color"),
        ("what COLOR is the  small   square ?", "blue", "color"),
        ("What is the shape of the green object?", "triangle", "shape"),
        ("Which shape is the small blue object?", "square", "shape"),
        ("How many red circles are there?", "2", "count"),
        ("How many objects can you see?", "4", "count"),
        ("How many small objects are in the image?", "2", "count"),
        ("How many purple squares are there?", "0", "count"),
        ("Is there a green triangle?", "yes", "existence"),
        ("Does the image contain a large blue square?", "no", "existence"),
        ("Can you see an orange object?", "no", "existence"),
        ("Is the small red circle to the left of the large red circle?", "yes", "spatial"),
        ("Is the large red circle to the left of the small red circle?", "no", "spatial"),
        ("Is the small red circle above the blue square?", "yes", "spatial"),
        ("Is the blue square to the right of the green triangle?", "no", "spatial"),
        ("Which is further left, the large red circle or the small red circle?", "the small red circle", "spatial"),
        ("Which object is lower, the small red circle or the blue square?", "the blue square", "spatial"),
        ("What is the red circle made of?", REFUSAL, "unanswerable"),
        ("Who drew this picture?", REFUSAL, "unanswerable"),
    ],
)
def test_hand_questions_are_answered_from_the_scene(scene, question, answer, category):
    record = record_for_question(scene, question)
    assert record is not None
    assert (record["answer"], record["category"]) == (answer, category)
    assert verify(record, answer) and verify(record, record["answer_long"])


def test_a_no_to_a_spatial_question_names_the_opposite_relation(scene):
    record = record_for_question(scene, "Is the blue square to the right of the green triangle?")
    assert record["answer_long"] == "No, the blue square is to the left of the green triangle."
    assert record["objects"] == [2, 3] and record["relation"] == "right_of"


@pytest.mark.parametrize(
    "question",
    [
        # outside the grammar
        "",
        "What is the meaning of life?",
        "How big is the red circle?",
        "Is there a red circle or a blue square?",
        "What color is the circle red?",
        "How many red circle are there?",
        "Is there two circles?",
        "Which is further left, the blue square, the red circle?",
        # attribute values the world does not have (default colors and shapes)
        "What color is the pink circle?",
        "How many white objects are there?",
        "Is there a diamond?",
        "What is written on the huge circle?",
        # a reference that is not exactly one object
        "What color is the red circle?",
        "What shape is the large object?",
        "What color is the purple square?",
        "Is the circle to the left of the square?",
        "Which is higher, the orange circle or the blue square?",
        # the same object twice
        "Is the blue square above the small blue square?",
        # no clear-cut relation: same x-extent, overlapping y-extents
        "Is the small red circle to the left of the blue square?",
        "Which is further right, the small red circle or the blue square?",
        "Is the blue square above the green triangle?",
        "Which is lower, the blue square or the green triangle?",
    ],
)
def test_questions_the_scene_cannot_answer_give_none(scene, question):
    assert record_for_question(scene, question) is None


def test_the_world_config_decides_which_values_exist(scene):
    assert record_for_question(scene, "How many white objects are there?") is None
    config = WorldConfig(colors=["red", "blue", "green", "white"], shapes=["circle", "square", "triangle", "diamond"])
    assert record_for_question(scene, "How many white objects are there?", config)["answer"] == "0"
    assert record_for_question(scene, "Is there a diamond?", config)["answer"] == "no"


def test_question_category_needs_no_scene():
    assert question_category("Which object is higher, the red square or the blue circle?") == "spatial"
    assert question_category("How old is the red circle?") == "unanswerable"
    assert question_category("What is the meaning of life?") is None
