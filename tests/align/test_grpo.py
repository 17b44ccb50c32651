"""GRPO's pieces: the rewards on fixed answers, the answer-form check, and one tower pass per distinct image (a
group of completions shares its image's encode across generation, reference and loss passes)."""

import json

import pytest
import torch
from trl import GRPOConfig

from align.grpo import (
    GRPOScriptArguments,
    VisionGRPOTrainer,
    completion_text,
    format_reward,
    reward_functions,
    verifier_reward,
)
from align.towers import TowerMemo
from align.training import VLMModelConfig, load_reference, load_vlm, prepare_for_training
from align.world import verify, well_formed
from model import VLMForConditionalGeneration
from tests.align.training_helpers import TINY_TRAINING, tiny_vlm, tiny_world

COLOR = {"category": "color", "answer": "red", "answer_type": "color", "choices": []}
COUNT = {"category": "count", "answer": "2", "answer_type": "number", "choices": []}
EXIST = {"category": "existence", "answer": "yes", "answer_type": "yes_no", "choices": []}
CHOICE = {"category": "spatial", "answer": "the circle", "answer_type": "choice", "choices": ["the circle", "the square"]}
UNANSWERABLE = {"category": "unanswerable", "answer": "The image does not show that.", "answer_type": "refusal", "choices": []}


def _messages(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    ("record", "answer", "right", "formed"),
    [
        (COLOR, "Red.", True, True),
        (COLOR, "The square is blue.", False, True),
        (COLOR, "It is red or blue.", False, False),
        (COLOR, "Maybe red.", False, False),
        (COUNT, "There are two circles.", True, True),
        (COUNT, "3", False, True),
        (COUNT, "Two or three.", False, False),
        (EXIST, "Yes, there is.", True, True),
        (EXIST, "No.", False, True),
        (EXIST, "", False, False),
        (CHOICE, "The circle.", True, True),
        (CHOICE, "The square is.", False, True),
        (CHOICE, "The circle and the square.", False, False),
        (UNANSWERABLE, "I can't tell from the image.", True, True),
        (UNANSWERABLE, "It says hello.", False, True),
        (COLOR, "The image does not show that.", False, True),
    ],
)
def test_verifier_and_format_rewards_on_fixed_answers(record, answer, right, formed):
    assert verify(record, answer) is right and well_formed(record, answer) is formed
    rows = {"record": [json.dumps(record)]}
    assert verifier_reward(None, [_messages(answer)], **rows) == [1.0 if right else 0.0]
    assert format_reward(None, [_messages(answer)], **rows) == [1.0 if formed else 0.0]


def test_verifier_reward_checks_stated_reasons_when_asked():
    """`verify_reasons`: a right yes/no after a false reason scores 0, as if wrong; by default the yes/no alone counts."""
    record = {"category": "spatial", "question": "Is the red square above the orange square?", "answer": "no",
              "answer_type": "yes_no", "choices": [], "relation": "above"}
    answers = [_messages(a) for a in ("The orange square is higher, so no.", "The red square is higher, so no.", "no")]
    rows = {"record": [json.dumps(record)] * 3}
    assert verifier_reward(None, answers, **rows) == [1.0, 1.0, 1.0]
    assert verifier_reward(None, answers, reasons=True, **rows) == [1.0, 0.0, 1.0]
    strict, plain = reward_functions(["verifier"], verify_reasons=True)[0], reward_functions(["verifier"])[0]
    assert strict(None, answers, **rows) == [1.0, 0.0, 1.0] and plain(None, answers, **rows) == [1.0, 1.0, 1.0]


def test_format_reward_length_and_plain_prompts():
    long = "The square in the picture is red and it sits near the top left corner of the image."
    assert format_reward(None, [long], record=[COLOR]) == [0.0]
    assert format_reward(None, [long], record=[COLOR], max_words=40) == [1.0]
    # Without question records only the length counts.
    assert format_reward(None, ["Red.", "", long]) == [1.0, 0.0, 0.0]


def test_completion_text_and_reward_errors():
    assert completion_text("Red.") == "Red."
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "Red"}, {"type": "text", "text": "."}]}]) == "Red."
    with pytest.raises(ValueError, match="needs prompts with a `record` column"):
        verifier_reward(None, ["Red."])
    with pytest.raises(ValueError, match="reward_funcs must name"):
        reward_functions(["verifier", "length"])
    with pytest.raises(ValueError, match="needs reward_model_name_or_path"):
        reward_functions(["reward_model"])
    assert [f.__name__ for f in reward_functions(["verifier", "format"])] == ["verifier", "format"]
    with pytest.raises(ValueError, match="set reward_model_name_or_path"):
        GRPOScriptArguments(reward_funcs=["reward_model"])


