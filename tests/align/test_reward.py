"""Reward modelling: the Bradley-Terry loss and pairwise accuracy against hand computations, training steps on a tiny
VLM and world (the loss goes down, the head and LoRA weights move, frozen weights do not), and scoring with
`reward_scores` / `evaluate_pairs` / `load_reward_model`."""

import math
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import set_seed

from align.data import world_preference_rows
from align.loading import load_run
from align.reward import (
    RewardCollator,
    RewardScriptArguments,
    VLMRewardConfig,
    _reward_model_of,
    answer_start_ids,
    bradley_terry_loss,
    drop_long_pairs,
    evaluate_pairs,
    held_out_pairs,
    likelihood_scores,
    load_reward_model,
    load_reward_model_for_training,
    pack_reward_pairs,
    pair_image_inputs,
    pairwise_accuracy,
    policy_likelihood_accuracy,
    prepare_reward_model,
    render_conversation,
    reward_model_from_folder,
    reward_scores,
    reward_trainer,
)
from align.training import VLMModelConfig
from align.world import WorldConfig, build_world
from model import VLMForConditionalGeneration, VLMForRewardModeling, VLMProcessor
from tests.align.training_helpers import IMAGE_SIZE, tiny_vlm
from tests.conftest import save_tiny_llama

LN2 = math.log(2)


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    world_path = root / "world"
    world = build_world(str(world_path), sizes={"train": 8, "validation": 3}, config=WorldConfig(image_size=IMAGE_SIZE), seed=0)
    return {
        "vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]),
        "world_path": str(world_path),
        "pairs": world_preference_rows(world["train"], seed=0, per_image=1),
        "held_out": world_preference_rows(world["validation"], seed=0, per_image=2),
    }


def training_args(output_dir, **settings) -> VLMRewardConfig:
    defaults = {
        "output_dir": str(output_dir), "use_cpu": True, "bf16": False, "activation_checkpointing": False,
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler_type": "constant", "max_steps": 8,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "dataloader_num_workers": 0, "seed": 0,
        "max_length": None,
    }
    return VLMRewardConfig(**{**defaults, **settings})


