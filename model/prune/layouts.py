"""Architectures: which dimension of each weight belongs to which pruning axis, per LLM layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


PLAN_FILE = "prune_plan.json"


# Axes: "q" query-head rows (head_dim per head), "kv" key/value-head rows, "mlp" intermediate channels, "hidden" the
# model width; None leaves a dimension whole.
LLAMA_LAYER_AXES = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "mlp.gate_proj.weight": ("mlp", "hidden"),
    "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "hidden"),
    "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("hidden", "mlp"),
    "mlp.down_proj.bias": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
}
LLAMA_MODEL_AXES = {"embed_tokens.weight": (None, "hidden"), "norm.weight": ("hidden",)}
HEAD_AXES = {"weight": (None, "hidden"), "bias": (None,)}


@dataclass(frozen=True)
class DecoderLayout:
    """Where a decoder keeps what pruning measures and slices (module names relative to a decoder layer)."""

    layer_axes: dict
    model_axes: dict
    embeddings: tuple = ("embed_tokens.weight",)
    attention_output: str = "self_attn.o_proj"
    mlp_output: str = "mlp.down_proj"
    norms: tuple = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "norm"


LLAMA_LAYOUT = DecoderLayout(layer_axes=LLAMA_LAYER_AXES, model_axes=LLAMA_MODEL_AXES)
# Qwen2 is Llama's layout with q/k/v biases (and no o_proj bias), which the Llama rules already cover.
LAYOUTS = {"llama": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT}


def layout_for(text_config) -> DecoderLayout:
    """The `DecoderLayout` of an LLM config, or a ValueError naming the supported architectures."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"unknown architecture {model_type!r} for pruning; supported: {sorted(LAYOUTS)}")
    return LAYOUTS[model_type]
