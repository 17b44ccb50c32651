"""Rejection sampling: batched candidates with images encoded once per prompt, scorers, selection by threshold and
margin, statistics (pass@k by hand), the candidates file's repair after a kill, and the SFT/DPO datasets."""

import json
import math

import datasets
import pytest
import torch
from PIL import Image

from align.data import load_dataset_local
from align.evaluation import question_rows
from align.rejection_sampling import (
    SamplingSettings,
    build_datasets,
    pass_at_k,
    read_candidates,
    sample_candidates,
    select,
    statistics_of,
)
from align.scoring import VerifierScorer, WeightedScorer, ranking_agreement
from model import VLMForConditionalGeneration, VLMProcessor
from tests.align.training_helpers import tiny_vlm, tiny_world

COLOR_RECORD = {
    "category": "color", "question": "What color is the circle?", "answer": "red", "answer_long": "The circle is red.",
    "answer_type": "color", "choices": [], "objects": [0], "query": {"shape": "circle"}, "relation": None,
}


@pytest.fixture(scope="module")
def tiny(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    path = tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"])
    model = VLMForConditionalGeneration.from_pretrained(path).eval()
    processor = VLMProcessor.from_pretrained(path)
    world = datasets.load_from_disk(tiny_world(root / "world", images=4))["train"]
    return model, processor, question_rows(world, 6)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_select_threshold_margin_and_ties():
    choice = select(["a", "b", "c"], [0.0, 1.0, 1.0], threshold=0.5, min_margin=0.5)
    assert choice == {"best": 1, "worst": 0, "sft": True, "pair": True}  # first of equal bests
    # Ties go to the answer sampled most often: the policy's usual right answer and its usual mistake.
    choice = select(["x", "1", "2", "1", "two", "two", "1"], [0, 0, 1, 0, 1, 1, 0], threshold=0.5, min_margin=0.5)
    assert (choice["best"], choice["worst"]) == (4, 1)
    assert not select(["a", "b"], [0.2, 0.4], threshold=0.5, min_margin=0.5)["sft"]
    assert not select(["a", "b"], [0.2, 0.4], threshold=0.5, min_margin=0.5)["pair"]  # margin 0.2 < 0.5
    assert select(["a", "b"], [0.2, 0.4], threshold=0.3, min_margin=0.2)["pair"]
    assert not select(["red", " red "], [1.0, 0.0], threshold=0.5, min_margin=0.5)["pair"]  # same text
    with pytest.raises(ValueError, match="scores for"):
        select(["a"], [1.0, 0.0], 0.5, 0.5)
    # max_pass_rate leaves out, for SFT only, the prompts the policy answers right too often; pairs are unaffected.
    assert select(["a", "b", "c"], [1.0, 1.0, 0.0], 0.5, 0.5, max_pass_rate=0.7)["sft"]  # 2 of 3 right
    assert not select(["a", "b", "c"], [1.0, 1.0, 0.0], 0.5, 0.5, max_pass_rate=0.6)["sft"]
    assert not select(["a", "b"], [1.0, 1.0], 0.5, 0.5, max_pass_rate=0.99)["sft"]
    assert select(["a", "b", "c"], [1.0, 1.0, 0.0], 0.5, 0.5, max_pass_rate=0.6)["pair"]


def test_verifier_weighted_scorers_and_agreement():
    rows = [{"record": json.dumps(COLOR_RECORD)}]
    candidates = [["red", "It is blue.", "The circle is red."]]
    assert VerifierScorer()(rows, candidates) == [[1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="prompt row 0 has no `record`"):
        VerifierScorer()([{}], [["red"]])
    # `reasons`: a right yes/no after a false stated reason scores 0, as GRPO's `verify_reasons` reward does.
    spatial = {"category": "spatial", "question": "Is the red square above the orange square?", "answer": "no",
               "answer_type": "yes_no", "choices": [], "relation": "above"}
    answers = [["The orange square is higher, so no.", "The red square is higher, so no.", "no", "yes"]]
    spatial_rows = [{"record": json.dumps(spatial)}]
    assert VerifierScorer()(spatial_rows, answers) == [[1.0, 1.0, 1.0, 0.0]]
    assert VerifierScorer(reasons=True)(spatial_rows, answers) == [[1.0, 0.0, 1.0, 0.0]]

    def lengths(rows, candidates):
        return [[float(len(t)) for t in texts] for texts in candidates]

    combined = WeightedScorer({"verifier": VerifierScorer(), "length": lengths}, {"verifier": 1.0, "length": 0.1})
    assert combined(rows, candidates) == [pytest.approx([1.3, 1.1, 2.8])]
    with pytest.raises(ValueError, match="must name the scorers"):
        WeightedScorer({"verifier": VerifierScorer()}, {"reward": 1.0})
    # Pairs the reference orders: (0,1) and (1,2). `other` agrees on (0,1), ties on (1,2) -> (1 + 0.5) / 2.
    assert ranking_agreement([[1.0, 0.0, 1.0]], [[3.0, 1.0, 1.0]]) == {"agreement": 0.75, "pairs": 2}
    assert math.isnan(ranking_agreement([[1.0, 1.0]], [[0.0, 2.0]])["agreement"])


def test_statistics_by_hand():
    records = [
        {"index": 0, "candidates": ["a", "b"], "scores": [1.0, 0.0], "verifier": [1.0, 0.0], "category": "count"},
        {"index": 1, "candidates": ["a", "b"], "scores": [0.0, 0.0], "verifier": [0.0, 0.0], "category": "count"},
        {"index": 2, "candidates": ["a", "b"], "scores": [1.0, 1.0], "verifier": [1.0, 1.0], "category": "spatial",
         "reward": [0.5, 0.2]},
        {"index": 3, "candidates": ["a", "b"], "scores": [0.0, 1.0], "verifier": [0.0, 1.0], "category": "spatial",
         "reward": [0.1, 0.9]},
    ]
    stats = statistics_of(records, threshold=0.5, min_margin=0.5)
    assert stats["prompts"] == 4 and stats["candidates"] == 8
    assert stats["sft_rows"] == 3 and stats["dpo_pairs"] == 2
    assert stats["any_correct"] == 0.75 and stats["pass@1"] == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    assert stats["pass@2"] == 0.75 and stats["pass@2_count"] == 0.5 and stats["pass@1_spatial"] == 0.75
    assert stats["score"]["mean"] == 0.5 and stats["score"]["max"] == 1.0
    # Only prompt 3 has candidates the verifier tells apart; the reward model orders them alike.
    assert stats["reward_verifier_agreement"] == 1.0 and stats["reward_verifier_pairs"] == 1
    hard = statistics_of(records, threshold=0.5, min_margin=0.5, max_pass_rate=0.99)
    assert hard["sft_rows"] == 2 and hard["dpo_pairs"] == 2 and hard["max_pass_rate"] == 0.99  # prompt 2 left out


def test_sample_candidates_encodes_each_image_once(tiny):
    model, processor, questions = tiny
    rows = [questions[i] for i in range(3)]
    seen = []
    hook = model.model.vision_towers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        settings = SamplingSettings(num_candidates=4, max_new_tokens=5, temperature=1.0)
        first = sample_candidates(model, processor, rows, settings, seed=7)
        again = sample_candidates(model, processor, rows, settings, seed=7)
    finally:
        hook.remove()
    assert [len(c) for c in first] == [4, 4, 4] and all(isinstance(t, str) for c in first for t in c)
    assert first == again  # seeded
    assert seen == [3, 3]  # one tower call per sampling round, one image per prompt (not 3 x 4)


def test_sample_candidates_keeps_each_samples_images_with_two_images(tiny, monkeypatch):
    # Two images per prompt: the one prefill of each prompt gets its own sample's image features, in the sample's
    # order, once (the candidates then decode from copies of its cache).
    model, processor, _ = tiny
    image = lambda rgb: Image.new("RGB", (32, 32), rgb)  # noqa: E731
    item = {"type": "image", "text": None}
    prompt = [{"role": "user", "content": [item, item, {"type": "text", "text": "Which differs?"}]}]
    rows = [
        {"images": [image((255, 0, 0)), image((0, 0, 255))], "prompt": prompt},
        {"images": [image((0, 255, 0)), image((255, 255, 0))], "prompt": prompt},
    ]
    prefills, generated = [], {}
    forward, generate = model.forward, model.generate

    def spy_forward(*args, **kwargs):
        if kwargs.get("image_features") is not None:
            prefills.append(kwargs["image_features"])
        return forward(*args, **kwargs)

    def spy_generate(**kwargs):
        generated.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "forward", spy_forward)
    monkeypatch.setattr(model, "generate", spy_generate)
    answers = sample_candidates(model, processor, rows, SamplingSettings(num_candidates=3, max_new_tokens=2), seed=0)
    assert [len(a) for a in answers] == [3, 3] and generated["input_ids"].shape[0] == 6
    assert "image_features" not in generated and "pixel_values" not in generated  # the images are in the cache
    with torch.no_grad():
        pixels = processor(images=[r["images"] for r in rows], text=["<image><image>"] * 2, return_tensors="pt")
        features = model.model.get_vision_features(pixels["pixel_values"])[0]  # [4 images, T, D]
    (prefill,) = prefills
    torch.testing.assert_close(prefill, features)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="num_candidates must be >= 2"):
        SamplingSettings(num_candidates=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingSettings(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)


def test_read_candidates_repairs_a_killed_file(tmp_path):
    path = tmp_path / "candidates.jsonl"
    whole = [{"index": i, "batch": i // 2, "candidates": ["a"], "scores": [1.0]} for i in range(3)]
    # Batch 0 whole, batch 1 half written (prompt 2 of 2..3), then a torn line.
    path.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"index": 3, "ba')
    assert [r["index"] for r in read_candidates(path)] == [0, 1, 2]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3
    kept = read_candidates(path, batch_of={0: [0, 1], 1: [2, 3]})
    assert [r["index"] for r in kept] == [0, 1]  # the partial batch 1 is sampled again with its own seed
    assert len(path.read_text().splitlines()) == 2


def test_build_datasets_rows_and_loadable(tiny, tmp_path):
    _, _, questions = tiny
    prompts = questions.select(range(3))
    records = [
        {"index": 0, "candidates": ["right", "wrong"], "scores": [1.0, 0.0]},
        {"index": 1, "candidates": ["x", "y"], "scores": [0.0, 0.0]},
        {"index": 2, "candidates": ["p", "q"], "scores": [0.0, 1.0]},
    ]
    sft, dpo = build_datasets(prompts, records, threshold=0.5, min_margin=0.5)
    assert len(sft) == 2 and len(dpo) == 2
    assert sft[0]["messages"][-1]["content"][0]["text"] == "right" and sft[1]["messages"][-1]["content"][0]["text"] == "q"
    assert sft[0]["messages"][0] == prompts[0]["prompt"][0] and sft[0]["record"] == prompts[0]["record"]
    assert dpo[1]["chosen"][0]["content"][0]["text"] == "q" and dpo[1]["rejected"][0]["content"][0]["text"] == "p"
    assert dpo[0]["image_id"] == prompts[0]["image_id"] and dpo["margin"] == [1.0, 1.0]
    assert sft[0]["images"][0].size == prompts[0]["images"][0].size
    # Both load as training data of their kind (what recipes/sft.py and recipes/dpo.py read from `datasets:`).
    sft.save_to_disk(str(tmp_path / "sft"))
    dpo.save_to_disk(str(tmp_path / "dpo"))
    loaded_sft, report_sft = load_dataset_local(tmp_path / "sft", kind="sft")
    loaded_dpo, report_dpo = load_dataset_local(tmp_path / "dpo", kind="preference")
    assert len(loaded_sft) == 2 and len(loaded_dpo) == 2 and not report_sft.rejects and not report_dpo.rejects