def model_args(vlm: str, **settings) -> VLMModelConfig:
    defaults = {"model_name_or_path": vlm, "dtype": "float32", "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    return VLMModelConfig(**{**defaults, **settings})


# ---------------------------------------------------------------------------------------------------------------
# Loss and accuracy
# ---------------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, 2.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -2, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2)) + LN2) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    margin = torch.tensor([0.5, 0.0, -1.0])  # d - margin = 0.5, -2, 1
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 3
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(LN2)


def test_pairwise_accuracy_counts_ties_as_half():
    chosen = [3.0, 1.0, 2.0, 0.0, 5.0]
    rejected = [1.0, 2.0, 2.0, -1.0, 5.0]
    # win, loss, tie, win, tie -> (1 + 0 + 0.5 + 1 + 0.5) / 5
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(0.6)
    assert pairwise_accuracy(torch.zeros(7), torch.zeros(7)) == 0.5
    assert pairwise_accuracy(torch.tensor([[2.0], [0.0]]), torch.tensor([1.0, 1.0])) == 0.5
    with pytest.raises(ValueError, match="3 chosen scores for 2 rejected"):
        pairwise_accuracy([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no pairs"):
        pairwise_accuracy([], [])


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_script_arguments_validation(setup):
    with pytest.raises(ValueError, match="pairs_per_image must be >= 1"):
        RewardScriptArguments(pairs_per_image=0)
    with pytest.raises(ValueError, match="eval_images must be >= 0"):
        RewardScriptArguments(eval_images=-1)
    with pytest.raises(ValueError, match="is the training split"):
        RewardScriptArguments(eval_split="train")
    args = RewardScriptArguments(world_path=setup["world_path"], eval_images=2, pairs_per_image=2)
    pairs = held_out_pairs(args, seed=0)  # the validation split by default
    assert len(pairs) == 4 and {"images", "prompt", "chosen", "rejected", "category"} <= set(pairs.column_names)
    assert held_out_pairs(RewardScriptArguments(world_path=setup["world_path"], eval_images=0), seed=0) is None
    with pytest.raises(ValueError, match="no split 'test'"):
        held_out_pairs(RewardScriptArguments(world_path=setup["world_path"], eval_split="test"), seed=0)


def test_collator_renders_both_sides_and_processes_each_image_once(setup):
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    pairs = [setup["pairs"][i] for i in range(3)]
    batch = RewardCollator(processor)(pairs)
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 3
    texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=False)
    for i, pair in enumerate(pairs):
        assert pair["chosen"][0]["content"][0]["text"] in texts[i]
        assert pair["rejected"][0]["content"][0]["text"] in texts[3 + i]
        assert texts[i].count(processor.tokenizer.bos_token) == 1  # the template's BOS, not a second one
    with_margin = RewardCollator(processor)([{**pair, "margin": 0.5} for pair in pairs])
    assert with_margin["margin"].tolist() == [0.5] * 3


def test_drop_long_pairs(setup):
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    pairs = setup["pairs"]
    lengths = [
        max(
            len(processor(images=[p["images"]], text=[processor.apply_chat_template(p["prompt"] + p[s], tokenize=False)], add_special_tokens=False)["input_ids"][0])
            for s in ("chosen", "rejected")
        )
        for p in pairs
    ]
    limit = sorted(lengths)[len(lengths) // 2]
    kept = drop_long_pairs(pairs, processor, limit)
    assert len(kept) == sum(length <= limit for length in lengths) and 0 < len(kept) < len(pairs)
    assert drop_long_pairs(pairs, processor, None) is pairs
    with pytest.raises(ValueError, match="no preference pair fits in max_length=3"):
        drop_long_pairs(pairs, processor, 3)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_lora_training_lowers_the_loss_and_trains_the_head_and_adapters_only(setup, tmp_path):
    set_seed(0)
    model = VLMForRewardModeling.from_vlm(setup["vlm"])
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    args = model_args(setup["vlm"])
    peft_config = prepare_reward_model(model, args)
    assert peft_config.task_type == "SEQ_CLS" and "score" in peft_config.modules_to_save
    trainer = reward_trainer(model, training_args(tmp_path, max_steps=16), setup["pairs"], processor, peft_config=peft_config)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}

    history = losses(trainer)
    assert history[0] == pytest.approx(LN2, abs=1e-6)  # zero head: every answer scores 0
    assert sum(history[-4:]) / 4 < LN2 - 0.05, history  # 8 pairs seen 8 times: learnable
    assert any("score" in name for name in changed)
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)
    frozen = [name for name, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and not changed & set(frozen)
    assert any("vision_towers" in name for name in frozen) and any("base_layer" in name for name in frozen)
    logged = next(log for log in trainer.state.log_history if "loss" in log)
    assert {"accuracy", "margin", "mean_reward"} <= logged.keys()


def test_full_training_of_the_align_stage_trains_projectors_and_head(setup, tmp_path):
    set_seed(0)
    model = VLMForRewardModeling.from_vlm(setup["vlm"])
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    assert prepare_reward_model(model, model_args(setup["vlm"], use_peft=False, stage="align")) is None
    before = snapshot(model)
    trainer = reward_trainer(model, training_args(tmp_path, max_steps=4), setup["pairs"], processor)
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert "score.weight" in changed and any(name.startswith("model.projectors") for name in changed)
    assert all(name.startswith(("score", "model.projectors")) for name in changed)
    assert losses(trainer)[-1] < losses(trainer)[0]


def test_qlora_on_cross_attention_fusion_trains_and_reloads_in_4bit(setup, tiny_parts, tiny_tokenizer, tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    # bitsandbytes quantises in blocks of 64 inputs: the LLM needs hidden size >= 64.
    llama64 = save_tiny_llama(tmp_path / "llama64", tiny_tokenizer, hidden_size=64)
    vlm = tiny_vlm(tmp_path / "cross64", tiny_parts["siglip"], llama64, "cross_attention")
    args = model_args(vlm, load_in_4bit=True, use_bnb_nested_quant=True)
    set_seed(0)
    model, processor = load_reward_model_for_training(vlm, args)
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(model.score) is torch.nn.Linear
    trainer = reward_trainer(
        model, training_args(tmp_path / "run", max_steps=4), setup["pairs"], processor,
        peft_config=prepare_reward_model(model, args),
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert all(math.isfinite(loss) for loss in losses(trainer))
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)}
    assert any(".score." in name for name in changed) and any("lora_B" in name for name in changed)
    assert any("cross_attention" in name for name in changed)  # the stage's adapters train in full

    trainer.save_model(str(tmp_path / "run"))
    processor.save_pretrained(tmp_path / "run")
    rows = score_rows(list(setup["held_out"]))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    loaded, loaded_processor = load_reward_model(tmp_path / "run", quantization_config=quantization)
    expected = reward_scores(trainer.model, processor, rows)
    # Trained with its adapters, head and cross-attention adapters in bf16 (QLoRA, as TRL's trainers), reloaded in
    # float32: the same scores up to bf16 rounding.
    assert reward_scores(loaded, loaded_processor, rows) == pytest.approx(expected, rel=0.1)


def test_score_learning_rate_gives_the_head_its_own_group(setup, tmp_path):
    model = VLMForRewardModeling.from_vlm(setup["vlm"])
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    peft_config = prepare_reward_model(model, model_args(setup["vlm"]))
    args = training_args(tmp_path, learning_rate=1e-3, score_learning_rate=5e-2)
    trainer = reward_trainer(model, args, setup["pairs"], processor, peft_config=peft_config)
    optimizer = trainer.create_optimizer()
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], []).extend(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-3, 5e-2}
    assert by_lr[5e-2] and all(".score." in name for name in by_lr[5e-2])
    assert any("lora_A" in name for name in by_lr[1e-3]) and not any(".score." in name for name in by_lr[1e-3])
    assert trainer.create_optimizer() is optimizer  # built once
    with pytest.raises(ValueError, match="score_learning_rate must be > 0"):
        training_args(tmp_path, score_learning_rate=0.0)


