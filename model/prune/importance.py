"""Importance scores of heads, KV groups, MLP channels, hidden channels and blocks (each returns the scores and
the metrics worth logging)."""

from __future__ import annotations

import logging

import torch

from .calibration import ActivationStats

logger = logging.getLogger(__name__)


def block_importance(stats: ActivationStats) -> tuple[torch.Tensor, dict]:
    """Depth: 1 - mean cosine between a layer's input and output hidden states (ShortGPT, arXiv:2403.03853; Minitron
    arXiv:2407.14679 §2.1). A layer that barely changes the residual stream scores near 0 and is dropped first."""
    scores = 1.0 - stats.block_cosine / stats.tokens
    metrics = {
        "depth_importance_min": float(scores.min()),
        "depth_importance_max": float(scores.max()),
        "least_important_layer": int(scores.argmin()),
    }
    return scores, metrics


def mlp_channel_importance(stats: ActivationStats) -> tuple[torch.Tensor, dict]:
    """Width: mean |activation| of each MLP intermediate channel (the input of down_proj), per layer (Minitron)."""
    scores = stats.mlp_abs / stats.tokens
    return scores, {"mlp_importance_mean": float(scores.mean()), "mlp_dead_channels": int((scores == 0).sum())}


def head_importance(stats: ActivationStats) -> tuple[torch.Tensor, dict]:
    """Width: mean L2 norm of each attention head's output before o_proj, per layer (Minitron)."""
    scores = stats.head_norm / stats.tokens
    return scores, {"head_importance_mean": float(scores.mean()), "silent_heads": int((scores == 0).sum())}


def kv_group_importance(head_scores: torch.Tensor, num_key_value_heads: int) -> tuple[torch.Tensor, dict]:
    """A KV group's importance: the sum of its query heads' (query head h reads KV head h // heads_per_group)."""
    scores = head_scores.unflatten(-1, (num_key_value_heads, -1)).sum(-1)
    return scores, {"kv_group_importance_mean": float(scores.mean())}


def hidden_channel_importance(stats: ActivationStats) -> tuple[torch.Tensor, dict]:
    """Width: mean |RMSNorm output| of each hidden channel, summed over the decoder's norms (Minitron)."""
    scores = stats.hidden_abs / stats.tokens
    return scores, {"hidden_importance_mean": float(scores.mean())}


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (ties keep the earlier index)."""
    return torch.argsort(scores, descending=True, stable=True)[:keep].sort().values
