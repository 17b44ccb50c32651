import torch
from PIL import Image
from transformers import LlamaForCausalLM

from model.parts import (
    LlamaPartConfig,
    SiglipPartConfig,
    llama_config,
    pack_documents,
    perplexity,
    pretrain_llama,
    pretrain_siglip,
    retrieval_accuracy,
)
from model.tokenizer import train_tokenizer


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