def test_unsupported_settings_are_refused(setup, tmp_path):
    model = VLMForRewardModeling.from_vlm(setup["vlm"])
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    with pytest.raises(ValueError, match="chat_template_path is not supported"):
        reward_trainer(model, training_args(tmp_path, chat_template_path="template.jinja"), setup["pairs"], processor)


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A LoRA reward model trained a few steps, saved as the recipe saves it."""
    output_dir = tmp_path_factory.mktemp("trained")
    set_seed(0)
    model = VLMForRewardModeling.from_vlm(setup["vlm"])
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    peft_config = prepare_reward_model(model, model_args(setup["vlm"]))
    trainer = reward_trainer(
        model, training_args(output_dir, max_steps=4), setup["pairs"], processor, peft_config=peft_config,
        eval_dataset=setup["held_out"],
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    processor.save_pretrained(output_dir)
    return trainer, processor, output_dir


def score_rows(pairs, side="chosen", as_text=False):
    return [
        {
            "images": pair["images"][0] if i % 2 else pair["images"],  # one image or a list of them
            "prompt": pair["prompt"],
            "completion": pair[side][0]["content"][0]["text"] if as_text else pair[side],
        }
        for i, pair in enumerate(pairs)
    ]


def test_reward_scores_one_float_per_row_whatever_the_batching(setup, trained):
    trainer, processor, _ = trained
    model = trainer.model
    model.train()
    pairs = list(setup["pairs"])
    rows = score_rows(pairs) + score_rows(pairs, "rejected")
    scores = reward_scores(model, processor, rows, batch_size=16)
    assert len(scores) == len(rows) and all(isinstance(s, float) for s in scores)
    assert model.training  # the caller's mode is restored
    assert len(set(scores)) > 1
    for batch_size in (1, 3):
        assert reward_scores(model, processor, rows, batch_size=batch_size) == pytest.approx(scores, abs=1e-5)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    shuffled = reward_scores(model, processor, [rows[i] for i in order], batch_size=5)
    assert shuffled == pytest.approx([scores[i] for i in order], abs=1e-5)
    # A plain answer string scores as the same answer in an assistant message.
    as_text = reward_scores(model, processor, score_rows(pairs, as_text=True), batch_size=4)
    assert as_text == pytest.approx(scores[: len(pairs)], abs=1e-5)


def test_reward_scores_match_the_training_forward(setup, trained):
    """`reward_scores` renders conversations as the trainer's collator does: same rewards for the same pairs."""
    trainer, processor, _ = trained
    pairs = [setup["pairs"][i] for i in range(4)]
    batch = RewardCollator(processor)(pairs)
    trainer.model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    chosen = reward_scores(trainer.model, processor, score_rows(pairs))
    rejected = reward_scores(trainer.model, processor, score_rows(pairs, "rejected"))
    assert chosen == pytest.approx(outputs["chosen"].tolist(), abs=1e-5)
    assert rejected == pytest.approx(outputs["rejected"].tolist(), abs=1e-5)


