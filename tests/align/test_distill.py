"""Knowledge distillation: each loss against a hand-computed value, temperature and masking, the top-k teacher, the
off-policy trainer (on the fly and from the cached top-k), the on-policy trainer (TRL's), a ternary student, and
teachers that cannot be compared with the student."""

import math

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from align.data import world_sft_rows
from align.distill import (
    TOPK_COLUMNS,
    DistillConfig,
    DistillTrainer,
    check_compatible_teacher,
    distill_trainer,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    load_for_distillation,
    on_policy_config,
    prompt_rows,
    reverse_kl,
    teacher_topk,
    ternarize_student,
    topk_divergence,
)
from align.training import VLMModelConfig, prepare_for_training
from model import BitLinear
from tests.align.training_helpers import tiny_vlm, tiny_world
from tests.conftest import CORPUS, save_tiny_llama

# ---------------------------------------------------------------------------------------------------------------
# Losses against hand-computed values
# ---------------------------------------------------------------------------------------------------------------

# Two tokens: the teacher is uniform, the student puts 3/4 on the first (logits log 3 and 0).
STUDENT = torch.tensor([[math.log(3.0), 0.0]])
TEACHER = torch.tensor([[0.0, 0.0]])
P, Q = np.array([0.5, 0.5]), np.array([0.75, 0.25])  # teacher, student probabilities


def kl(a, b):
    return float(np.sum(a * np.log(a / b)))


def test_forward_kl_reverse_kl_and_jsd_by_hand():
    assert kl(P, Q) == pytest.approx(0.5 * math.log(4 / 3))  # the closed form the numpy helper must agree with
    loss, metrics = forward_kl(STUDENT, TEACHER)
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert metrics["forward_kl"].item() == pytest.approx(loss.item())
    assert reverse_kl(STUDENT, TEACHER)[0].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    for beta in (0.5, 0.2, 0.9):
        mixture = beta * P + (1 - beta) * Q
        expected = beta * kl(P, mixture) + (1 - beta) * kl(Q, mixture)
        assert generalized_jsd(STUDENT, TEACHER, beta=beta)[0].item() == pytest.approx(expected, rel=1e-5)
    assert generalized_jsd(STUDENT, TEACHER, beta=0.5)[0].item() == pytest.approx(0.033822, abs=1e-6)
    # beta 0 and 1 are the two KLs (TRL's convention)
    assert generalized_jsd(STUDENT, TEACHER, beta=0.0)[0].item() == pytest.approx(kl(P, Q), rel=1e-5)
    assert generalized_jsd(STUDENT, TEACHER, beta=1.0)[0].item() == pytest.approx(kl(Q, P), rel=1e-5)


def test_temperature_softens_both_and_scales_by_its_square():
    # Logits doubled at T = 2 give the same distributions as at T = 1: the loss is 2² times the T = 1 value.
    assert forward_kl(2 * STUDENT, 2 * TEACHER, temperature=2.0)[0].item() == pytest.approx(4 * kl(P, Q), rel=1e-5)
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    for temperature in (0.5, 3.0):
        p = torch.softmax(teacher / temperature, -1).numpy().astype(np.float64)
        q = torch.softmax(student / temperature, -1).numpy().astype(np.float64)
        expected = temperature**2 * np.mean([kl(p[i], q[i]) for i in range(3)])
        assert forward_kl(student, teacher, temperature=temperature)[0].item() == pytest.approx(expected, rel=1e-4)


def test_only_labelled_positions_count():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.tensor([[1, -100, 2, -100], [-100, 3, 4, 5]])
    kept = labels != -100
    for loss_fn in (forward_kl, reverse_kl, generalized_jsd):
        masked = loss_fn(student, teacher, labels)[0]
        assert masked.item() == pytest.approx(loss_fn(student[kept], teacher[kept])[0].item(), rel=1e-6)
        changed = student.clone()
        changed[~kept] = 100 * torch.randn_like(changed[~kept])  # what happens at ignored positions does not matter
        assert loss_fn(changed, teacher, labels)[0].item() == pytest.approx(masked.item(), rel=1e-6)
    # num_tokens replaces the denominator (the tokens of a whole gradient-accumulation step)
    total = forward_kl(student, teacher, labels)[0] * kept.sum()
    assert forward_kl(student, teacher, labels, num_tokens=10)[0].item() == pytest.approx(total.item() / 10, rel=1e-6)


