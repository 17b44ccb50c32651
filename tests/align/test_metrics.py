"""Metric modules shipped in the repo, loaded by path with `evaluate` and never from the network."""

import json
import math
import os
import socket
from collections import Counter
from pathlib import Path

import evaluate
import pytest

from align.metrics import load_metric, metric_path
from align.metrics.captions import caption_objects, scene_objects
from align.metrics.text_overlap import bleu_tokens, corpus_bleu, lcs_length, mean_rouge_l, rouge_l

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a metric tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def record(category, answer, answer_type, question="Q?", answer_long="", choices=()):
    return json.dumps(
        {"category": category, "question": question, "answer": answer, "answer_long": answer_long,
         "answer_type": answer_type, "choices": list(choices), "objects": [], "query": None, "relation": None}
    )


def test_shapes_qa_overall_and_per_category():
    metric = evaluate.load(metric_path("shapes_qa"))
    pairs = [
        ("There are two circles.", record("count", "2", "number")),
        ("3", record("count", "2", "number")),
        ("two", record("count", "2", "number")),
        ("Red.", record("color", "red", "color")),
        ("It is red or blue.", record("color", "red", "color")),
        ("No, there is not.", record("existence", "no", "yes_no")),
        ("I can't tell from the image.", record("unanswerable", "x", "refusal")),
        ("It is made of wood.", record("unanswerable", "x", "refusal")),
        ("the red circle", record("spatial", "the red circle", "choice", choices=["the red circle", "the blue square"])),
    ]
    result = metric.compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs])
    assert result == {
        "accuracy": 6 / 9, "correct": 6, "total": 9,
        "accuracy_color": 0.5, "correct_color": 1, "total_color": 2,
        "accuracy_count": 2 / 3, "correct_count": 2, "total_count": 3,
        "accuracy_existence": 1.0, "correct_existence": 1, "total_existence": 1,
        "accuracy_spatial": 1.0, "correct_spatial": 1, "total_spatial": 1,
        "accuracy_unanswerable": 0.5, "correct_unanswerable": 1, "total_unanswerable": 2,
    }
    # Batches accumulate like any evaluate metric.
    metric.add_batch(predictions=["2"], references=[record("count", "2", "number")])
    metric.add_batch(predictions=["blue"], references=[record("color", "red", "color")])
    assert metric.compute()["accuracy"] == 0.5


def test_relative_folder_path_loads_from_the_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    metric = evaluate.load("align/metrics/shapes_qa")
    assert metric.compute(predictions=["yes"], references=[record("existence", "yes", "yes_no")])["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; supported: \['shapes_qa', 'caption_match'\]"):
        load_metric("bleu")


def test_caption_objects_reads_counts_colors_and_shapes():
    assert caption_objects("a red circle and two blue squares.") == Counter({("red", "circle"): 1, ("blue", "square"): 2})
    assert caption_objects(
        "there are three objects: a small red circle at the top left, a large green triangle on the right and "
        "a small red circle at the bottom."
    ) == Counter({("red", "circle"): 2, ("green", "triangle"): 1})
    assert caption_objects("3 yellow triangles, no squares and a circle.") == Counter(
        {("yellow", "triangle"): 3, (None, "circle"): 1}
    )
    assert caption_objects("Grey stars.") == Counter({("gray", "star"): 2})
    scene = {"objects": [{"color": "red", "shape": "circle"}, {"color": "red", "shape": "circle"}]}
    assert scene_objects(json.dumps(scene)) == Counter({("red", "circle"): 2})


def test_caption_match_numbers():
    scene = json.dumps(
        {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}, {"color": "blue", "shape": "square"}]}
    )
    other = json.dumps({"objects": [{"color": "green", "shape": "triangle"}]})
    predictions = [
        "a red circle and two blue squares.",  # exact
        "a red circle and a blue square.",  # 2 of 3 objects, wrong count
        "three green circles.",  # 3 mentions, none right, count agrees
        "a green triangle.",  # exact
    ]
    metric = load_metric("caption_match")
    result = metric.compute(predictions=predictions, references=[scene, scene, scene, other])
    # mentions: 3 + 2 + 3 + 1 = 9, matched: 3 + 2 + 0 + 1 = 6, objects: 3 * 3 + 1 = 10
    assert result == {
        "caption_match": 0.5,
        "mention_precision": 6 / 9,
        "mention_recall": 6 / 10,
        "mention_f1": 2 * (6 / 9) * (6 / 10) / (6 / 9 + 6 / 10),
        "count_agreement": 0.75,
        "num_captions": 4,
    }
    with_text = metric.compute(
        predictions=predictions[:1], references=[scene], reference_captions=["a red circle and two blue squares."]
    )
    assert with_text["bleu"] == pytest.approx(1.0) and with_text["rouge_l"] == pytest.approx(1.0)


def test_bleu_against_hand_computed_values():
    pred = "a red circle and a blue square"
    ref = "a red circle and two blue squares"
    # Clipped matches per order: 1-grams 5/7 ("a" counts once), 2-grams 3/6, 3-grams 2/5, 4-grams 1/4; same length.
    result = corpus_bleu([pred], [ref])
    assert result["precisions"] == pytest.approx([5 / 7, 3 / 6, 2 / 5, 1 / 4])
    assert result["brevity_penalty"] == 1.0
    assert result["bleu"] == pytest.approx((5 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # A short second candidate: c = 7 + 3, r = 7 + 6, BP = exp(1 - 13 / 10); it adds 3/3, 2/2, 1/1, 0/0.
    result = corpus_bleu([pred, "a green triangle"], [[ref], ["a green triangle on the left"]])
    assert result["precisions"] == pytest.approx([8 / 10, 5 / 8, 3 / 6, 1 / 4])
    assert result["brevity_penalty"] == pytest.approx(math.exp(-0.3))
    assert result["bleu"] == pytest.approx(math.exp(-0.3) * (8 / 10 * 5 / 8 * 3 / 6 * 1 / 4) ** 0.25)
    # The closest reference length is used, and n-grams are clipped by the most generous reference.
    result = corpus_bleu(["a a a a"], [["a a a a a a a a", "a a b"]])
    assert result["reference_length"] == 3 and result["precisions"][0] == pytest.approx(1.0)
    assert corpus_bleu(["red circle"], ["blue square"])["bleu"] == 0.0
    assert bleu_tokens("Two circles.") == ["two", "circles", "."]


def test_rouge_l_against_hand_computed_values():
    assert lcs_length("a b c d".split(), "a c b d".split()) == 3
    # LCS("red circle blue square", "a red circle and a blue square") = 4: P = 1, R = 4/7, F = 8/11.
    assert rouge_l("red circle blue square", "a red circle and a blue square") == pytest.approx(8 / 11)
    assert rouge_l("Two circles.", "two circles") == 1.0
    assert rouge_l("x", "y") == 0.0
    assert mean_rouge_l(["red circle", "x"], [["blue circle", "red circle"], "y"]) == pytest.approx(0.5)
