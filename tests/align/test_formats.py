"""Local dataset formats converted to TRL's conversational format, with bad rows set aside and reported."""

import io
import json
import logging

import datasets
import PIL.Image
import pytest
from datasets import Dataset, DatasetDict

from align.data import KIND_FEATURES, detect_format, load_dataset_local, validate_rows
from align.world import build_world

IMAGE = {"type": "image", "text": None}


def text(t):
    return {"type": "text", "text": t}


def user(*items):
    return {"role": "user", "content": list(items)}


def assistant(t):
    return {"role": "assistant", "content": [text(t)]}


def save_png(path, mode="RGB", size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 30, 30), "L": 128, "P": 3, "RGBA": (10, 20, 30, 128)}[mode]
    PIL.Image.new(mode, size, color).save(path)
    return path


def save_corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a png")
    return path


def save_truncated(path):
    buffer = io.BytesIO()
    PIL.Image.effect_noise((32, 32), 50).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:200])
    return path


def write_json(path, rows, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return path


def read_rejects(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def brief(rejects):
    return [(r["row"], r["id"], r["reason"]) for r in rejects]


@pytest.fixture
def llava(tmp_path):
    root = tmp_path / "llava"
    save_png(root / "images" / "rgb.png", "RGB")
    save_png(root / "images" / "gray.png", "L", size=(5, 7))
    save_png(root / "images" / "palette.png", "P")
    save_png(root / "images" / "alpha.png", "RGBA")
    save_corrupt(root / "images" / "corrupt.png")
    save_truncated(root / "images" / "truncated.png")
    outside = save_png(tmp_path / "outside.png")

    def row(i, image, turns):
        record = {"id": f"r{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}
        if image is not None:
            record["image"] = image
        return record

    rows = [
        row(0, "images/rgb.png", [("human", "<image>\nWhat color is it?"), ("gpt", "Red."), ("human", "Sure?"), ("gpt", "Yes.")]),
        row(1, "images/gray.png", [("human", "How many circles?"), ("gpt", "Two.")]),
        row(2, "images/palette.png", [("human", "Describe this.\n<image>"), ("gpt", "A square.")]),
        row(3, "images/missing.png", [("human", "<image>\nWhat?"), ("gpt", "A.")]),
        row(4, "images/corrupt.png", [("human", "<image>\nWhat?"), ("gpt", "A.")]),
        row(5, "../outside.png", [("human", "<image>\nWhat?"), ("gpt", "A.")]),
        row(6, "images/rgb.png", [("human", "<image> and <image>: same?"), ("gpt", "No.")]),
        row(7, "images/rgb.png", [("human", "<image>\nWhat?"), ("gpt", "  ")]),
        {"id": "r8", "image": "images/rgb.png"},
        row(9, None, [("human", "Say hi."), ("gpt", "Hi.")]),
        row(10, str(outside), [("human", "<image>\nWhat?"), ("gpt", "A.")]),
        row(11, "images/alpha.png", [("system", "Be brief."), ("human", "<image>Shape?"), ("gpt", "A square.")]),
        row(12, "images/truncated.png", [("human", "<image>\nWhat?"), ("gpt", "A.")]),
        row(13, None, [("human", "<image>\nWhat?"), ("gpt", "A.")]),
        row(14, "images/rgb.png", [("human", "<image>\nWhat?"), ("alien", "A.")]),
    ]
    return write_json(root / "llava_instruct.json", rows)


def test_llava_rows_are_converted_exactly_and_bad_rows_rejected(llava, tmp_path, caplog):
    rejects_path = tmp_path / "out" / "rejects.jsonl"
    with caplog.at_level(logging.WARNING, logger="align.data.formats"):
        ds, report = load_dataset_local(llava, kind="sft", rejects_path=rejects_path)

    assert ds.features == KIND_FEATURES["sft"] and ds.column_names == ["images", "messages"]
    assert ds["messages"] == [
        [user(IMAGE, text("What color is it?")), assistant("Red."), user(text("Sure?")), assistant("Yes.")],
        [user(IMAGE, text("How many circles?")), assistant("Two.")],  # no tag: the image goes first
        [user(text("Describe this."), IMAGE), assistant("A square.")],  # the tag's place is kept
        [user(text("Say hi.")), assistant("Hi.")],  # text-only rows stay, with no image
        [{"role": "system", "content": [text("Be brief.")]}, user(IMAGE, text("Shape?")), assistant("A square.")],
    ]
    # Grayscale, palette and RGBA images load as they are; the processor converts them later.
    modes = [[(image.mode, image.size) for image in images] for images in ds["images"]]
    assert modes == [[("RGB", (8, 6))], [("L", (5, 7))], [("P", (8, 6))], [], [("RGBA", (8, 6))]]

    expected = [
        (3, "r3", "missing image"),
        (4, "r4", "corrupt image"),
        (5, "r5", "image outside root"),
        (6, "r6", "image count mismatch"),
        (7, "r7", "empty answer"),
        (8, "r8", "missing field"),
        (10, "r10", "image outside root"),
        (12, "r12", "corrupt image"),
        (13, "r13", "image count mismatch"),
        (14, "r14", "malformed row"),
    ]
    assert brief(report.rejects) == expected
    assert brief(read_rejects(rejects_path)) == expected
    assert {r["source"] for r in read_rejects(rejects_path)} == {str(llava)}
    assert report.total == 15 and report.kept == 5
    assert report.counts == {
        "image outside root": 2, "corrupt image": 2, "image count mismatch": 2, "missing image": 1,
        "empty answer": 1, "missing field": 1, "malformed row": 1,
    }
    assert "skipped 10 of 15 rows (2 corrupt image, 2 image outside root, 2 image count mismatch, 1 missing image" in caplog.text
    assert f"see {rejects_path}" in caplog.text


def test_image_root_overrides_the_data_folder(tmp_path):
    save_png(tmp_path / "pictures" / "a.png")
    data = write_json(
        tmp_path / "data" / "rows.json",
        [{"id": 0, "image": "a.png", "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}]}],
    )
    with pytest.raises(ValueError, match="missing image"):
        load_dataset_local(data)
    ds, report = load_dataset_local(data, image_root=tmp_path / "pictures")
    assert len(ds) == 1 and report.rejects == []
    assert ds[0]["images"][0].size == (8, 6)


def test_sharegpt_messages_and_conversations(tmp_path):
    save_png(tmp_path / "a.png", "RGB")
    save_png(tmp_path / "b.png", "P")
    rows = [
        {"messages": [{"role": "user", "content": "<image><image>Which is red?"}, {"role": "assistant", "content": "The first."}],
         "images": ["a.png", "b.png"], "system": "Answer briefly."},
        {"conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."}], "images": ["b.png"]},
        {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "Left."}],
         "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": ""}], "images": ["a.png"]},
    ]
    path = write_json(tmp_path / "sharegpt.jsonl", rows, jsonl=True)
    assert detect_format(path) == "sharegpt"
    ds, report = load_dataset_local(path)
    assert ds["messages"] == [
        [{"role": "system", "content": [text("Answer briefly.")]}, user(IMAGE, IMAGE, text("Which is red?")), assistant("The first.")],
        [user(IMAGE, text("What is it?")), assistant("A square.")],
    ]
    assert [len(images) for images in ds["images"]] == [2, 1]
    assert brief(report.rejects) == [(2, None, "image count mismatch"), (3, None, "empty answer")]
    assert report.rejects[0]["detail"] == "2 images but 1 image placeholders"