def test_mixture_with_cross_entropy_by_hand():
    labels = torch.tensor([1])  # the student gives the labelled token probability 1/4
    loss, metrics = distillation_loss(STUDENT, labels, teacher_logits=TEACHER, alpha=0.25)
    assert metrics["ce_loss"].item() == pytest.approx(-math.log(0.25), rel=1e-6)
    assert metrics["distill_loss"].item() == pytest.approx(kl(P, Q), rel=1e-5)
    assert loss.item() == pytest.approx(0.25 * kl(P, Q) + 0.75 * -math.log(0.25), rel=1e-5)
    assert metrics["teacher_agreement"].item() == 1.0  # both argmax token 0 (the uniform teacher's first)
    weighted, _ = distillation_loss(STUDENT, labels, teacher_logits=TEACHER, loss="reverse_kl", alpha=1.0, ce_weight=0.5)
    assert weighted.item() == pytest.approx(kl(Q, P) + 0.5 * -math.log(0.25), rel=1e-5)
    baseline, metrics = distillation_loss(STUDENT, labels, alpha=0.0)  # no teacher needed
    assert baseline.item() == pytest.approx(-math.log(0.25), rel=1e-6) and "distill_loss" not in metrics
    with pytest.raises(ValueError, match="needs the teacher"):
        distillation_loss(STUDENT, labels, alpha=0.5)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distillation_loss(STUDENT, labels, teacher_logits=TEACHER, loss="mse")


def test_topk_with_a_tail_bucket_by_hand_and_equal_to_full_when_k_is_the_vocabulary():
    # Teacher (0.7, 0.2, 0.1), k = 1: buckets (0.7 | 0.3); student (0.5, 0.3, 0.2): buckets (0.5 | 0.5).
    teacher, student = torch.tensor([[0.7, 0.2, 0.1]]).log(), torch.tensor([[0.5, 0.3, 0.2]]).log()
    ids, logps = teacher_topk(teacher, 1)
    assert ids.tolist() == [[0]] and logps.exp().item() == pytest.approx(0.7)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert topk_divergence(student, ids, logps)[0].item() == pytest.approx(expected, rel=1e-5)

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, -100, 2, 3, -100], [0, 0, -100, 1, 1]])
    for beta, full_fn in ((0.0, forward_kl), (1.0, reverse_kl), (0.5, generalized_jsd)):
        kwargs = {"beta": beta} if full_fn is generalized_jsd else {}
        full = full_fn(student, teacher, labels, temperature=1.5, **kwargs)[0]
        ids, logps = teacher_topk(teacher[labels != -100], 7, temperature=1.5)
        top = topk_divergence(student, ids, logps, labels, beta=beta, temperature=1.5)[0]
        assert top.item() == pytest.approx(full.item(), rel=1e-5), beta
        fewer = topk_divergence(student, *teacher_topk(teacher[labels != -100], 3, 1.5), labels, beta=beta, temperature=1.5)[0]
        assert fewer.item() <= full.item() + 1e-6  # merging tokens into a bucket never increases the divergence


# ---------------------------------------------------------------------------------------------------------------
# Trainers on tiny models
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_parts, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    small_llm = save_tiny_llama(root / "llama-2layers", tiny_tokenizer, num_layers=2)
    return {
        "root": root,
        "teacher": tiny_vlm(root / "teacher", tiny_parts["siglip"], tiny_parts["llama"]),
        "student": tiny_vlm(root / "student", tiny_parts["siglip"], small_llm),
        "text_teacher": tiny_parts["llama"],
        "text_student": small_llm,
        "world": tiny_world(root / "world", images=8),
    }


@pytest.fixture(scope="module")
def rows(models):
    return world_sft_rows(datasets.load_from_disk(models["world"])["train"]).select(range(4))


def _config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
        report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, max_length=None, seed=0, assistant_only_loss=True,
    )
    return DistillConfig(**{**settings, **overrides})


def _load(path, **model_args):
    args = VLMModelConfig(model_name_or_path=path, **model_args)
    model, processing = load_for_distillation(path, args)
    return model, processing, args


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model):
    after = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, after[name].detach())}


def _logged(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log and "train_runtime" not in log]


def test_off_policy_steps_train_the_student_against_a_frozen_teacher(models, rows, tmp_path):
    teacher, _, _ = _load(models["teacher"])
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a confident teacher: a random tiny one is nearly uniform, like the student
    student, processor, args = _load(models["student"])
    peft_config = prepare_for_training(student, args)  # full fine-tuning of the LLM and projector
    # One fixed batch (2 rows, batch 2) seen at every step: the distillation loss must go down.
    trainer = DistillTrainer(
        student, teacher, _config(tmp_path, max_steps=6, alpha=0.8), rows.select(range(2)), processor,
        peft_config=peft_config,
    )
    teacher_before, student_before = _snapshot(teacher), _snapshot(trainer.model)
    trainer.train()
    assert not _changed(teacher_before, teacher) and not teacher.training
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert _changed(student_before, trainer.model) == trainable
    assert not any("vision_towers" in name for name in trainable)
    distill, ce = _logged(trainer, "distill_loss"), _logged(trainer, "ce_loss")
    assert len(distill) == 6 and all(math.isfinite(v) for v in distill + ce)
    assert distill[-1] < 0.7 * distill[0]
    losses = _logged(trainer, "loss")
    assert losses[0] == pytest.approx(0.8 * distill[0] + 0.2 * ce[0], rel=1e-3)


