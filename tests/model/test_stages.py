"""freeze_for_stage: each stage's trainable parts, its summary and its log."""

import logging

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from model import STAGES, VLMConfig, VLMForConditionalGeneration, freeze_for_stage

COMPONENTS = ("vision_towers", "projectors", "cross_attention", "language_model", "lm_head")
EXPECTED = {
    "prealign": {"vision_towers", "projectors", "cross_attention"},
    "align": {"projectors", "cross_attention"},
    "finetune": {"projectors", "cross_attention", "language_model", "lm_head"},
    "full": set(COMPONENTS),
}


def build(parts, tokenizer, fusion="cross_attention", llm="llama"):
    torch.manual_seed(0)
    config = VLMConfig(fusion=fusion, cross_attention_every=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    siglip = AutoModel.from_pretrained(parts["siglip"])
    return VLMForConditionalGeneration.from_parts(config, [siglip], AutoModelForCausalLM.from_pretrained(parts[llm]))


def component(model, name):
    return model.lm_head if name == "lm_head" else getattr(model.model, name)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_sets_requires_grad_per_component(tiny_parts, tiny_tokenizer, stage, caplog):
    model = build(tiny_parts, tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="model.stages"):
        summary = freeze_for_stage(model, stage)
    assert set(summary) == set(COMPONENTS)
    for name in COMPONENTS:
        flags = {p.requires_grad for p in component(model, name).parameters()}
        assert flags == {name in EXPECTED[stage]}, name
        assert summary[name]["trainable"] == (name in EXPECTED[stage])
        assert summary[name]["parameters"] == sum(p.numel() for p in component(model, name).parameters())
        assert f"{name} {'trainable' if name in EXPECTED[stage] else 'frozen'}" in caplog.text
    assert sum(e["parameters"] for e in summary.values()) == model.num_parameters()


def test_stages_registry_and_unknown_stage(tiny_parts, tiny_tokenizer):
    assert set(STAGES) == set(EXPECTED)
    model = build(tiny_parts, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"unknown stage 'pretrain'; supported: \['align', 'finetune', 'full', 'prealign'\]"):
        freeze_for_stage(model, "pretrain")


def test_prepend_model_has_no_adapters_and_a_tied_head_is_counted_once(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, fusion="prepend", llm="qwen2")
    summary = freeze_for_stage(model, "align")
    assert "cross_attention" not in summary
    assert summary["lm_head"]["parameters"] == 0  # tied to the input embeddings, counted under language_model
    assert not model.get_input_embeddings().weight.requires_grad
    assert sum(e["parameters"] for e in summary.values()) == model.num_parameters()
    freeze_for_stage(model, "finetune")
    assert model.get_input_embeddings().weight.requires_grad


def test_align_stage_trains_only_projectors_and_adapters(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer)
    freeze_for_stage(model, "align")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, image_id, 30, 31, 32]])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.projectors", "model.cross_attention")) for n in changed)
    # at init only the gates get a gradient through the closed tanh gates; that is what opens them
    assert any("gate" in n for n in changed)


def test_a_peft_wrapped_model_is_refused(tiny_parts, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build(tiny_parts, tiny_tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        freeze_for_stage(peft_model, "align")