def test_trl_conversational_sft_and_preference(tmp_path):
    save_png(tmp_path / "imgs" / "a.png")
    sft = [
        {"messages": [user(IMAGE, text("Color?")), assistant("Red.")], "images": ["imgs/a.png"]},
        # String content, as TRL allows: the image goes before the first user text (prepare_multimodal_messages).
        {"messages": [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "Red."}], "images": ["imgs/a.png"]},
        {"messages": [user(IMAGE, text("Color?")), assistant("Red.")], "images": []},
        {"messages": [user(IMAGE, text("Color?")), {"role": "assistant", "content": [{"type": "text", "text": None}]}],
         "images": ["imgs/a.png"]},
    ]
    path = write_json(tmp_path / "sft.jsonl", sft, jsonl=True)
    assert detect_format(path) == "trl"
    ds, report = load_dataset_local(path, format="trl")
    assert ds["messages"] == [[user(IMAGE, text("Color?")), assistant("Red.")]] * 2
    assert brief(report.rejects) == [(2, None, "image count mismatch"), (3, None, "empty answer")]

    pairs = [
        {"prompt": [user(IMAGE, text("Color?"))], "chosen": [assistant("Red.")], "rejected": [assistant("Blue.")], "images": ["imgs/a.png"]},
        {"prompt": [user(IMAGE, text("Color?"))], "chosen": "Red.", "rejected": "Red.", "images": ["imgs/a.png"]},
    ]
    path = write_json(tmp_path / "pairs.json", pairs)
    ds, report = load_dataset_local(path, kind="preference")
    assert ds.column_names == ["images", "prompt", "chosen", "rejected"]
    assert ds[0]["prompt"] == [user(IMAGE, text("Color?"))]
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ([assistant("Red.")], [assistant("Blue.")])
    assert brief(report.rejects) == [(1, None, "chosen == rejected")]
    # Conversations cannot become preference pairs; pairs can become SFT rows (the chosen answer).
    with pytest.raises(ValueError, match="sft.jsonl.*no usable rows.*missing field"):
        load_dataset_local(tmp_path / "sft.jsonl", kind="preference")


