"""Cross-attention fusion: gated cross-attention adapters in front of some decoder layers of any LLM.

Flamingo's gated xattn-dense blocks (arXiv:2204.14198), as Llama 3.2 Vision uses them: the text hidden states attend to
the projected visual tokens of their own sample's images, and tanh gates initialised at zero make the model equal to
the base LLM at init. The LLM itself is not modified: each adapter runs from a forward pre-hook on its decoder layer,
so the LLM's state-dict keys (and PEFT targets, ternarisation, 4-bit conversion) are exactly those of the plain LLM,
and the adapters are saved under `model.cross_attention.<decoder layer index>`.

The visual states reach the hooks as one keyword argument of the LLM's forward (`CROSS_ATTENTION_KWARG`), which
transformers decoders (Llama, Qwen2, ...) pass through to every decoder layer; the hooks take it out again before the
layer runs. It also carries the adapters to call, so the hooks hold no module: a deep copy (TRL's reference model)
or PEFT's `modules_to_save` copy of the adapters is what runs. Passing it as an argument rather than setting it on
the modules keeps it correct under gradient checkpointing, which replays layers after the forward has returned:
transformers checkpoints a layer's `forward`, so the adapter (run by the hook, before it) keeps its activations;
wrappers that checkpoint the whole `__call__` replay the hook with the same argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

CROSS_ATTENTION_KWARG = "vlm_cross_attention"


@dataclass
class CrossAttentionInputs:
    """What the adapters need for one forward.

    Attributes:
        states: `[batch, num_images * tokens_per_image, hidden]` projected visual tokens, zero-padded per sample.
        bias: `[batch, 1, text_len, num_images * tokens_per_image]` additive attention mask (0 or dtype min).
        row_mask: `[batch, text_len, 1]` 1 for text tokens that may attend to at least one image, else 0.
        adapters: the `CrossAttentionAdapters` to call (or PEFT's wrapper of them).
        layers: keys (decoder layer indices as strings) of the layers with an adapter in front.
        applied: adapters that ran (checked by the model: a decoder that drops kwargs would skip them silently).
    """

    states: torch.Tensor
    bias: torch.Tensor
    row_mask: torch.Tensor
    adapters: nn.Module
    layers: frozenset[str]
    applied: int = 0


def derive_cross_attention_mask(image_token_mask: torch.Tensor, num_images: int | None = None) -> torch.Tensor:
    """Which images each text token may see: image i iff its placeholder position <= the token's position.

    Args:
        image_token_mask: `[batch, text_len]` bool, True at the image placeholders (one per image).
        num_images: number of image slots (the most images of any sample if omitted).

    Returns:
        `[batch, text_len, num_images]` long mask, 1 where text token t may attend to image i of its sample.
    """
    seen = image_token_mask.long().cumsum(dim=-1)
    if num_images is None:
        num_images = int(seen[:, -1].max()) if seen.numel() else 0
    slots = torch.arange(num_images, device=seen.device)
    return (slots[None, None, :] < seen[..., None]).long()


def prepare_cross_attention_inputs(
    states: torch.Tensor,
    cross_attention_mask: torch.Tensor,
    tokens_per_image: int,
    dtype: torch.dtype,
    adapters: nn.Module,
    layers: frozenset[str],
) -> CrossAttentionInputs:
    """Expand a per-image mask to per-token attention bias, mllama-style, plus the rows that see no image.

    Args:
        states: `[batch, num_images * tokens_per_image, hidden]` visual tokens.
        cross_attention_mask: `[batch, text_len, num_images]`, 1 where token t may attend to image i.
        tokens_per_image: visual tokens per image.
        dtype: dtype of the additive bias (the adapters' dtype).
        adapters: the adapters the hooks call.
        layers: keys of the decoder layers that have an adapter.

    Returns:
        The `CrossAttentionInputs` for the adapters.
    """
    allowed = cross_attention_mask.bool()
    # mllama's full_text_row_masked_out_mask: a row with no visible image gets a uniform softmax over the masked
    # keys (finite bias, never NaN), and its adapter output is then zeroed through this mask.
    row_mask = allowed.any(dim=-1, keepdim=True).to(dtype)
    allowed = allowed.repeat_interleave(tokens_per_image, dim=-1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=states.device).masked_fill(
        ~allowed.to(states.device), torch.finfo(dtype).min
    )
    return CrossAttentionInputs(
        states=states, bias=bias[:, None], row_mask=row_mask.to(states.device), adapters=adapters, layers=layers
    )


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention then a SwiGLU MLP, each added through a zero-initialised tanh gate (Flamingo, mllama)."""

    def __init__(self, text_config):
        super().__init__()
        hidden = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        eps = getattr(text_config, "rms_norm_eps", 1e-6)
        intermediate = getattr(text_config, "intermediate_size", 4 * hidden)

        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        # q/k norms as in mllama's cross-attention: the visual tokens come from a fresh projector
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.attn_gate = nn.Parameter(torch.zeros(1))

        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def attend(self, hidden_states: torch.Tensor, inputs: CrossAttentionInputs) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        query = self.q_norm(self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim))
        states = inputs.states.to(hidden_states.dtype)
        key = self.k_norm(self.k_proj(states).view(batch, -1, self.num_heads, self.head_dim))
        value = self.v_proj(states).view(batch, -1, self.num_heads, self.head_dim)
        attended = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=inputs.bias.to(query.dtype)
        )
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, hidden_states: torch.Tensor, inputs: CrossAttentionInputs) -> torch.Tensor:
        # Computed in the adapter's dtype: a 4-bit or fp16 LLM keeps its adapters in full precision.
        dtype = self.q_proj.weight.dtype
        hidden = hidden_states.to(dtype)
        row_mask = inputs.row_mask.to(dtype)
        hidden = hidden + self.attn_gate.tanh() * row_mask * self.attend(self.input_layernorm(hidden), inputs)
        normed = self.post_attention_layernorm(hidden)
        mlp = self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))
        hidden = hidden + self.mlp_gate.tanh() * row_mask * mlp
        return hidden.to(hidden_states.dtype)


