"""Ternary linear layers: BitNet b1.58 (arXiv:2402.17764), trained with a straight-through estimator.

`BitLinear` keeps full-precision latent weights (so optimisers, PEFT LoRA targeting and state-dict keys work as for
`nn.Linear`) and quantises on the fly: weights to {-1, 0, 1} times one absmean scale per tensor, activations to 8 bits
with one absmax scale per token. The layer norm that BitNet puts inside BitLinear is left out: the layers replace the
linears of a pretrained LLM in place, whose own norms already precede them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

EPS = 1e-5


def ternary_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation (BitNet b1.58, eq. 1-3).

    Args:
        weight: the latent full-precision weight.

    Returns:
        `(ternary, scale)`: `ternary` holds only -1, 0 and 1; `ternary * scale` is the effective weight.
    """
    scale = weight.abs().mean().clamp(min=EPS)
    return (weight / scale).round().clamp(-1, 1), scale


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax quantisation to 8 bits, returned dequantised (fake quantisation)."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127) / scale


class BitLinear(nn.Linear):
    """An `nn.Linear` whose forward uses ternary weights and 8-bit activations, with straight-through gradients."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        """Wrap an existing linear, sharing its parameters (no copy, same state-dict keys)."""
        with torch.device("meta"):  # nothing allocated: the parameters are taken over below
            bit = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        bit.weight = linear.weight
        bit.bias = linear.bias
        # Keep transformers' "already initialised" flag, so post_init does not re-draw pretrained weights.
        if getattr(linear, "_is_hf_initialized", False):
            bit._is_hf_initialized = True
        return bit

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: ternary * scale in value, identity in gradient (STE)."""
        ternary, scale = ternary_weight(self.weight)
        return self.weight + (ternary * scale - self.weight).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (int8_activations(x) - x).detach()
        return F.linear(x, self.effective_weight(), self.bias)


def ternarize_(module: nn.Module, exclude: Iterable[str] = ("lm_head", "embed_tokens")) -> list[str]:
    """Replace, in place, every plain `nn.Linear` under `module` by a `BitLinear` sharing its parameters.

    Args:
        module: usually the LLM's decoder layers (`language_model.layers`), so embeddings and the LM head stay.
        exclude: names (or name fragments) of submodules to leave full precision.

    Returns:
        The qualified names of the replaced layers.
    """
    exclude = tuple(exclude)
    replaced = []
    for name, child in list(module.named_modules()):
        for child_name, grandchild in list(child.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if type(grandchild) is nn.Linear and not any(fragment in qualified for fragment in exclude):
                setattr(child, child_name, BitLinear.from_linear(grandchild))
                replaced.append(qualified)
    logger.debug("ternarized %d linear layers", len(replaced))
    return replaced


__all__ = ["BitLinear", "int8_activations", "ternarize_", "ternary_weight"]
