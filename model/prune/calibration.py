"""Calibration: the teacher's activation statistics over the calibration documents, in one pass."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import DecoderLayout
from .sizes import head_dim_of

logger = logging.getLogger(__name__)


def read_calibration_texts(path: str, option: str = "calibration_file") -> list[str]:
    """Documents of a text file: JSONL (`{"text": ...}` or a JSON string per line) or one per text line; errors name
    the file by `option` (also read for pretraining's text rows, `text_dataset_path`)."""
    if not os.path.isfile(path):
        raise ValueError(f"{option} {path!r} does not exist")
    texts = []
    with open(path, encoding="utf-8") as handle:
        jsonl = path.endswith((".jsonl", ".json"))
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if not jsonl:
                texts.append(line.rstrip("\n"))
                continue
            row = json.loads(line)
            text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{option} {path!r} line {number}: expected {{\"text\": ...}} or a string")
            texts.append(text)
    if not texts:
        raise ValueError(f"{option} {path!r} holds no documents")
    return texts


def calibration_blocks(texts: list[str], tokenizer, block_size: int = 128, max_blocks: int = 64) -> torch.Tensor:
    """Pack `<bos> text <eos>` documents into at most `max_blocks` blocks of `block_size` tokens.

    Documents are read in a fixed pseudo-random order (seed 0) and only until the blocks are full, so a large file is
    sampled across its whole length (a file listing one kind of document after another contributes every kind)
    without tokenizing all of it. A corpus shorter than one block gives one shorter block, so a few inline texts
    calibrate too.
    """
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    order = list(texts)
    random.Random(0).shuffle(order)
    flat, needed = [], block_size * max_blocks
    for start in range(0, len(order), 256):
        for ids in tokenizer(order[start : start + 256], add_special_tokens=False)["input_ids"]:
            flat.extend((*prefix, *ids, *suffix))
        if len(flat) >= needed:
            break
    if len(flat) < 2:
        raise ValueError("the calibration texts hold fewer than 2 tokens")
    block_size = min(block_size, len(flat))
    count = min(len(flat) // block_size, max_blocks)
    return torch.tensor(flat[: count * block_size]).view(count, block_size)


@dataclass
class ActivationStats:
    """Sums over the calibration tokens of what the importance scores average."""

    tokens: int
    block_cosine: torch.Tensor  # [layers] cos(layer input, layer output)
    head_norm: torch.Tensor  # [layers, heads] L2 norm of each head's output before o_proj
    mlp_abs: torch.Tensor  # [layers, intermediate] |input of down_proj|
    hidden_abs: torch.Tensor  # [hidden] |RMSNorm outputs|, summed over the norms


def _first(value):
    return value[0] if isinstance(value, tuple) else value


@torch.inference_mode()
def collect_activation_stats(
    decoder: nn.Module, layout: DecoderLayout, blocks: torch.Tensor, batch_size: int = 8
) -> ActivationStats:
    """Run the calibration blocks through the decoder (the LLM's base model) once, with hooks summing the statistics.

    Args:
        decoder: e.g. `LlamaModel` (a causal LM's base model or a VLM's `language_model`).
        layout: the decoder's `DecoderLayout`.
        blocks: `[n, length]` token ids (`calibration_blocks`); every token counts (no padding).
        batch_size: blocks per forward.
    """
    config = decoder.config
    layers = decoder.layers
    head_dim = head_dim_of(config)
    n_layers, n_heads = len(layers), config.num_attention_heads
    stats = ActivationStats(
        tokens=0,
        block_cosine=torch.zeros(n_layers, dtype=torch.float64),
        head_norm=torch.zeros(n_layers, n_heads, dtype=torch.float64),
        mlp_abs=torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64),
        hidden_abs=torch.zeros(config.hidden_size, dtype=torch.float64),
    )

    def token_sum(values: torch.Tensor) -> torch.Tensor:
        return values.double().reshape(-1, *values.shape[2:]).sum(0).cpu()

    def on_layer(index):
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            cosine = F.cosine_similarity(inputs.float(), _first(output).float(), dim=-1)
            stats.block_cosine[index] += cosine.double().sum().cpu()

        return hook

    def on_attention_output(index):
        def hook(module, args):
            heads = args[0].float().unflatten(-1, (n_heads, head_dim))
            stats.head_norm[index] += token_sum(heads.norm(dim=-1))

        return hook

    def on_mlp_output(index):
        def hook(module, args):
            stats.mlp_abs[index] += token_sum(args[0].abs())

        return hook

    def on_norm(module, args, output):
        stats.hidden_abs.add_(token_sum(_first(output).abs()))

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(index), with_kwargs=True))
        attention_output = layer.get_submodule(layout.attention_output)
        mlp_output = layer.get_submodule(layout.mlp_output)
        handles.append(attention_output.register_forward_pre_hook(on_attention_output(index)))
        handles.append(mlp_output.register_forward_pre_hook(on_mlp_output(index)))
        handles.extend(layer.get_submodule(name).register_forward_hook(on_norm) for name in layout.norms)
    handles.append(decoder.get_submodule(layout.final_norm).register_forward_hook(on_norm))
    was_training = decoder.training
    decoder.eval()
    try:
        device = decoder.get_input_embeddings().weight.device
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size].to(device)
            decoder(input_ids=batch, use_cache=False)
            stats.tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        decoder.train(was_training)
    return stats