def test_cached_teacher_topk_gives_the_on_the_fly_loss_when_k_is_the_vocabulary(models, rows, tmp_path):
    teacher, _, _ = _load(models["teacher"])
    student, processor, _ = _load(models["student"])
    vocab = student.config.text_config.vocab_size
    settings = dict(max_steps=1, alpha=0.7, temperature=2.0, distillation_loss="reverse_kl")
    live = DistillTrainer(student, teacher, _config(tmp_path / "live", **settings), rows, processor)
    cached = DistillTrainer(student, teacher, _config(tmp_path / "cached", cache_teacher_topk=vocab, **settings), rows, processor)
    assert cached.teacher_model is None and set(TOPK_COLUMNS) <= set(cached.train_dataset.column_names)
    assert live.teacher_model is not None and not set(TOPK_COLUMNS) & set(live.train_dataset.column_names)
    batch_rows = [dict(cached.train_dataset[i]) for i in range(3)]
    labelled = int((live.data_collator([dict(rows[i]) for i in range(3)])["labels"][:, 1:] != -100).sum())
    assert len(batch_rows[0][TOPK_COLUMNS[0]]) == vocab * int(
        (live.data_collator([dict(rows[0])])["labels"][:, 1:] != -100).sum()
    )
    student.eval()
    with torch.no_grad():
        cached_batch = cached._prepare_inputs(cached.data_collator(batch_rows))
        assert cached_batch[TOPK_COLUMNS[0]].shape == (labelled, vocab)
        from_cache = cached.compute_loss(student, cached_batch)
        on_the_fly = live.compute_loss(student, live._prepare_inputs(live.data_collator([dict(rows[i]) for i in range(3)])))
    assert from_cache.item() == pytest.approx(on_the_fly.item(), rel=1e-4)

    # The first training step is the same too (same seed, same row order), and the cache is read, not the teacher.
    steps = {}
    for name, config in (("live", _config(tmp_path / "l2", **settings)), ("cached", _config(tmp_path / "c2", cache_teacher_topk=vocab, **settings))):
        fresh, _, _ = _load(models["student"])
        trainer = DistillTrainer(fresh, teacher, config, rows, processor)
        trainer.train()
        steps[name] = _logged(trainer, "loss")[0]
    assert steps["cached"] == pytest.approx(steps["live"], rel=1e-4)


def test_off_policy_on_text_llms_live_and_cached(models, tmp_path):
    teacher, tokenizer, _ = _load(models["text_teacher"])
    student, _, _ = _load(models["text_student"])
    questions = [line.split(" Answer: ") for line in CORPUS[2:6]]
    text = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in questions
    ]})
    vocab = student.config.vocab_size
    losses = {}
    for name, extra in (("live", {}), ("cached", {"cache_teacher_topk": vocab})):
        trainer = DistillTrainer(student, teacher, _config(tmp_path / name, max_steps=1, alpha=0.5, **extra), text, tokenizer)
        student.eval()
        rows = [dict(trainer.train_dataset[i]) for i in range(4)]
        with torch.no_grad():
            losses[name] = trainer.compute_loss(student, trainer._prepare_inputs(trainer.data_collator(rows))).item()
    assert math.isfinite(losses["live"]) and losses["cached"] == pytest.approx(losses["live"], rel=1e-4)
    before = _snapshot(student)
    trainer.train()
    assert _changed(before, student)


def test_ternary_student_step_and_its_save_reloads_ternary(models, rows, tmp_path):
    teacher, _, _ = _load(models["teacher"])
    student, processor, args = _load(models["teacher"])  # post-training ternarization: the student starts as the teacher
    replaced = ternarize_student(student)
    layers = student.config.text_config.num_hidden_layers
    assert len(replaced) == layers * 7 and student.config.ternary
    assert isinstance(student.model.language_model.layers[0].mlp.down_proj, BitLinear)
    assert not isinstance(student.lm_head, BitLinear)  # embeddings and head stay full precision
    prepare_for_training(student, args)
    trainer = DistillTrainer(student, teacher, _config(tmp_path, max_steps=2, alpha=1.0), rows, processor)
    before = _snapshot(student)
    trainer.train()
    distill = _logged(trainer, "distill_loss")
    assert distill[0] > 0 and all(math.isfinite(v) for v in distill)  # the ternary student differs from its teacher
    changed = _changed(before, student)
    assert "model.language_model.layers.0.mlp.down_proj.weight" in changed  # latent weights, through the STE

    trainer.save_model(tmp_path / "out")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded.model.language_model.layers[0].self_attn.q_proj, BitLinear)
    batch = trainer.data_collator([dict(rows[0])])
    batch.pop("labels")
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, student(**batch).logits, rtol=1e-4, atol=1e-4)


