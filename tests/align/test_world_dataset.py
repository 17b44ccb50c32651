"""The shapes world on disk: build_world, its derived views and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from trl.data_utils import is_conversational, prepare_multimodal_messages

from align.world import (
    CATEGORIES,
    Scene,
    SceneObject,
    WorldConfig,
    build_world,
    caption_rows,
    make_example,
    object_documents,
    prompt_rows,
    question_rows,
    record_for_question,
    render,
    text_corpus,
    verify,
)

REPO = Path(__file__).resolve().parents[2]
SIZES = {"train": 12, "validation": 3, "test": 5}
WORLD_COLUMNS = ["image_id", "images", "scene", "caption", "caption_detailed", "questions", "messages"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    build_world(path, sizes=SIZES, config=WorldConfig(), seed=0)
    return datasets.load_from_disk(str(path))


def test_build_world_writes_the_documented_dataset(world):
    assert isinstance(world, datasets.DatasetDict)
    assert {split: len(ds) for split, ds in world.items()} == SIZES
    for split, ds in world.items():
        assert ds.column_names == WORLD_COLUMNS
        assert ds[0]["image_id"] == f"{split}-000000"
        for row in ds:
            (image,) = row["images"]
            assert image.size == (64, 64) and image.mode == "RGB"
            # PNG is lossless: the stored image is exactly the render of the stored scene graph.
            assert image.tobytes() == render(Scene.from_json(row["scene"])).tobytes()
            questions = json.loads(row["questions"])
            assert 6 <= len(questions) <= 12
            assert {q["category"] for q in questions} <= set(CATEGORIES)
            messages = row["messages"]
            assert 2 <= len(messages) // 2 <= 4
            assert messages[0]["content"][0] == {"type": "image", "text": None}
            answers = {q["question"]: q["answer"] for q in questions}
            for user, assistant in zip(messages[::2], messages[1::2]):
                assert (user["role"], assistant["role"]) == ("user", "assistant")
                assert assistant["content"] == [{"type": "text", "text": answers[user["content"][-1]["text"]]}]
    scenes = {split: set(ds["scene"]) for split, ds in world.items()}
    assert not scenes["train"] & scenes["validation"] and not scenes["train"] & scenes["test"]


def test_any_row_regenerates_alone(world):
    row = world["train"][7]
    alone = make_example("train", 7, seed=0)
    assert alone["image_id"] == row["image_id"] == "train-000007"
    assert alone["images"][0].tobytes() == row["images"][0].tobytes()
    for column in ("scene", "caption", "caption_detailed", "questions", "messages"):
        assert alone[column] == row[column]


def test_build_is_deterministic(tmp_path):
    a = build_world(tmp_path / "a", sizes={"train": 4}, seed=5)
    b = build_world(None, sizes={"train": 4}, seed=5)
    assert a["train"]["questions"] == b["train"]["questions"]
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="sizes"):
        build_world(None, sizes={"train": -1})


def test_prompt_rows(world):
    ds = world["test"]
    prompts = prompt_rows(ds)
    total = sum(len(json.loads(q)) for q in ds["questions"])
    assert len(prompts) == total
    assert prompts.column_names == ["images", "prompt", "answer", "category", "record", "image_id"]
    images = {row["image_id"]: row["images"][0].tobytes() for row in ds}
    for row in prompts:
        record = json.loads(row["record"])
        assert row["prompt"] == [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": record["question"]}]}
        ]
        assert row["answer"] == record["answer"] and row["category"] == record["category"]
        assert verify(record, row["answer"])
        assert row["images"][0].tobytes() == images[row["image_id"]]
        assert is_conversational(row)
    spatial = prompt_rows(ds, categories=["spatial", "count"])
    assert set(spatial["category"]) == {"spatial", "count"}
    assert len(spatial) == sum(c in ("spatial", "count") for c in prompts["category"])
    with pytest.raises(ValueError, match="categories"):
        prompt_rows(ds, categories=["colour"])
    per_split = prompt_rows(world)
    assert isinstance(per_split, datasets.DatasetDict) and len(per_split["test"]) == total


def test_a_slice_of_prompts_expands_only_the_images_it_needs(tmp_path, monkeypatch):
    """Rejection sampling's and GRPO's prompts (`align.prompts.load_prompts`): a slice of a world's questions, of
    some categories or all, is the slice of every question expanded, made from the first images alone."""
    import align.prompts
    from align.evaluation import load_eval_questions

    path = tmp_path / "world"
    build_world(path, sizes={"train": 40}, seed=0)
    everything = load_eval_questions(path, split="train")
    expanded = []
    monkeypatch.setattr(align.prompts, "prompt_rows", lambda ds, categories: expanded.append(len(ds)) or prompt_rows(ds, categories))
    for offset, number, categories in ((0, 5, None), (7, 20, ["count", "spatial"]), (3, 10, ["spatial"])):
        expanded.clear()
        rows = align.prompts.load_prompts(path, offset=offset, num_prompts=number, categories=categories)
        wanted = everything if categories is None else everything.filter(lambda c, kept=tuple(categories): c in kept, input_columns="category")
        assert rows.to_list() == wanted.select(range(offset, offset + number)).to_list()
        assert expanded[-1] < 40
    assert len(align.prompts.load_prompts(path, offset=2)) == len(everything) - 2
    with pytest.raises(ValueError, match="no prompts from offset"):
        align.prompts.load_prompts(path, offset=len(everything))


def test_question_rows_hold_every_question_once_as_conversations(world):
    ds = world["train"]
    rows = question_rows(ds, max_turns=3)
    assert rows.column_names == ["images", "messages", "image_id"]
    images = {row["image_id"]: row["images"][0].tobytes() for row in ds}
    asked = {}
    for row in rows:
        messages = row["messages"]
        assert 2 <= len(messages) <= 6 and is_conversational(row)
        assert messages[0]["content"][0] == {"type": "image", "text": None}
        assert all(item["type"] == "text" for message in messages[1:] for item in message["content"])
        assert row["images"][0].tobytes() == images[row["image_id"]]
        for user, assistant in zip(messages[::2], messages[1::2]):
            asked.setdefault(row["image_id"], []).append((user["content"][-1]["text"], assistant["content"][0]["text"]))
    for image_id, questions in zip(ds["image_id"], ds["questions"]):
        records = json.loads(questions)
        assert sorted(asked[image_id]) == sorted((r["question"], r["answer"]) for r in records)
    only = question_rows(ds, categories=["count"])
    assert len(only) == sum(any(json.loads(q)[i]["category"] == "count" for i in range(len(json.loads(q)))) for q in ds["questions"])
    assert question_rows(ds, max_turns=3)["messages"] == rows["messages"]  # seeded by the image id
    with pytest.raises(ValueError, match="categories"):
        question_rows(ds, categories=["colour"])
    with pytest.raises(ValueError, match="max_turns"):
        question_rows(ds, max_turns=0)


def test_caption_rows(world):
    ds = world["validation"]
    for detailed, column in ((True, "caption_detailed"), (False, "caption")):
        rows = caption_rows(ds, detailed=detailed)
        assert rows.column_names == ["images", "messages", "caption", "scene"]
        assert rows["caption"] == ds[column]
        assert rows["scene"] == ds["scene"]
        for row, source in zip(rows, ds):
            user, assistant = row["messages"]
            assert user["role"] == "user" and user["content"][0] == {"type": "image", "text": None}
            assert user["content"][1]["type"] == "text" and user["content"][1]["text"]
            assert assistant == {"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]}
            assert row["images"][0].tobytes() == source["images"][0].tobytes()
            assert is_conversational(row)


def test_messages_fit_trl(world):
    row = world["train"][0]
    assert is_conversational(row)
    filled = prepare_multimodal_messages(row["messages"], row["images"])
    assert filled[0]["content"][0]["image"] is row["images"][0]
    assert sum(item["type"] == "image" for m in filled for item in m["content"]) == 1


def test_text_corpus(world):
    ds = world["train"]
    docs = text_corpus(ds)
    assert len(docs) == 2 * len(ds) and all(isinstance(d, str) for d in docs)
    for row, document, short in zip(ds, docs[::2], docs[1::2]):
        lines = document.split("\n")
        assert lines[0] == row["caption_detailed"] and short == row["caption"]
        questions = json.loads(row["questions"])
        assert lines[1:] == [f"Question: {q['question']} Answer: {q['answer']}" for q in questions]
    assert len(text_corpus(world)) == 2 * sum(SIZES.values())


def test_object_documents_answer_from_the_description(world):
    ds = world["train"]
    docs = object_documents(ds)
    objects = [o for scene in ds["scene"] for o in json.loads(scene)["objects"]]
    assert len(docs) == len(objects) and docs == object_documents(ds)  # one per object, deterministic
    for obj, document in zip(objects, docs):
        description, color_line, shape_line = document.split("\n")
        assert description == f"a {obj['size']} {obj['color']} {obj['shape']}."
        # Each question names the other attribute, and its answer is the one word of the description it asks for.
        assert obj["shape"] in color_line.split(" Answer: ")[0] and color_line.endswith(f"Answer: {obj['color']}")
        assert obj["color"] in shape_line.split(" Answer: ")[0] and shape_line.endswith(f"Answer: {obj['shape']}")
        # The world's own parser reads the question back, answered from a scene of that one object.
        fields = {key: obj[key] for key in ("id", "shape", "color", "size", "x0", "y0", "width")}
        scene = Scene(image_size=64, background="gray", spatial_px=3, objects=[SceneObject(**fields)])
        question = color_line.split(" Answer: ")[0].removeprefix("Question: ")
        assert record_for_question(scene, question)["answer"] == obj["color"]


def run_cli(*args):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "align.world", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_cli_builds_and_summarises(tmp_path):
    result = run_cli("--output", str(tmp_path / "w"), "--train", "6", "--validation", "2", "--test", "2",
                     "--seed", "1", "--image_size", "48")
    assert result.returncode == 0, result.stderr
    assert "train: 6 images" in result.stdout and "existence" in result.stdout
    world = datasets.load_from_disk(str(tmp_path / "w"))
    assert len(world["validation"]) == 2 and world["train"][0]["images"][0].size == (48, 48)
    bad = run_cli("--output", str(tmp_path / "x"), "--min_objects", "5", "--max_objects", "2")
    assert bad.returncode != 0 and "max_objects" in bad.stderr
