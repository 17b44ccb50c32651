import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaForCausalLM

from align.probe import fit_probe
from align.zoo.parts import (
    LlamaPartConfig,
    SiglipPartConfig,
    llama_config,
    pack_documents,
    perplexity,
    pretrain_llama,
    pretrain_siglip,
    retrieval_accuracy,
)
from align.zoo.tokenizer import train_tokenizer


def test_trained_parts_beat_random_init(tmp_path):
    """Both objectives are learnable: a few steps on a small corpus beat random init."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    captions = [f"a {c} square" for c in colors] * 4
    rgb = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30),
           "purple": (150, 30, 200), "orange": (250, 140, 0), "white": (255, 255, 255), "black": (0, 0, 0)}
    images = [Image.new("RGB", (16, 16), rgb[c]) for c in colors] * 4
    tokenizer = train_tokenizer(captions * 10, vocab_size=300)
    torch.manual_seed(0)
    cfg = SiglipPartConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, text_hidden_size=32,
                           text_layers=1, text_max_length=8, steps=60, batch_size=8, learning_rate=5e-3)
    dual, processor, _ = pretrain_siglip(images, captions, tokenizer, cfg, str(tmp_path / "siglip"))
    assert retrieval_accuracy(dual, images[:8], captions[:8], tokenizer, processor, 8, candidates=8) > 0.5

    docs = [f"Question: what color is the square? Answer: {c}" for c in colors] * 20
    lm_cfg = LlamaPartConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             block_size=32, steps=40, batch_size=8)
    lm, _ = pretrain_llama(docs, tokenizer, lm_cfg, str(tmp_path / "llama"))
    torch.manual_seed(0)
    random_lm = LlamaForCausalLM(llama_config(lm_cfg, tokenizer))
    assert perplexity(lm, tokenizer, docs[:16], 32) < 0.5 * perplexity(random_lm, tokenizer, docs[:16], 32)


def test_pack_documents_adds_bos_and_eos_once(tiny_tokenizer):
    blocks = pack_documents(["a red circle", "two<|end|>"], tiny_tokenizer, block_size=4)
    flat = blocks.flatten().tolist()
    expected = [tiny_tokenizer.bos_token_id, *tiny_tokenizer("a red circle<|end|>", add_special_tokens=False)["input_ids"],
                tiny_tokenizer.bos_token_id, *tiny_tokenizer("two<|end|>", add_special_tokens=False)["input_ids"]]
    assert flat == expected[: len(flat)] and len(flat) == len(expected) // 4 * 4


def _bar_images(count: int, seed: int = 0):
    """16 px images with one bar in a random 8 px patch: vertical or horizontal (the label), same color, so a
    caption that only says "a bar" cannot tell them apart; the bar's patch is the labelled one."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], torch.full((count, 1, 4), -100, dtype=torch.long)
    for i in range(count):
        patch, vertical = torch.randint(0, 4, (1,), generator=generator).item(), torch.randint(0, 2, (1,), generator=generator).item()
        pixels = np.full((16, 16, 3), 128, dtype=np.uint8)
        y0, x0 = (patch // 2) * 8, (patch % 2) * 8
        if vertical:
            pixels[y0 : y0 + 8, x0 + 3 : x0 + 5] = (230, 30, 30)
        else:
            pixels[y0 + 3 : y0 + 5, x0 : x0 + 8] = (230, 30, 30)
        images.append(Image.fromarray(pixels))
        labels[i, 0, patch] = vertical
    return images, labels


def test_patch_attribute_loss_trains_heads_on_the_labelled_patches_and_drops_them(tmp_path):
    """The patch loss is learned (a bar's direction at its patch, which one caption for all images cannot say),
    the tower's patch features then carry it, and the saved dual encoder is the plain architecture."""
    from transformers import SiglipModel

    images, labels = _bar_images(96)
    captions = ["a bar"] * len(images)
    tokenizer = train_tokenizer(captions * 10, vocab_size=300)
    cfg = SiglipPartConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, text_hidden_size=32,
                           text_layers=1, text_max_length=8, steps=60, batch_size=16, learning_rate=5e-3)
    dual, processor, history = pretrain_siglip(images, captions, tokenizer, cfg, str(tmp_path),
                                               patch_labels=labels, patch_classes=[2])
    assert not hasattr(dual, "patch_heads") and type(dual) is SiglipModel
    patch_losses = [h["patch_loss"] for h in history if "patch_loss" in h]
    assert len(patch_losses) >= 5 and patch_losses[-1] < 0.25 * patch_losses[0]
    test_images, test_labels = _bar_images(64, seed=1)
    pixels = processor(images=images + test_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = dual.vision_model(pixel_values=pixels).last_hidden_state
    all_labels = torch.cat([labels, test_labels])[:, 0]
    features = hidden[torch.arange(len(hidden)), (all_labels != -100).float().argmax(-1)]
    targets = all_labels.max(-1).values
    assert fit_probe(features[:96], targets[:96], features[96:], targets[96:], classes=2) >= 0.95


def test_patch_labels_of_the_wrong_shape_or_range_are_named(tmp_path):
    images, labels = _bar_images(8)
    tokenizer = train_tokenizer(["a bar"] * 10, vocab_size=300)
    cfg = SiglipPartConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, text_hidden_size=32,
                           text_layers=1, text_max_length=8, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="patch_labels must have shape"):
        pretrain_siglip(images, ["a bar"] * 8, tokenizer, cfg, str(tmp_path), patch_labels=labels[:, :, :2], patch_classes=[2])
    with pytest.raises(ValueError, match="outside 0..1"):
        pretrain_siglip(images, ["a bar"] * 8, tokenizer, cfg, str(tmp_path), patch_labels=labels * 3, patch_classes=[2])