def test_on_policy_step_on_a_vlm_and_on_text_llms(models, rows, tmp_path):
    # VLM: the prompts keep their images; the student samples answers, the teacher scores them (TRL's trainer).
    prompts = prompt_rows(rows)
    assert prompts.column_names == ["images", "prompt"] and len(prompts) == 4
    assert all(prompt[-1]["role"] == "user" for prompt in prompts["prompt"])  # the student writes the last answer
    teacher, _, _ = _load(models["teacher"])
    student, processor, args = _load(models["student"], use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    peft_config = prepare_for_training(student, args)  # a LoRA student
    config = _config(tmp_path / "vlm", max_steps=2, mode="on_policy", distillation_loss="jsd", jsd_beta=0.3, max_completion_length=6)
    trainer = distill_trainer(student, teacher, config, rows, processor, peft_config=peft_config)
    assert type(trainer).__name__ == "DistillationTrainer" and trainer.beta == 0.3
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert any("lora_B" in name for name in changed) and all("lora_" in n or "modules_to_save" in n for n in changed)
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and logged["loss"] > 0 and 1 <= logged["completions/mean_length"] <= 6

    # Text LLMs, conversational prompts without images.
    teacher, tokenizer, _ = _load(models["text_teacher"])
    student, _, _ = _load(models["text_student"])
    text = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in CORPUS[2:6]]})
    trainer = distill_trainer(student, teacher, _config(tmp_path / "text", max_steps=1, mode="on_policy", max_completion_length=4), text, tokenizer)
    before = _snapshot(student)
    trainer.train()
    assert _changed(before, student) and math.isfinite(trainer.state.log_history[0]["loss"])


def test_on_policy_config_carries_the_training_settings(tmp_path):
    config = _config(tmp_path, mode="on_policy", distillation_loss="reverse_kl", temperature=0.7, learning_rate=3e-4)
    converted = on_policy_config(config)
    assert converted.beta == 1.0 and converted.temperature == 0.7 and converted.learning_rate == 3e-4
    assert converted.use_cpu and converted.output_dir == str(tmp_path) and not converted.activation_checkpointing


def test_config_validation(tmp_path):
    for bad, match in (
        ({"distillation_loss": "mse"}, "distillation_loss"),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"jsd_beta": -0.1}, "jsd_beta"),
        ({"mode": "online"}, "mode"),
        ({"cache_teacher_topk": 0}, "cache_teacher_topk"),
        ({"cache_teacher_topk": 8, "alpha": 0.0}, "alpha 0"),
        ({"mode": "on_policy", "alpha": 0.5}, "alpha 1"),
        ({"mode": "on_policy", "cache_teacher_topk": 8}, "off-policy only"),
    ):
        with pytest.raises(ValueError, match=match):
            _config(tmp_path, **bad)


# ---------------------------------------------------------------------------------------------------------------
# Teachers that cannot be compared with the student
# ---------------------------------------------------------------------------------------------------------------


def test_different_vocabularies_are_a_clear_error(models, tmp_path):
    from align.zoo.tokenizer import train_tokenizer

    teacher, teacher_tokenizer, _ = _load(models["text_teacher"])
    # A smaller vocabulary: the sizes differ.
    other = train_tokenizer(CORPUS, vocab_size=300)
    other_path = save_tiny_llama(tmp_path / "other", other)
    small, small_tokenizer, _ = _load(other_path)
    with pytest.raises(ValueError, match=rf"teacher {models['text_teacher']}.*student {other_path}.*not supported"):
        check_compatible_teacher(teacher, small, teacher_tokenizer, small_tokenizer, models["text_teacher"], other_path)
    # The same size, different tokens.
    shuffled = train_tokenizer([line[::-1] for line in CORPUS], vocab_size=len(teacher_tokenizer))
    assert len(shuffled) == len(teacher_tokenizer)
    student, student_tokenizer, _ = _load(save_tiny_llama(tmp_path / "reversed", shuffled))
    with pytest.raises(ValueError, match="different tokenizer vocabularies"):
        check_compatible_teacher(teacher, student, teacher_tokenizer, student_tokenizer, "t", "s")
    # A text LLM cannot be ternarized with a record of it.
    with pytest.raises(ValueError, match="needs a VLM student"):
        ternarize_student(teacher)
    # The trainer refuses a teacher of another vocabulary size too.
    vlm_student, processor, _ = _load(models["student"])
    with pytest.raises(ValueError, match="vocab_size"):
        DistillTrainer(vlm_student, small, _config(tmp_path / "run"), datasets.Dataset.from_dict(
            {"images": [[]], "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}
        ), processor)
