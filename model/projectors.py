"""Projectors: map one vision tower's patch features to the LLM's hidden width, picked by name from `PROJECTORS`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear, LLaVA-1.5's projector (arXiv:2310.03744)."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block (self-attention + GELU MLP) over the patch tokens, with torch's SDPA."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.norm_2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size), nn.GELU(), nn.Linear(mlp_ratio * hidden_size, hidden_size)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = self.qkv(self.norm_1(hidden_states)).view(batch, length, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value)
        hidden_states = hidden_states + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return hidden_states + self.mlp(self.norm_2(hidden_states))


class AttentionProjector(nn.Module):
    """Self-attention blocks at the vision width, then a linear map to the LLM width.

    Llama 3 adds self-attention layers on top of its image encoder before the adapter (arXiv:2407.21783, §7.2).
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, depth: int, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(SelfAttentionBlock(vision_hidden_size, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(vision_hidden_size)
        self.proj = nn.Linear(vision_hidden_size, text_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            features = block(features)
        return self.proj(self.norm(features))


def build_mlp_projector(vision_config, text_config, depth: int = 2) -> MLPProjector:
    """Build a LLaVA-1.5 MLP projector.

    Args:
        vision_config: the tower's config (`hidden_size`).
        text_config: the LLM's config (`hidden_size`).
        depth: unused (the MLP has a fixed depth); accepted so every builder has one signature.

    Returns:
        An `MLPProjector` mapping `[..., vision_hidden]` to `[..., text_hidden]`.
    """
    return MLPProjector(vision_config.hidden_size, text_config.hidden_size)


def build_attention_projector(vision_config, text_config, depth: int = 2) -> AttentionProjector:
    """Build an attention projector: `depth` self-attention blocks at the vision width, then a linear map.

    Args:
        vision_config: the tower's config (`hidden_size`, `num_attention_heads`).
        text_config: the LLM's config (`hidden_size`).
        depth: number of self-attention blocks.

    Returns:
        An `AttentionProjector` mapping `[batch, tokens, vision_hidden]` to `[batch, tokens, text_hidden]`.
    """
    return AttentionProjector(
        vision_config.hidden_size, text_config.hidden_size, depth, getattr(vision_config, "num_attention_heads", 1)
    )


def pool_patch_grid(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool `[N, g*g, D]` patch tokens to `[N, (g/factor)**2, D]` over the 2D grid."""
    if factor == 1:
        return features
    num_images, num_patches, width = features.shape
    grid = int(round(num_patches**0.5))
    grid_features = features.transpose(1, 2).reshape(num_images, width, grid, grid)
    return F.avg_pool2d(grid_features, factor).flatten(2).transpose(1, 2)


class VisionProjectors(nn.Module):
    """One projector per vision tower (children "0", "1", ... as in an `nn.ModuleList`), callable as one module.

    Not an `nn.ModuleList`: PEFT refuses those in `modules_to_save`, and `modules_to_save=["projectors"]` is how a
    LoRA recipe trains the projectors in full.
    """

    def __init__(self, projectors: Iterable[nn.Module]):
        super().__init__()
        for index, projector in enumerate(projectors):
            self.add_module(str(index), projector)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, features: list[torch.Tensor], pool: int = 1) -> torch.Tensor:
        """Pool and project each tower's `[N, T_k, D_k]` features; returns `[N, sum_k T_k / pool**2, text_hidden]`."""
        tokens = []
        for projector, tower_features in zip(self, features):
            pooled = pool_patch_grid(tower_features, pool)
            tokens.append(projector(pooled.to(next(projector.parameters()).dtype)))
        return torch.cat(tokens, dim=1)


PROJECTORS = {
    "mlp": build_mlp_projector,
    "attention": build_attention_projector,
}


def build_projector(name: str, vision_config, text_config, depth: int = 2) -> nn.Module:
    """Build the projector registered under `name` for one vision tower.

    Args:
        name: a key of `PROJECTORS`.
        vision_config: the tower's config.
        text_config: the LLM's config.
        depth: blocks of the attention projector.

    Returns:
        The projector module.
    """
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; supported: {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_config, text_config, depth=depth)
