"""Shared fixtures: tiny parts built from config (never downloaded), saved by path like real checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "a red circle and two blue squares.",
    "a large green triangle at the top left, a small yellow circle at the bottom right.",
    "Question: How many circles are there? Answer: two",
    "Question: What color is the square? Answer: blue",
    "Question: Is there a purple triangle? Answer: no",
    "Question: Is the red circle to the left of the blue square? Answer: yes",
    "Question: What is written on the square? Answer: The image does not show that.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of the project's kind (image token, chat template)."""
    from align.zoo.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=320)


def save_tiny_siglip(path, image_size=32, patch_size=8, hidden_size=32):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2,
    )
    SiglipVisionModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def save_tiny_clip(path, image_size=48, patch_size=16, hidden_size=24):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=hidden_size,
    )
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return str(path)


def save_tiny_llama(path, tokenizer, hidden_size=32, num_layers=4, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_qwen2(path, tokenizer, hidden_size=32, num_layers=4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory, tiny_tokenizer):
    """Paths of tiny pretrained-like parts: SigLIP and CLIP vision towers, Llama and Qwen2 LLMs."""
    root = tmp_path_factory.mktemp("parts")
    return {
        "siglip": save_tiny_siglip(root / "siglip"),
        "clip": save_tiny_clip(root / "clip"),
        "llama": save_tiny_llama(root / "llama", tiny_tokenizer),
        "qwen2": save_tiny_qwen2(root / "qwen2", tiny_tokenizer),
    }
