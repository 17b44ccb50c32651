"""The VLM with the field's tools, unpatched: TRL's SFT and DPO trainers with PEFT LoRA, bitsandbytes 4-bit loading,
gradient checkpointing and batched generation, for both fusions."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from model.build import build_vlm
from tests.conftest import save_tiny_llama

FUSIONS = ["prepend", "cross_attention"]
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
IMAGES = [Image.new("RGB", (16, 16), rgb) for rgb in COLORS.values()]
# The LLM's attention projections only: the SigLIP tower and the cross-attention adapters have q_proj/v_proj too.
LLM_LORA = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")


def _sft_dataset():
    return Dataset.from_dict({
        "images": [[image] for image in IMAGES],
        "messages": [
            [{"role": "user", "content": "What color is the square?"}, {"role": "assistant", "content": color}]
            for color in COLORS
        ],
    })


def _dpo_dataset():
    return Dataset.from_dict({
        "images": [[image] for image in IMAGES],
        "prompt": [[{"role": "user", "content": "What color is the square?"}]] * len(IMAGES),
        "chosen": [[{"role": "assistant", "content": color}] for color in COLORS],
        "rejected": [[{"role": "assistant", "content": "The image does not show that."}]] * len(IMAGES),
    })


def _common_args(tmp_path):
    return dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, dataloader_num_workers=0,
    )


def _train_and_check_lora(trainer):
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [name for name in before if "lora_" in name]
    assert lora and all("language_model" in name for name in lora)
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed == set(lora), f"changed: {sorted(changed - set(lora))[:5]}, unchanged LoRA: {sorted(set(lora) - changed)[:5]}"
    return trainer.state.log_history


@pytest.mark.parametrize("fusion", FUSIONS)
def test_sft_trainer_with_lora(tiny_parts, tmp_path, fusion):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion=fusion)
    # max_length=None: the collator would otherwise truncate at 1024 tokens (our processor refuses to cut image
    # tokens, but there is no reason to truncate vision samples at all). TRL keeps the "images"/"messages" columns of a
    # vision dataset itself (it skips dataset preparation and sets the signature columns), and turns gradient
    # checkpointing (transformers: activation checkpointing) on by default.
    args = SFTConfig(**_common_args(tmp_path), max_length=None, assistant_only_loss=True)
    trainer = SFTTrainer(model=vlm, args=args, train_dataset=_sft_dataset(), processing_class=processor, peft_config=LLM_LORA)
    assert args.activation_checkpointing
    history = _train_and_check_lora(trainer)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in history if "loss" in log)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dpo_trainer_with_lora(tiny_parts, tmp_path, fusion):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion=fusion)
    args = DPOConfig(**_common_args(tmp_path), max_length=None)
    trainer = DPOTrainer(model=vlm, args=args, train_dataset=_dpo_dataset(), processing_class=processor, peft_config=LLM_LORA)
    history = _train_and_check_lora(trainer)
    # The reference is the adapter-free model: at the first step policy == reference, so the rewards are 0.
    assert history[0]["rewards/chosen"] == 0 and history[0]["loss"] == pytest.approx(0.6931, abs=1e-4)


def test_sft_with_other_architectures(tiny_parts, tmp_path):
    """Qwen2 (tied embeddings) + CLIP (CLS token), and SigLIP + CLIP towers together."""
    for vision, fusion in ((tiny_parts["clip"], "prepend"), ([tiny_parts["siglip"], tiny_parts["clip"]], "cross_attention")):
        vlm, processor = build_vlm(vision, tiny_parts["qwen2"], fusion=fusion, projector="attention")
        assert vlm.config.text_config.model_type == "qwen2"
        args = SFTConfig(**_common_args(tmp_path), max_length=None)
        trainer = SFTTrainer(
            model=vlm, args=args, train_dataset=_sft_dataset(), processing_class=processor, peft_config=LLM_LORA
        )
        _train_and_check_lora(trainer)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_4bit_loading_quantizes_only_the_llm(tiny_parts, tiny_tokenizer, tmp_path, fusion):
    # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 input features, so this LLM is 64 wide.
    llm = save_tiny_llama(tmp_path / "llama64", tiny_tokenizer, hidden_size=64, num_layers=4)
    vlm, processor = build_vlm(tiny_parts["siglip"], llm, fusion=fusion)
    vlm.save_pretrained(tmp_path / "vlm")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm", quantization_config=quantization)

    import bitsandbytes as bnb

    linears = {name: module for name, module in quantized.named_modules() if isinstance(module, nn.Linear)}
    llm_linears = {name for name in linears if ".language_model." in name}
    assert llm_linears and all(isinstance(linears[name], bnb.nn.Linear4bit) for name in llm_linears)
    for name in set(linears) - llm_linears:  # towers, projectors, cross-attention adapters, LM head
        assert not isinstance(linears[name], bnb.nn.Linear4bit), name
        assert linears[name].weight.dtype == torch.float32, name
    if fusion == "cross_attention":
        assert any(".cross_attention." in name for name in set(linears) - llm_linears)

    batch = processor(images=[[IMAGES[0]], [IMAGES[1]]], text=["<image>What color?", "<image>no"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = quantized(**batch).logits
        reference = vlm(**batch).logits
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    # 4-bit weights perturb the logits but keep them close to the full-precision model's.
    assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.9


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_parts, fusion):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion=fusion)
    if fusion == "cross_attention":  # open the zero-initialised gates so the towers get gradients too
        for block in vlm.model.cross_attention.values():
            nn.init.constant_(block.attn_gate, 0.5)
            nn.init.constant_(block.mlp_gate, 0.5)
    vlm.train()
    batch = processor(images=[[IMAGES[0]], [IMAGES[1]]], text=["<image>What color?", "<image>no"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def gradients():
        vlm.zero_grad()
        vlm(**batch, labels=labels, use_cache=False).loss.backward()
        return {name: param.grad.clone() for name, param in vlm.named_parameters() if param.grad is not None}

    plain = gradients()
    vlm.activation_checkpointing_enable()
    assert vlm.model.language_model.is_activation_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("model.vision_towers.0.") for name in plain)
    assert any(name.startswith("model.projectors.0.") for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_batched_generation_matches_unbatched(tiny_parts, fusion):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion=fusion)
    if fusion == "cross_attention":  # make the images matter to the output
        for block in vlm.model.cross_attention.values():
            nn.init.constant_(block.attn_gate, 1.0)
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
    ]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    options = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    batch = processor(images=[[IMAGES[0]], [IMAGES[2]]], text=prompts, padding=True, padding_side="left", return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any()  # the shorter prompt really is left-padded
    batched = vlm.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    for row, (image, prompt) in enumerate(zip([IMAGES[0], IMAGES[2]], prompts)):
        single = processor(images=[[image]], text=[prompt], return_tensors="pt")
        cached = vlm.generate(**single, **options)[:, single["input_ids"].shape[1] :]
        uncached = vlm.generate(**single, **options, use_cache=False)[:, single["input_ids"].shape[1] :]
        assert batched[row].tolist() == cached[0].tolist() == uncached[0].tolist()
    if fusion == "cross_attention":
        other = processor(images=[[IMAGES[1]]], text=[prompts[0]], return_tensors="pt")
        with torch.no_grad():
            assert not torch.allclose(vlm(**other).logits, vlm(**processor(images=[[IMAGES[0]]], text=[prompts[0]], return_tensors="pt")).logits)