@pytest.fixture(scope="module")
def vlms(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    return {
        "prepend": tiny_vlm(root / "vlm-prepend", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention": tiny_vlm(root / "vlm-cross", tiny_parts["siglip"], tiny_parts["llama"], "cross_attention"),
        "world": tiny_world(root / "world", images=6),
    }


@pytest.mark.parametrize("trainable", [False, True])
def test_tower_memo_encodes_each_distinct_image_once_with_the_same_features_and_gradients(vlms, trainable):
    model = VLMForConditionalGeneration.from_pretrained(vlms["prepend"]).eval()
    model.model.vision_towers.requires_grad_(trainable)
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    batch = images[torch.tensor([0, 1, 0, 2, 1, 0])]
    expected = model.model.get_vision_features(batch)
    memo = TowerMemo(model.model)
    got = model.model.get_vision_features(batch)
    assert memo.images_encoded == 3
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))
    model.model.get_vision_features(batch[:2])
    # A frozen tower's features are kept until clear(); a trainable one encodes again (its weights may change).
    assert memo.images_encoded == (5 if trainable else 3)
    if trainable:
        got[0].sum().backward()
        assert next(model.model.vision_towers.parameters()).grad is not None
    memo.clear()
    model.model.get_vision_features(batch[:2])
    assert memo.images_encoded == (7 if trainable else 5)