def packed_as_rows(trainer, batch, tolerance: float = 1e-5):
    """The trainer's packed loss on `batch` against the chosen and rejected rows run apart: the same rewards, loss and
    gradients. Returns the rows' `(chosen, rejected, loss, packed gradients)`."""
    model = trainer.model

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    packed_grads = gradients(loss)
    rows = dict(batch)
    rows.update(pair_image_inputs(model, rows.pop("pixel_values")))
    chosen, rejected = model(**rows, use_cache=False).logits.squeeze(-1).chunk(2)
    apart = bradley_terry_loss(chosen, rejected)
    apart_grads = gradients(apart)
    assert outputs["chosen"].tolist() == pytest.approx(chosen.tolist(), abs=tolerance)
    assert outputs["rejected"].tolist() == pytest.approx(rejected.tolist(), abs=tolerance)
    assert loss.item() == pytest.approx(apart.item(), abs=tolerance / 10)
    assert packed_grads.keys() == apart_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, apart_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()
    return chosen, rejected, apart, packed_grads


def test_one_packed_forward_per_pair_scores_and_trains_as_two_rows(setup, trained):
    """The trainer scores each pair in one sequence, image and prompt shared (`pack_reward_pairs`): the rewards, the
    loss and its gradients equal those of the chosen and rejected rows run apart."""
    trainer, processor, _ = trained
    model = trainer.model
    model.train()
    pairs = [setup["pairs"][i] for i in range(4)]
    batch = RewardCollator(processor)(pairs)
    packed = pack_reward_pairs(batch, image_token_id=model.config.image_token_id)
    assert packed is not None and packed["input_ids"].shape[0] == 4
    assert packed["input_ids"].shape[1] < 2 * batch["input_ids"].shape[1] - 20  # the prompt goes in once

    chosen, rejected, apart, _ = packed_as_rows(trainer, batch)
    trainer.args.pack_pairs = False  # the switch runs the rows apart
    try:
        assert trainer.compute_loss(model, batch).item() == pytest.approx(apart.item(), abs=1e-6)
    finally:
        trainer.args.pack_pairs = True

    # The packed sequences themselves score as the rows apart (the trainer did not fall back to them).
    with torch.no_grad():
        packed.update(pair_image_inputs(model, packed.pop("pixel_values"), repeat=False))
        scores = model(**packed, use_cache=False).logits
    assert scores.shape == (4, 2)
    torch.testing.assert_close(scores, torch.stack([chosen, rejected], dim=1).detach(), atol=1e-5, rtol=1e-5)
    # Batches it does not know how to halve are run as rows.
    assert pack_reward_pairs({**batch, "cross_attention_mask": batch["attention_mask"]}) is None
    assert pack_reward_pairs({k: v[:7] if k != "pixel_values" else v for k, v in batch.items()}) is None