@pytest.fixture
def rlaif(tmp_path):
    save_png(tmp_path / "img" / "1.png", "L")
    save_corrupt(tmp_path / "img" / "bad.png")
    rows = [
        {"idx": 1, "question": "What color is the circle?", "chosen": "It is red.", "rejected": "It is blue.", "image": "img/1.png"},
        {"idx": 2, "question": "What?", "chosen": "Same answer.", "rejected": "Same answer.", "image": "img/1.png"},
        {"idx": 3, "question": "What?", "chosen": "Yes.", "rejected": "", "image": "img/1.png"},
        {"idx": 4, "question": "What?", "chosen": "Yes.", "rejected": "No.", "image": "img/none.png"},
        {"idx": 5, "question": "What?", "chosen": "Yes.", "rejected": None, "image": "img/1.png"},
        {"idx": 6, "question": "What?", "chosen": "Yes.", "rejected": "No.", "image": "img/bad.png"},
        {"idx": 7, "question": "Look: <image> which?", "chosen": "Left.", "rejected": "Right.", "image": "img/1.png"},
    ]
    return write_json(tmp_path / "rlaif_v.json", rows)


def test_rlaif_v_preference_rows(rlaif, tmp_path):
    assert detect_format(rlaif) == "rlaif_v"
    ds, report = load_dataset_local(rlaif, kind="preference", rejects_path=tmp_path / "rejects.jsonl")
    assert ds.to_dict()["prompt"] == [
        [user(IMAGE, text("What color is the circle?"))],
        [user(text("Look:"), IMAGE, text("which?"))],
    ]
    assert ds["chosen"] == [[assistant("It is red.")], [assistant("Left.")]]
    assert ds["rejected"] == [[assistant("It is blue.")], [assistant("Right.")]]
    assert ds[0]["images"][0].mode == "L"
    expected = [
        (1, 2, "chosen == rejected"), (2, 3, "empty answer"), (3, 4, "missing image"), (4, 5, "missing field"),
        (5, 6, "corrupt image"),
    ]
    assert brief(report.rejects) == expected
    assert brief(read_rejects(tmp_path / "rejects.jsonl")) == expected

    sft, _ = load_dataset_local(rlaif, kind="sft")
    assert sft[0]["messages"] == [user(IMAGE, text("What color is the circle?")), assistant("It is red.")]
    prompts, _ = load_dataset_local(rlaif, kind="prompt")
    assert prompts.column_names == ["images", "prompt"] and prompts[0]["prompt"] == ds[0]["prompt"]


def test_sft_rows_become_prompts_without_the_last_answer(llava):
    ds, _ = load_dataset_local(llava, kind="prompt")
    assert ds[0]["prompt"] == [user(IMAGE, text("What color is it?")), assistant("Red."), user(text("Sure?"))]


def test_disk_dataset_dict_with_split_and_bad_images(tmp_path):
    good = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(good, format="PNG")
    rows = {
        "images": [[{"bytes": good.getvalue(), "path": None}], [{"bytes": b"junk", "path": None}], []],
        "messages": [[user(IMAGE, text("Q?")), assistant("A.")]] * 3,
    }
    part = Dataset.from_dict(rows, features=KIND_FEATURES["sft"])
    DatasetDict({"train": part.select([0]), "test": part}).save_to_disk(str(tmp_path / "saved"))
    assert detect_format(tmp_path / "saved") == "disk"
    ds, report = load_dataset_local(tmp_path / "saved", split="test")
    assert len(ds) == 1 and ds[0]["messages"] == rows["messages"][0]
    assert brief(report.rejects) == [(1, None, "corrupt image"), (2, None, "image count mismatch")]
    with pytest.raises(ValueError, match="no split 'validation'; splits: \\['train', 'test'\\]"):
        load_dataset_local(tmp_path / "saved", format="disk", split="validation")