@pytest.mark.parametrize(("fusion", "use_peft", "beta"), [("prepend", True, 0.04), ("cross_attention", False, 0.04)])
def test_one_tower_pass_per_group(vlms, tmp_path, fusion, use_peft, beta):
    """Two steps of 2 prompts x 4 answers: each prompt's image goes through the tower once, not once per answer and
    pass (generation, reference, loss)."""
    model_args = VLMModelConfig(model_name_or_path=vlms[fusion], use_peft=use_peft, lora_r=4, lora_alpha=8)
    model, processor = load_vlm(vlms[fusion], model_args)
    peft_config = prepare_for_training(model, model_args)
    prompts = GRPOScriptArguments(world_path=vlms["world"]).prompts()
    first = {image_id: index for index, image_id in reversed(list(enumerate(prompts["image_id"])))}
    prompts = prompts.select(sorted(first.values())[:4])  # four prompts, four different images
    settings = {k: v for k, v in TINY_TRAINING.items() if k != "dtype"}
    settings.update(
        report_to=[], num_generations=4, per_device_train_batch_size=8, max_completion_length=6, max_steps=2,
        beta=beta, shuffle_dataset=False,
    )
    args = GRPOConfig(output_dir=str(tmp_path), **settings)
    reference = None if use_peft else load_reference(vlms[fusion], model_args)
    trainer = VisionGRPOTrainer(
        model=model, reward_funcs=reward_functions(["verifier", "format"]), args=args, train_dataset=prompts,
        processing_class=processor, peft_config=peft_config, ref_model=reference,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.images_encoded == 4
    assert any("kl" in log for log in trainer.state.log_history)


def test_shared_prefill_generation_matches_trls(vlms, tmp_path, monkeypatch):
    """Two steps decoded from one prefill per group give the answers, rewards and losses of TRL's own generation (which
    prefills every copy of a prompt) under the same seed."""
    import align.grpo

    runs = {}
    for way in ("shared", "trl"):
        if way == "trl":
            monkeypatch.setattr(VisionGRPOTrainer, "_whole_groups", lambda self, *args: None)
        shared_calls = []
        monkeypatch.setattr(
            align.grpo, "generate_groups",
            lambda *a, calls=shared_calls, f=align.grpo.generate_groups, **k: calls.append(1) or f(*a, **k),
        )
        # No LoRA dropout: its random draws during generation depend on the batch's shape, so the two ways would
        # consume the random stream differently.
        model_args = VLMModelConfig(
            model_name_or_path=vlms["prepend"], use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0
        )
        model, processor = load_vlm(vlms["prepend"], model_args)
        settings = {k: v for k, v in TINY_TRAINING.items() if k != "dtype"}
        settings.update(report_to=[], num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
                        max_steps=2, beta=0.04, shuffle_dataset=False, temperature=1.0)
        trainer = VisionGRPOTrainer(
            model=model, reward_funcs=reward_functions(["format"]), args=GRPOConfig(output_dir=str(tmp_path / way), **settings),
            train_dataset=GRPOScriptArguments(world_path=vlms["world"], num_prompts=8).prompts(), processing_class=processor,
            peft_config=prepare_for_training(model, model_args),
        )
        completions = []
        original = trainer._generate_single_turn
        monkeypatch.setattr(
            trainer, "_generate_single_turn",
            lambda *a, out=completions, f=original, **k: out.append(f(*a, **k)[0]) or (out[-1], None),
        )
        trainer.train()
        losses = [(log["loss"], log["reward"], log["kl"]) for log in trainer.state.log_history if "loss" in log]
        runs[way] = {"shared_calls": len(shared_calls), "completions": completions, "losses": losses}
    assert runs["shared"]["shared_calls"] == 2 and runs["trl"]["shared_calls"] == 0
    assert runs["shared"]["completions"] == runs["trl"]["completions"]
    assert len({tuple(c) for step in runs["shared"]["completions"] for c in step}) > 1  # sampled, not all alike
    for shared, trl in zip(runs["shared"]["losses"], runs["trl"]["losses"], strict=True):
        assert shared == pytest.approx(trl, rel=1e-4, abs=1e-6)


def test_filter_by_pass_rate_keeps_the_prompts_answered_right_only_sometimes(vlms, monkeypatch):
    from align import evaluation
    from align.grpo import filter_by_pass_rate
    from align.prompts import load_prompts

    prompts = load_prompts(vlms["world"], num_prompts=6)
    records = [json.loads(r) if isinstance(r, str) else r for r in prompts["record"]]
    right = [next(a for a in (r["answer"], *r.get("choices", [])) if verify(r, a)) for r in records]
    wrong = [next(a for a in ("It is red.", "It is blue.", "7", "yes", "no", *r.get("choices", [])) if not verify(r, a))
             for r in records]
    # Prompt i gets i % 4 right answers of 3 (3 of 3 counts as "all right" for i % 4 == 3).
    wanted = [min(i % 4, 3) for i in range(len(prompts))]

    seen = []  # the filter samples the prompts in order, a batch at a time

    def fake_sample_batch(model, processor, rows, samples, **kwargs):
        start = len(seen) % len(prompts)
        seen.extend(rows)
        return [[right[start + j]] * wanted[start + j] + [wrong[start + j]] * (samples - wanted[start + j])
                for j in range(len(rows))]

    monkeypatch.setattr(evaluation, "sample_batch", fake_sample_batch)
    kept, report = filter_by_pass_rate(None, None, prompts, samples=3, batch_size=4)
    expected = [i for i, n in enumerate(wanted) if 0 < n < 3]
    assert list(kept["prompt"]) == [prompts["prompt"][i] for i in expected]
    assert report["candidates"] == 6 and report["kept"] == len(expected) and report["samples"] == 3
    assert sum(report["pass_rates"].values()) == 6 and report["pass_rates"]["0/3"] == wanted.count(0)
    # Bounds: everything up to one right answer in three.
    kept, report = filter_by_pass_rate(None, None, prompts, samples=3, low=0.0, high=0.5)
    assert report["kept"] == wanted.count(1)
    with pytest.raises(ValueError, match="needs question records"):
        filter_by_pass_rate(None, None, prompts.remove_columns("record"), samples=3)
    # `reasons` (the recipe passes verify_reasons) reaches the verifier that scores the samples.
    from align import scoring

    made, verifier = [], scoring.VerifierScorer
    monkeypatch.setattr(scoring, "VerifierScorer", lambda reasons=False: made.append(reasons) or verifier(reasons=reasons))
    assert filter_by_pass_rate(None, None, prompts, samples=3, reasons=True)[1]["kept"] == len(expected) and made == [True]
    for bad in ({"filter_samples": 1}, {"filter_pass_rate": [0.5, 0.5]}, {"filter_pass_rate": [-0.1, 1.0]}):
        with pytest.raises(ValueError, match="filter_"):
            GRPOScriptArguments(**bad)


def test_filter_by_pass_rate_with_the_policy_sampling(vlms):
    """On a real (tiny) policy: every prompt gets a pass rate, and the kept ones are those strictly inside."""
    from align.grpo import filter_by_pass_rate
    from align.loading import load_run
    from align.prompts import load_prompts

    model, processor = load_run(vlms["prepend"])
    prompts = load_prompts(vlms["world"], num_prompts=8)
    kept, report = filter_by_pass_rate(model, processor, prompts, samples=2, max_new_tokens=4)
    assert sum(report["pass_rates"].values()) == 8 and set(report["pass_rates"]) <= {"0/2", "1/2", "2/2"}
    assert report["kept"] == len(kept) == report["pass_rates"].get("1/2", 0)
    again, _ = filter_by_pass_rate(model, processor, prompts, samples=2, max_new_tokens=4)
    assert list(again["prompt"]) == list(kept["prompt"])  # the same draws under the same seed
