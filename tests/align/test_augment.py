"""Synthetic Q&A augmentation: parsing generated text, deduplication, the verifier and reward filters, sampling from a
tiny LLM, and the whole pipeline's rows and stats."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import align.augment as augment_module
from align.augment import (
    PROMPT_TEMPLATE,
    REJECTION_REASONS,
    AugmentArguments,
    GenerationArguments,
    augment,
    deduplicate,
    filter_pairs,
    generate_qa,
    parse_qa_pairs,
    qa_prompts,
)
from align.data import load_dataset_local
from align.data.mixture import MixtureConfig, build_mixture
from align.paths import default_cache_dir
from align.world import REFUSAL, Scene, SceneObject, WorldConfig, generate_split, record_for_question, verify

# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def test_pairs_are_read_one_per_line_and_stripped():
    text = (
        "Question: What color is the circle?  Answer:  red \n"
        "\n"
        "  question: How many squares are there? answer: 2\n"
        "Question: Who drew this picture? Answer: The image does not show that."
    )
    assert parse_qa_pairs(text) == [
        ("What color is the circle?", "red"),
        ("How many squares are there?", "2"),
        ("Who drew this picture?", REFUSAL),
    ]


@pytest.mark.parametrize(
    "junk",
    [
        "the image shows a red circle",  # prose
        "Question: What color is the circle Answer: red",  # no question mark
        "Question: What color is the circle? Answer:",  # no answer
        "Question: What color is the circle? Answer: red Question: How many? Answer: 2",  # run-on line
        "Answer: red",  # an answer without a question
        "Question: How old",  # cut off
    ],
)
def test_parsing_stops_at_the_first_line_that_is_not_a_pair(junk):
    text = f"Question: Is there a red circle? Answer: yes\n{junk}\nQuestion: How many circles are there? Answer: 1"
    assert parse_qa_pairs(text) == [("Is there a red circle?", "yes")]


def test_parsing_empty_or_junk_text_gives_nothing():
    assert parse_qa_pairs("") == []
    assert parse_qa_pairs("<pad> circle circle circle") == []


def test_prompts_end_with_the_question_cue():
    assert qa_prompts(["a red  circle at the top. "]) == ["a red circle at the top.\nQuestion:"]
    assert PROMPT_TEMPLATE.endswith("Question:")
    with pytest.raises(ValueError, match="prompt_template"):
        qa_prompts(["a red circle."], template="{caption}\nQ:")


# ---------------------------------------------------------------------------------------------------------------
# Deduplication
# ---------------------------------------------------------------------------------------------------------------


def test_deduplicate_drops_repeats_and_existing_questions_ignoring_case_and_punctuation():
    pairs = [
        ("What color is the circle?", "red"),
        ("what color is the  circle ?", "blue"),
        ("How many squares are there?", "2"),
        ("Is there a red circle?", "yes"),
        ("How many squares are there?", "2"),
    ]
    assert deduplicate(pairs) == [pairs[0], pairs[2], pairs[3]]
    assert deduplicate(pairs, existing=["IS THERE A RED CIRCLE?"]) == [pairs[0], pairs[2]]


# ---------------------------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def scene_json():
    """Two red circles side by side and a blue square below the small one."""
    objects = [
        SceneObject(0, "circle", "red", "small", 4, 4, 11),
        SceneObject(1, "circle", "red", "large", 40, 4, 18),
        SceneObject(2, "square", "blue", "small", 4, 40, 11),
    ]
    return Scene(64, "gray", objects, 3).to_json()


def test_the_verifier_keeps_right_answers_and_drops_wrong_and_ungrammatical_ones(scene_json):
    candidates = [
        {"question": "How many red circles are there?", "answer": "2", "scene": scene_json},
        {"question": "How many red circles are there?", "answer": "There are two red circles.", "scene": scene_json},
        {"question": "What color is the small square?", "answer": "green", "scene": scene_json},
        {"question": "What is the meaning of life?", "answer": "42", "scene": scene_json},
        {"question": "What color is the red circle?", "answer": "red", "scene": scene_json},  # two red circles
        {"question": "Who drew this picture?", "answer": "The image does not show that.", "scene": scene_json},
    ]
    verdicts = filter_pairs(candidates)
    assert [v["kept"] for v in verdicts] == [True, True, False, False, False, True]
    assert [v["reason"] for v in verdicts] == [None, None, "wrong answer", "outside grammar", "outside grammar", None]
    assert [v["category"] for v in verdicts] == ["count", "count", "color", "other", "color", "unanswerable"]
    kept = verdicts[0]["record"]
    assert kept == record_for_question(scene_json, "How many red circles are there?") and kept["answer"] == "2"
    assert all(v["score"] is None for v in verdicts)


def test_the_reward_filter_scores_pairs_without_a_scene(scene_json):
    image = object()
    seen_rows = []

    def fake_scores(rows):
        seen_rows.extend(rows)
        return [1.0 if row["completion"] == "red" else -1.0 for row in rows]

    candidates = [
        {"question": "What color is the circle?", "answer": "red", "scene": None, "images": [image]},
        {"question": "What color is the circle?", "answer": "blue", "scene": None, "images": [image]},
        {"question": "How many red circles are there?", "answer": "2", "scene": scene_json, "images": [image]},
    ]
    verdicts = filter_pairs(candidates, "auto", score_fn=fake_scores, threshold=0.5)
    assert [(v["kept"], v["reason"], v["score"]) for v in verdicts] == [
        (True, None, 1.0), (False, "low reward", -1.0), (True, None, None),
    ]
    assert verdicts[0]["category"] == "color" and verdicts[0]["record"] is None
    # Only the two pairs without a scene graph reached the reward model, as rows of its scorer.
    assert [row["completion"] for row in seen_rows] == ["red", "blue"]
    assert seen_rows[0]["images"] == [image]
    question = {"type": "text", "text": "What color is the circle?"}
    assert seen_rows[0]["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None}, question]}]
    # "reward" sends every pair to the reward model, scene or not.
    verdicts = filter_pairs(candidates, "reward", score_fn=fake_scores, threshold=0.5)
    assert verdicts[2]["reason"] == "low reward"


def test_filter_refuses_what_it_cannot_check(scene_json):
    no_scene = [{"question": "What color is the circle?", "answer": "red", "scene": None}]
    with pytest.raises(ValueError, match="reward model"):
        filter_pairs(no_scene)
    with pytest.raises(ValueError, match="scene graph"):
        filter_pairs(no_scene, "verifier")
    with pytest.raises(ValueError, match="filter must be one of"):
        filter_pairs(no_scene, "vibes")


def test_arguments_name_the_bad_parameter():
    with pytest.raises(ValueError, match="temperature"):
        GenerationArguments(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationArguments(top_p=1.5)
    with pytest.raises(ValueError, match="samples_per_caption"):
        GenerationArguments(samples_per_caption=0)
    with pytest.raises(ValueError, match="prompt_template"):
        GenerationArguments(prompt_template="{caption} Q:")
    with pytest.raises(ValueError, match="filter"):
        AugmentArguments(filter="vibes")
    with pytest.raises(ValueError, match="reward_model_name_or_path"):
        AugmentArguments(filter="reward")


# ---------------------------------------------------------------------------------------------------------------
# Sampling and the whole pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return generate_split("train", 4, seed=0, config=WorldConfig(image_size=32))


@pytest.fixture(scope="module")
def tiny_llm(tiny_parts):
    return AutoModelForCausalLM.from_pretrained(tiny_parts["llama"]), AutoTokenizer.from_pretrained(tiny_parts["llama"])


def assert_stats_add_up(stats, dataset, captions, samples):
    assert stats["captions"] == captions and stats["texts"] == captions * samples
    assert stats["generated"] == stats["kept"] + sum(stats["rejected"].values())
    assert set(stats["rejected"]) == set(REJECTION_REASONS)
    assert stats["parsed"] == stats["generated"] - stats["rejected"]["unparseable"]
    assert stats["unique"] == stats["parsed"] - stats["rejected"]["duplicate"]
    assert stats["kept"] == len(dataset) == sum(stats["kept_per_category"].values())
    assert stats["yield"] == pytest.approx(stats["kept"] / stats["generated"] if stats["generated"] else 0.0)


def test_generate_qa_samples_per_caption_with_left_padding(tiny_llm, world, monkeypatch):
    model, tokenizer = tiny_llm
    captions = list(world["caption_detailed"])[:3] + ["a red circle."]  # prompts of different lengths
    texts = generate_qa(model, tokenizer, captions, samples_per_caption=2, max_new_tokens=12, batch_size=3, seed=1)
    assert len(texts) == 4 and all(len(samples) == 2 for samples in texts)
    assert all(text == "" or text.startswith("Question:") for samples in texts for text in samples)
    # A nucleus this small keeps only the most likely token (greedy decoding): a prompt then gives the same
    # continuation alone as in a left-padded batch. Compared whole, before the unfinished last line is cut.
    monkeypatch.setattr(augment_module, "_completion_text", lambda tokenizer, ids, stop: tokenizer.decode(ids))
    kwargs = dict(samples_per_caption=1, top_p=1e-6, max_new_tokens=12)
    batched = generate_qa(model, tokenizer, captions, batch_size=4, seed=0, **kwargs)
    alone = [
        generate_qa(model, tokenizer, [caption], batch_size=1, seed=i, **kwargs)[0] for i, caption in enumerate(captions)
    ]
    assert batched == alone and len(set(text for samples in batched for text in samples)) > 1


def test_augment_with_a_random_tiny_llm_accounts_for_every_line(tiny_llm, world, tmp_path):
    model, tokenizer = tiny_llm
    dataset, stats = augment(
        world, model, tokenizer, samples_per_caption=2, max_new_tokens=24, batch_size=8, seed=0,
        generations_path=tmp_path / "generated.jsonl",
    )
    assert_stats_add_up(stats, dataset, captions=4, samples=2)
    assert dataset.column_names == ["images", "messages", "category", "record", "image_id"]
    log = [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()]
    assert len(log) == 8 and sum(entry["lines"] for entry in log) == stats["generated"]


def _unasked(templates, existing):
    return next(t for t in templates if t not in existing)


def scripted_texts(world):
    """Per image a text with one right answer, a repeat of it, an ungrammatical question, a wrong answer, junk and
    a pair after the junk."""
    texts = []
    for scene_json, questions in zip(world["scene"], world["questions"]):
        scene, existing = json.loads(scene_json), {r["question"] for r in json.loads(questions)}
        count = _unasked(["How many objects can you see?", "How many objects are in the image?",
                          "How many objects are there?"], existing)
        obj = scene["objects"][0]
        noun = f"{obj['size']} {obj['color']} {obj['shape']}"
        present = _unasked([f"Can you see a {noun}?", f"Is there a {noun} in the image?"], existing)
        texts.append(
            f"Question: {count} Answer: {len(scene['objects'])}\n"
            f"Question: {count.upper()} Answer: {len(scene['objects'])}\n"
            "Question: What is the meaning of life? Answer: 42\n"
            f"Question: {present} Answer: no\n"
            "the end\n"
            f"Question: {count} Answer: {len(scene['objects'])}"
        )
    return texts


def test_augment_keeps_verified_pairs_as_sft_rows_that_a_mixture_reads(world, tmp_path, monkeypatch):
    texts = scripted_texts(world)
    monkeypatch.setattr(augment_module, "generate_qa", lambda model, tokenizer, captions, *args: [[t] for t in texts])
    dataset, stats = augment(world, None, None, samples_per_caption=1)
    assert_stats_add_up(stats, dataset, captions=4, samples=1)
    assert stats["rejected"] == {
        "unparseable": 8, "duplicate": 4, "outside grammar": 4, "wrong answer": 4, "low reward": 0,
    }
    assert stats["kept"] == 4 and stats["kept_per_category"] == {"count": 4} and stats["images_with_kept"] == 4
    for row, image_id in zip(dataset, world["image_id"]):
        user, assistant = row["messages"]
        assert user["content"][0]["type"] == "image" and user["content"][1]["text"].startswith("How many objects")
        assert verify(json.loads(row["record"]), assistant["content"][0]["text"])
        assert row["image_id"] == image_id and row["category"] == "count" and len(row["images"]) == 1

    dataset.save_to_disk(str(tmp_path / "data"))
    rows, report = load_dataset_local(tmp_path / "data")
    assert len(rows) == 4 and report.rejects == []
    assert rows[0]["images"][0].size == world[0]["images"][0].size
    mixture = build_mixture(MixtureConfig(datasets=[{"path": str(tmp_path / "data"), "name": "augmented"}]))
    assert len(mixture) == 4 and set(mixture["source"]) == {"augmented"}


def test_augment_without_scene_graphs_uses_the_reward_model(world, monkeypatch):
    texts = scripted_texts(world)
    monkeypatch.setattr(augment_module, "generate_qa", lambda model, tokenizer, captions, *args: [[t] for t in texts])
    captioned = world.remove_columns(["scene"])
    with pytest.raises(ValueError, match="score_fn"):
        augment(captioned, None, None)
    with pytest.raises(ValueError, match="scene graph"):
        augment(captioned, None, None, method="verifier")

    def score(rows):
        assert all(len(row["images"]) == 1 and row["images"][0].size == (32, 32) for row in rows)
        return [1.0 if row["completion"] == "no" else 0.0 for row in rows]

    dataset, stats = augment(captioned, None, None, score_fn=score, threshold=0.5)
    assert_stats_add_up(stats, dataset, captions=4, samples=1)
    assert stats["kept"] == 4 and stats["rejected"]["low reward"] == 8
    assert set(dataset["category"]) == {"existence"} and set(dataset["record"]) == {None}


def test_reward_score_fn_scores_with_a_saved_reward_model(tiny_parts, world, tmp_path):
    from align.reward import load_reward_model, reward_scores
    from model import VLMForRewardModeling, VLMProcessor
    from tests.align.training_helpers import tiny_vlm

    vlm = tiny_vlm(tmp_path / "vlm", tiny_parts["siglip"], tiny_parts["llama"])
    reward_model = VLMForRewardModeling.from_vlm(vlm)
    torch.manual_seed(0)
    torch.nn.init.normal_(reward_model.score.weight)  # a fresh head scores 0 everywhere; untrained but not constant
    reward_model.save_pretrained(tmp_path / "reward")
    VLMProcessor.from_pretrained(vlm).save_pretrained(tmp_path / "reward")
    score = augment_module.reward_score_fn(str(tmp_path / "reward"), batch_size=2)
    image = world[0]["images"]
    candidates = [
        {"question": "What color is the circle?", "answer": answer, "scene": None, "images": image}
        for answer in ("red", "It is blue.", "The image does not show that.")
    ]
    verdicts = filter_pairs(candidates, "reward", score_fn=score, threshold=float("-inf"))
    scores = [v["score"] for v in verdicts]
    assert all(v["kept"] for v in verdicts) and len(set(scores)) == 3
    model, processor = load_reward_model(tmp_path / "reward")
    rows = [{"images": image, "prompt": [augment_module.user_turn(c["question"])], "completion": c["answer"]}
            for c in candidates]
    assert scores == pytest.approx(reward_scores(model, processor, rows, batch_size=3), abs=1e-5)
    threshold = sorted(scores)[1]
    assert [v["kept"] for v in filter_pairs(candidates, "reward", score_fn=score, threshold=threshold)] == [
        s >= threshold for s in scores
    ]


@pytest.mark.skipif(not (default_cache_dir() / "llama").is_dir(), reason="the zoo's LLM is not built")
def test_the_zoo_llm_writes_pairs_that_the_verifier_keeps():
    import datasets

    world = datasets.load_from_disk(str(default_cache_dir() / "world"))["validation"].select(range(8))
    path = default_cache_dir() / "llama"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    dataset, stats = augment(world, model, tokenizer, samples_per_caption=1, max_new_tokens=192, batch_size=8)
    assert_stats_add_up(stats, dataset, captions=8, samples=1)
    # Pretrained on captions followed by Q&A lines, it writes pairs in the format, and some are right.
    assert stats["parsed"] >= 0.9 * stats["generated"] and stats["kept"] > 0
    for record, messages in zip(dataset["record"], dataset["messages"]):
        assert verify(json.loads(record), messages[1]["content"][0]["text"])