def cross_attention_layer_indices(num_layers: int, every: int) -> list[int]:
    """Decoder layers that get an adapter in front: every-1, 2*every-1, ..., or the last layer if every > depth."""
    return list(range(every - 1, num_layers, every)) or [num_layers - 1]


class CrossAttentionAdapters(nn.Module):
    """The adapters, children keyed by the index of the decoder layer they run in front of (as an `nn.ModuleDict`).

    Not an `nn.ModuleDict` but one module with a forward: PEFT refuses ModuleDicts in `modules_to_save`, and
    `modules_to_save=["cross_attention"]` is how a LoRA recipe trains the adapters in full.
    """

    def __init__(self, text_config, layer_indices: list[int]):
        super().__init__()
        for index in layer_indices:
            self.add_module(str(index), GatedCrossAttentionBlock(text_config))

    def __getitem__(self, key: str) -> GatedCrossAttentionBlock:
        return self._modules[key]

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

    def forward(self, key: str, hidden_states: torch.Tensor, inputs: CrossAttentionInputs) -> torch.Tensor:
        return self[key](hidden_states, inputs)


def attach_cross_attention(decoder_layers: nn.ModuleList) -> None:
    """Hook every decoder layer: take the visual-state kwarg out, and run the layer's adapter first if it has one."""
    for index, layer in enumerate(decoder_layers):
        layer.register_forward_pre_hook(partial(_run_adapter, str(index)), with_kwargs=True)


def _run_adapter(key: str, layer: nn.Module, args: tuple, kwargs: dict):
    inputs = kwargs.pop(CROSS_ATTENTION_KWARG, None)
    if inputs is None or key not in inputs.layers:
        return args, kwargs
    if args:
        args = (inputs.adapters(key, args[0], inputs), *args[1:])
    else:
        kwargs["hidden_states"] = inputs.adapters(key, kwargs["hidden_states"], inputs)
    inputs.applied += 1
    return args, kwargs


__all__ = [
    "CROSS_ATTENTION_KWARG",
    "CrossAttentionAdapters",
    "CrossAttentionInputs",
    "GatedCrossAttentionBlock",
    "attach_cross_attention",
    "cross_attention_layer_indices",
    "derive_cross_attention_mask",
    "prepare_cross_attention_inputs",
]