def test_saved_world_loads_as_sft_rows(tmp_path):
    world = build_world(tmp_path / "world", sizes={"train": 3, "test": 2}, seed=0)
    ds, report = load_dataset_local(tmp_path / "world", split="train")
    assert report.rejects == [] and ds.column_names == ["images", "messages"]
    assert ds["messages"] == world["train"]["messages"]
    assert [im[0].tobytes() for im in ds["images"]] == [im[0].tobytes() for im in world["train"]["images"]]
    prompts, _ = load_dataset_local(tmp_path / "world", split="test", kind="prompt")
    assert prompts[0]["prompt"] == world["test"][0]["messages"][:-1]


def test_detect_format_and_errors(llava, rlaif, tmp_path):
    assert detect_format(llava) == "llava"
    assert detect_format(rlaif) == "rlaif_v"
    with pytest.raises(ValueError, match=r"unknown format 'alpaca'; supported: \['disk', 'trl', 'llava', 'sharegpt', 'rlaif_v'\]"):
        load_dataset_local(llava, format="alpaca")
    with pytest.raises(ValueError, match="unknown kind 'dpo'"):
        load_dataset_local(llava, kind="dpo")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(write_json(tmp_path / "odd.json", [{"text": "hello"}]))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a `save_to_disk` dataset"):
        detect_format(tmp_path / "folder")
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset_local(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="holds no rows"):
        load_dataset_local(write_json(tmp_path / "empty.json", []), format="llava")
    with pytest.raises(ValueError, match="holds llava conversations, not preference pairs"):
        load_dataset_local(llava, kind="preference")


def test_all_bad_rows_raise_naming_the_file_and_still_write_rejects(tmp_path):
    rows = [
        {"id": "a", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "b", "image": "../x.png", "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
    ]
    path = write_json(tmp_path / "all_bad.json", rows)
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(ValueError, match=r"all_bad\.json \(llava\): no usable rows, skipped 2 of 2 rows") as error:
        load_dataset_local(path, rejects_path=rejects)
    assert "1 missing image, 1 image outside root" in str(error.value)
    assert brief(read_rejects(rejects)) == [(0, "a", "missing image"), (1, "b", "image outside root")]


def test_jsonl_line_that_is_not_json_is_a_bad_row(tmp_path):
    save_png(tmp_path / "a.png")
    good = {"messages": [user(IMAGE, text("Q")), assistant("A")], "images": ["a.png"]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps(good) + "\n")
    ds, report = load_dataset_local(path)
    assert len(ds) == 2 and brief(report.rejects) == [(1, None, "malformed row")]


def test_validate_rows_on_in_memory_datasets():
    good = io.BytesIO()
    PIL.Image.new("L", (4, 4)).save(good, format="PNG")
    image = {"bytes": good.getvalue(), "path": None}
    features = datasets.Features({**KIND_FEATURES["sft"], "image_id": datasets.Value("string")})
    ds = Dataset.from_dict(
        {
            "images": [[image], [image], [image], [{"bytes": b"junk", "path": None}], [image, image]],
            "messages": [
                [user(IMAGE, text("Q")), assistant("A")],
                [user(IMAGE, text("Q")), assistant("")],
                [user(IMAGE, text("Q"))],
                [user(IMAGE, text("Q")), assistant("A")],
                [user(IMAGE, text("Q")), assistant("A")],
            ],
            "image_id": ["a", "b", "c", "d", "e"],
        },
        features=features,
    )
    clean, report = validate_rows(ds, "sft")
    assert clean.column_names == ["images", "messages", "image_id"] and clean["image_id"] == ["a"]
    assert brief(report.rejects) == [
        (1, "b", "empty answer"), (2, "c", "empty answer"), (3, "d", "corrupt image"), (4, "e", "image count mismatch"),
    ]

    pairs = Dataset.from_dict(
        {
            "images": [[image], [image]],
            "prompt": [[user(IMAGE, text("Q"))]] * 2,
            "chosen": [[assistant("Yes.")], [assistant("Yes.")]],
            "rejected": [[assistant("No.")], [assistant(" Yes. ")]],
        },
        features=KIND_FEATURES["preference"],
    )
    clean, report = validate_rows(pairs, "preference")
    assert len(clean) == 1 and brief(report.rejects) == [(1, None, "chosen == rejected")]
    with pytest.raises(ValueError, match=r"needs columns \['images', 'prompt', 'chosen', 'rejected'\]; missing \['chosen', 'rejected'\]"):
        validate_rows(pairs.select_columns(["images", "prompt"]), "preference")
