import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import model  # noqa: F401  (registers the VLM with the Auto classes)
from model import unpack_pixel_values
from model.build import build_vlm
from model.chat_template import detect_chat_style
from model.processing_vlm import VLMProcessor
from tests.conftest import CORPUS, save_tiny_llama, save_tiny_siglip
from tests.model.llm_styles import bare_llm_tokenizer

ROOT = Path(__file__).resolve().parents[2]
IMAGES = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (20, 50), (0, 0, 255))]


def _batch(processor):
    return processor(
        images=[[IMAGES[0]], [IMAGES[1]]], text=["<image>How many circles?", "<image>no"], padding=True, return_tensors="pt"
    )


def test_build_reuses_the_pretrained_parts(tiny_parts, tiny_tokenizer):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    assert isinstance(processor, VLMProcessor)
    assert vlm.config.fusion == processor.fusion == "prepend"
    assert vlm.config.num_image_tokens == processor.num_image_tokens == 16  # (32 / 8) ** 2 SigLIP patches
    assert vlm.config.image_token_id == processor.image_token_id == tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert len(processor.tokenizer) == len(tiny_tokenizer)  # nothing added to a tokenizer that has <image>

    weights = vlm.state_dict()
    llama = LlamaForCausalLM.from_pretrained(tiny_parts["llama"]).state_dict()
    for key, value in llama.items():
        target = key if key == "lm_head.weight" else key.replace("model.", "model.language_model.", 1)
        torch.testing.assert_close(weights[target], value, rtol=0, atol=0)
    tower = SiglipVisionModel.from_pretrained(tiny_parts["siglip"]).state_dict()
    for key, value in tower.items():
        if not key.startswith("head."):  # SigLIP's pooling head is not used by a VLM
            torch.testing.assert_close(weights[f"model.vision_towers.0.{key}"], value, rtol=0, atol=0)


def test_saved_vlm_loads_with_the_auto_classes(tiny_parts, tmp_path):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], projector="attention", pool=2)
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "processor_config.json").read_text())
    assert (stored["num_image_tokens"], stored["fusion"], stored["image_token"]) == (4, "prepend", "<image>")

    reloaded, reloaded_processor = AutoModelForImageTextToText.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(vlm) and type(reloaded_processor) is VLMProcessor
    batch = _batch(reloaded_processor)
    for key, value in _batch(processor).items():
        torch.testing.assert_close(batch[key], value)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, vlm(**batch).logits)