def test_evaluate_pairs_and_the_trainer_evaluation_agree(setup, trained):
    trainer, processor, _ = trained
    held_out = setup["held_out"]
    result = evaluate_pairs(trainer.model, processor, held_out, batch_size=4)
    chosen = reward_scores(trainer.model, processor, score_rows(held_out))
    rejected = reward_scores(trainer.model, processor, score_rows(held_out, "rejected"))
    assert result["pairs"] == len(held_out)
    assert result["accuracy"] == pytest.approx(pairwise_accuracy(chosen, rejected))
    assert result["mean_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / len(held_out), abs=1e-6)
    for category in set(held_out["category"]):
        indices = [i for i, c in enumerate(held_out["category"]) if c == category]
        assert result[f"pairs_{category}"] == len(indices)
        expected = pairwise_accuracy([chosen[i] for i in indices], [rejected[i] for i in indices])
        assert result[f"accuracy_{category}"] == pytest.approx(expected)
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == pytest.approx(result["accuracy"])
    assert metrics["eval_margin"] == pytest.approx(result["mean_margin"], abs=1e-5)
    without_category = Dataset.from_list([{k: v for k, v in pair.items() if k != "category"} for pair in held_out])
    assert not any(key.startswith("accuracy_") for key in evaluate_pairs(trainer.model, processor, without_category))


def test_likelihood_scores_sum_the_answer_tokens_log_probs(setup):
    """The policy's log-likelihood of each answer, by hand: the rendered conversation's tokens after the prompt
    (`add_generation_prompt`), each scored from the position before it; the same in any batch."""
    policy, processor = load_run(setup["vlm"])
    pairs = list(setup["held_out"])
    rows = score_rows(pairs) + score_rows(pairs, "rejected")
    scores = likelihood_scores(policy, processor, rows, batch_size=16)
    assert all(s < 0 for s in scores) and len(set(scores)) > 1
    for i in (0, len(pairs)):  # one chosen, one rejected answer
        row = rows[i]
        images = [row["images"]] if not isinstance(row["images"], list) else row["images"]
        prompt = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = render_conversation(processor, row["prompt"], row["completion"])
        start = processor(images=[images], text=[prompt], add_special_tokens=False, return_tensors="pt")["input_ids"].shape[1]
        inputs = processor(images=[images], text=[full], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logps = torch.log_softmax(policy(**inputs).logits[0].float(), dim=-1)
        ids = inputs["input_ids"][0]
        expected = sum(logps[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert start < len(ids) and scores[i] == pytest.approx(expected, abs=1e-4)
    for batch_size in (1, 3):
        assert likelihood_scores(policy, processor, rows, batch_size=batch_size) == pytest.approx(scores, abs=1e-4)
    result = evaluate_pairs(policy, processor, setup["held_out"], batch_size=4, scorer=likelihood_scores)
    assert result["accuracy"] == pytest.approx(pairwise_accuracy(scores[: len(pairs)], scores[len(pairs) :]))
    by_path = policy_likelihood_accuracy(setup["vlm"], setup["held_out"], batch_size=4)
    assert by_path["accuracy"] == pytest.approx(result["accuracy"]) and by_path["pairs"] == len(pairs)
    assert policy_likelihood_accuracy(setup["vlm"], None) == {}


def test_policy_likelihood_accuracy_of_a_lora_run_leaves_the_random_state(setup, tmp_path):
    """Loading a LoRA policy initialises its layers from torch's generator; the reward model trained after the
    baseline must not depend on whether it ran."""
    policy = get_peft_model(
        VLMForConditionalGeneration.from_pretrained(setup["vlm"]), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    policy.save_pretrained(tmp_path / "lora")
    state = torch.random.get_rng_state()
    result = policy_likelihood_accuracy(str(tmp_path / "lora"), setup["held_out"], batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result["pairs"] == len(setup["held_out"]) and 0.0 <= result["accuracy"] <= 1.0


def test_load_reward_model_from_an_adapter_and_a_full_folder(setup, trained, tmp_path):
    trainer, processor, output_dir = trained
    rows = score_rows(list(setup["held_out"]))
    expected = reward_scores(trainer.model, processor, rows)
    loaded, loaded_processor = load_reward_model(output_dir)
    assert not loaded.training
    assert reward_scores(loaded, loaded_processor, rows) == pytest.approx(expected, abs=1e-5)

    merged = loaded.merge_and_unload()
    assert isinstance(merged, VLMForRewardModeling)
    merged.save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")
    full, full_processor = load_reward_model(tmp_path / "full", device="cpu")
    assert isinstance(full, VLMForRewardModeling)
    assert reward_scores(full, full_processor, rows) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="holds no reward model"):
        load_reward_model(setup["vlm"])


# ---------------------------------------------------------------------------------------------------------------
# The likelihood feature: the answer's log-likelihood under the kept LM head, added to the reward
# ---------------------------------------------------------------------------------------------------------------


def test_likelihood_feature_starts_at_the_policys_own_preference(setup):
    """Before training (head at zero, scale 1) the reward is the policy's log-likelihood of the answer, exactly
    `likelihood_scores`; the answer starts after the tokens that precede it in the chat template."""
    processor = VLMProcessor.from_pretrained(setup["vlm"])
    start = answer_start_ids(processor)
    opened = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False, add_generation_prompt=True
    )
    assert start and processor.tokenizer.decode(start) in opened and opened.endswith(processor.tokenizer.decode(start))
    model = reward_model_from_folder(setup["vlm"], likelihood=True).eval()
    assert model.likelihood_feature and model.config.answer_start_ids == start
    assert model.likelihood_scale.weight.item() == 1.0 and not model.score.weight.any()
    policy, _ = load_run(setup["vlm"])
    assert torch.equal(model.lm_head.weight, policy.lm_head.weight)
    pairs = list(setup["held_out"])
    rows = score_rows(pairs) + score_rows(pairs, "rejected")
    assert reward_scores(model, processor, rows, batch_size=3) == pytest.approx(
        likelihood_scores(policy, processor, rows, batch_size=5), abs=1e-4
    )
    # Without the feature (the default) the same folder gives the plain reward model: no LM head, zero scores.
    plain = reward_model_from_folder(setup["vlm"])
    assert not plain.likelihood_feature and plain.get_output_embeddings() is None


@pytest.fixture(scope="module")
def trained_with_likelihood(setup, tmp_path_factory):
    """A LoRA reward model with the likelihood feature, trained a few steps and saved as the recipe saves it."""
    output_dir = tmp_path_factory.mktemp("trained_likelihood")
    set_seed(0)
    arguments = model_args(setup["vlm"])
    model, processor = load_reward_model_for_training(setup["vlm"], arguments, likelihood=True)
    peft_config = prepare_reward_model(model, arguments)
    assert {"score", "likelihood_scale"} <= set(peft_config.modules_to_save)
    trainer = reward_trainer(
        model, training_args(output_dir, max_steps=4, likelihood_feature=True), setup["pairs"], processor,
        peft_config=peft_config,
    )
    before = snapshot(trainer.model)
    trainer.train()
    trainer.save_model(str(output_dir))
    processor.save_pretrained(output_dir)
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)}
    return trainer, processor, output_dir, changed


def test_likelihood_feature_trains_its_scale_and_reloads(setup, trained_with_likelihood, tmp_path):
    trainer, processor, output_dir, changed = trained_with_likelihood
    assert any("likelihood_scale" in name for name in changed) and any("score" in name for name in changed)
    assert not any("lm_head" in name for name in changed)  # the kept LM head is frozen under LoRA, as the LLM
    rows = score_rows(list(setup["held_out"])) + score_rows(list(setup["held_out"]), "rejected")
    expected = reward_scores(trainer.model, processor, rows)
    loaded, loaded_processor = load_reward_model(output_dir)
    assert _reward_model_of(loaded).likelihood_feature
    assert reward_scores(loaded, loaded_processor, rows) == pytest.approx(expected, abs=1e-4)
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")
    full, full_processor = load_reward_model(tmp_path / "full")
    assert full.likelihood_feature
    assert reward_scores(full, full_processor, rows) == pytest.approx(expected, abs=1e-4)


def test_likelihood_feature_one_packed_forward_per_pair_as_two_rows(setup, trained_with_likelihood):
    """Packed pairs sum each answer's log-probabilities as its own row does: same rewards, loss and gradients."""
    trainer, processor, _, _ = trained_with_likelihood
    model = trainer.model
    model.train()
    batch = RewardCollator(processor)([setup["pairs"][i] for i in range(4)])
    packed = pack_reward_pairs(batch, image_token_id=model.config.image_token_id, answer_start=model.config.answer_start_ids)
    assert packed["likelihood_tokens"].shape == (*packed["input_ids"].shape, 2)
    assert packed["likelihood_tokens"].any(1).all()  # every answer has tokens

    _, _, _, gradients = packed_as_rows(trainer, batch, tolerance=1e-4)
    assert any("likelihood_scale" in name for name in gradients)