def test_resampler_build_gives_the_processor_its_query_count(tiny_parts):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], projector="resampler", projector_queries=5)
    assert processor.num_image_tokens == vlm.config.num_image_tokens == 5
    batch = _batch(processor)
    assert (batch["input_ids"] == vlm.config.image_token_id).sum(1).tolist() == [5, 5]
    with torch.no_grad():
        assert vlm(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_several_encoders_round_trip(tiny_parts, tmp_path):
    vlm, processor = build_vlm([tiny_parts["siglip"], tiny_parts["clip"]], tiny_parts["llama"])
    assert processor.num_image_tokens == 16 + 9  # SigLIP 4x4 patches + CLIP 3x3 patches (CLS dropped)
    batch = _batch(processor)
    assert batch["pixel_values"].shape == (2, 3 * 32 * 32 + 3 * 48 * 48)
    # Each tower gets the images preprocessed by its own image processor (its resolution and normalisation).
    for packed, image_processor in zip(unpack_pixel_values(vlm.config, batch["pixel_values"]), processor.image_processors):
        torch.testing.assert_close(packed, image_processor(IMAGES, return_tensors="pt")["pixel_values"])
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert [type(p).__name__ for p in reloaded.image_processors] == [type(p).__name__ for p in processor.image_processors]
    torch.testing.assert_close(_batch(reloaded)["pixel_values"], batch["pixel_values"])
    with torch.no_grad():
        assert vlm(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_llm_without_image_token_gets_it_resized_and_templated(tmp_path):
    tokenizer = bare_llm_tokenizer(CORPUS, "llama3")
    llm_path = save_tiny_llama(tmp_path / "llama3", tokenizer, num_layers=2)
    siglip_path = save_tiny_siglip(tmp_path / "siglip")
    vocab = len(tokenizer)
    original = LlamaForCausalLM.from_pretrained(llm_path).get_input_embeddings().weight

    vlm, processor = build_vlm(siglip_path, llm_path)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == vocab + 1
    assert vlm.get_input_embeddings().weight.shape[0] == vocab + 1 == vlm.config.text_config.vocab_size
    assert vlm.get_output_embeddings().weight.shape[0] == vocab + 1
    torch.testing.assert_close(vlm.get_input_embeddings().weight[:vocab], original)
    assert vlm.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == vocab
    assert tokenizer.pad_token == tokenizer.eos_token
    assert detect_chat_style(tokenizer) == "llama3"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>Hi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in vlm.generation_config.eos_token_id
    batch = processor(images=[IMAGES[0]], text=[prompt], return_tensors="pt", add_special_tokens=False)
    assert (batch["input_ids"] == vocab).sum() == 16
    with torch.no_grad():
        assert vlm(**batch).logits.shape[-1] == vocab + 1


def test_dual_encoder_checkpoint_is_reduced_to_its_vision_tower(tiny_parts, tmp_path):
    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    text = SiglipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    dual = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    dual.save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    vlm, _ = build_vlm(str(tmp_path), tiny_parts["llama"])
    tower = vlm.model.vision_towers[0]
    assert isinstance(tower, SiglipVisionModel)
    dual_weights = dual.state_dict()
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(value, dual_weights[f"vision_model.{key}"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fusion": "late"}, r"unknown fusion 'late'; supported: \['cross_attention', 'prepend'\]"),
        ({"projector": "qformer"}, r"unknown projector 'qformer'; supported: \['attention', 'mlp', 'resampler'\]"),
        ({"fusion": "cross_attention", "cross_attention_every": 8}, "needs at least that many decoder layers.*has 4"),
    ],
)
def test_unsupported_choices_are_refused(tiny_parts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_vlm(tiny_parts["siglip"], tiny_parts["llama"], **kwargs)


def test_wrong_or_missing_parts_are_refused(tiny_parts, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"vision path '{missing}' does not exist"):
        build_vlm(missing, tiny_parts["llama"])
    with pytest.raises(ValueError, match=f"text path '{missing}' does not exist"):
        build_vlm(tiny_parts["siglip"], missing)
    with pytest.raises(ValueError, match="holds a 'llama' model, not a vision tower"):
        build_vlm(tiny_parts["llama"], tiny_parts["llama"])
    with pytest.raises(ValueError, match="holds a 'siglip_vision_model' model, not a causal LM"):
        build_vlm(tiny_parts["siglip"], tiny_parts["siglip"])
    mismatched = shutil.copytree(tiny_parts["siglip"], tmp_path / "siglip48")
    SiglipImageProcessor(size={"height": 48, "width": 48}).save_pretrained(mismatched)
    with pytest.raises(ValueError, match="produces 48x48 images but its tower expects 32x32"):
        build_vlm(str(mismatched), tiny_parts["llama"])


def test_cli_writes_a_loadable_vlm(tiny_parts, tmp_path):
    output = tmp_path / "vlm"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "model.build", "--vision", tiny_parts["siglip"], tiny_parts["clip"], "--text",
         tiny_parts["qwen2"], "--fusion", "cross_attention", "--cross_attention_every", "2", "--output", str(output)],
        check=True, cwd=ROOT, env=env, capture_output=True, text=True,
    )
    vlm = AutoModelForImageTextToText.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    assert vlm.config.fusion == processor.fusion == "cross_attention"
    assert processor.num_image_tokens == 1 and len(processor.image_processors) == 2
    assert vlm.config.text_config.model_type == "qwen2"
    batch = _batch(processor)
    with torch.no_grad():
        assert vlm(**batch).logits.shape[:2] == batch["input_ids"].shape
