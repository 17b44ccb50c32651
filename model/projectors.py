"""Projectors: map one vision tower's patch features to the LLM's hidden width, picked by name from `PROJECTORS`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

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


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: latents attend to a context (SDPA), then a GELU MLP; both residual."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_latents = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.norm_2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size), nn.GELU(), nn.Linear(mlp_ratio * hidden_size, hidden_size)
        )

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, num_latents, width = latents.shape
        head_dim = width // self.num_heads
        query = self.q(self.norm_latents(latents)).view(batch, num_latents, self.num_heads, head_dim).transpose(1, 2)
        key, value = (
            self.kv(self.norm_context(context)).view(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(query, key, value)
        latents = latents + self.out(attended.transpose(1, 2).reshape(batch, num_latents, width))
        return latents + self.mlp(self.norm_2(latents))


class ResamplerProjector(nn.Module):
    """Learned queries cross-attend to the patch features: `num_queries` visual tokens per image, whatever the grid.

    Qwen-VL's position-aware vision-language adapter (learned queries, positions added to the patches' keys;
    arXiv:2308.12966, section 2.1), with Idefics2's stacked resampler blocks (arXiv:2405.02246). Each query can
    gather the few patches an object covers, instead of the LLM having to find them among all the patch tokens.
    """

    def __init__(
        self, vision_hidden_size: int, text_hidden_size: int, num_patches: int, num_queries: int, depth: int,
        num_heads: int,
    ):
        super().__init__()
        self.context_proj = nn.Linear(vision_hidden_size, text_hidden_size)
        self.position = nn.Parameter(torch.empty(1, num_patches, text_hidden_size))
        self.queries = nn.Parameter(torch.empty(1, num_queries, text_hidden_size))
        self.blocks = nn.ModuleList(CrossAttentionBlock(text_hidden_size, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(text_hidden_size)
        self.proj = nn.Linear(text_hidden_size, text_hidden_size)
        self.reset_embeddings()

    @torch.no_grad()
    def reset_embeddings(self) -> None:
        """Small random queries and positions (the model's `_init_weights` calls this too)."""
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.position.shape[1]:
            raise ValueError(
                f"the resampler was built for {self.position.shape[1]} patches per image, got {features.shape[1]}"
            )
        context = self.context_proj(features) + self.position
        latents = self.queries.expand(features.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, context)
        return self.proj(self.norm(latents))


def build_mlp_projector(vision_config, text_config, depth: int = 2, **_) -> MLPProjector:
    """Build a LLaVA-1.5 MLP projector.

    Args:
        vision_config: the tower's config (`hidden_size`).
        text_config: the LLM's config (`hidden_size`).
        depth: unused (the MLP has a fixed depth); accepted so every builder has one signature, as are the
            resampler's `num_patches` and `num_queries`.

    Returns:
        An `MLPProjector` mapping `[..., vision_hidden]` to `[..., text_hidden]`.
    """
    return MLPProjector(vision_config.hidden_size, text_config.hidden_size)


def build_attention_projector(vision_config, text_config, depth: int = 2, **_) -> AttentionProjector:
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


def build_resampler_projector(
    vision_config, text_config, depth: int = 2, num_patches: int | None = None, num_queries: int = 16
) -> ResamplerProjector:
    """Build a resampler projector: `num_queries` learned queries through `depth` cross-attention blocks.

    Args:
        vision_config: the tower's config (`hidden_size`).
        text_config: the LLM's config (`hidden_size`, `num_attention_heads`).
        depth: cross-attention blocks.
        num_patches: patch features per image after pooling (one learned position each).
        num_queries: visual tokens per image.

    Returns:
        A `ResamplerProjector` mapping `[batch, num_patches, vision_hidden]` to `[batch, num_queries, text_hidden]`.
    """
    if num_patches is None:
        raise ValueError("the resampler projector needs num_patches (patch features per image after pooling)")
    return ResamplerProjector(
        vision_config.hidden_size, text_config.hidden_size, num_patches, num_queries, depth,
        text_config.num_attention_heads,
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

    Each tower's features are standardised per channel before pooling and projection, with the mean and standard
    deviation of that tower's features on the training images (buffers `feature_mean_<k>`, `feature_std_<k>`,
    saved with the model; `feature_count_<k>` is how many patch vectors they were measured on, 0 while unset, when
    the standardisation is the identity). Encoder outputs are far from centred: a SigLIP tower's patch features share
    one large offset vector and their channels' scales differ several-fold, and a projector fed them raw learns to
    separate what differs between images (an object's color) much more slowly. This is input normalisation as
    for pixels (the image processor's mean and std), measured once on the features; `model.pretrain` fits it
    before adapter pretraining (`fit_feature_statistics`).
    """

    def __init__(self, projectors: Iterable[nn.Module], feature_sizes: Sequence[int] = ()):
        super().__init__()
        for index, projector in enumerate(projectors):
            self.add_module(str(index), projector)
        if feature_sizes and len(feature_sizes) != len(self):
            raise ValueError(f"{len(feature_sizes)} feature sizes for {len(self)} projectors")
        for index, size in enumerate(feature_sizes):
            self.register_buffer(f"feature_mean_{index}", torch.zeros(size))
            self.register_buffer(f"feature_std_{index}", torch.ones(size))
            self.register_buffer(f"feature_count_{index}", torch.zeros(()))

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def feature_statistics(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """`(mean, std, count)` of tower `index`'s standardisation, or None where the projectors keep none."""
        if not hasattr(self, f"feature_mean_{index}"):
            return None
        return (
            getattr(self, f"feature_mean_{index}"), getattr(self, f"feature_std_{index}"),
            int(getattr(self, f"feature_count_{index}").item()),
        )

    @property
    def standardized(self) -> bool:
        """Whether every tower's standardisation was fitted (else some are the identity)."""
        stats = [self.feature_statistics(index) for index in range(len(self))]
        return all(s is not None and s[2] > 0 for s in stats)

    @torch.no_grad()
    def set_feature_statistics(self, index: int, mean: torch.Tensor, std: torch.Tensor, count: int) -> None:
        """Standardise tower `index`'s features with `mean` and `std` (`[hidden]`, measured on `count` vectors)."""
        current = self.feature_statistics(index)
        if current is None:
            raise ValueError(f"the projectors keep no feature statistics for tower {index}")
        if mean.shape != current[0].shape or std.shape != current[1].shape:
            raise ValueError(f"tower {index}: statistics of shape {tuple(mean.shape)}, expected {tuple(current[0].shape)}")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"tower {index}: feature statistics must be finite with positive std")
        current[0].copy_(mean)
        current[1].copy_(std)
        getattr(self, f"feature_count_{index}").fill_(float(count))

    def reset_feature_statistics(self) -> None:
        """The identity standardisation (through transformers' init functions, which skip loaded buffers)."""
        from transformers import initialization as init

        for index in range(len(self)):
            # Presence only: a buffer missing from a checkpoint is uninitialised memory here (reading its count could
            # meet a NaN).
            if hasattr(self, f"feature_mean_{index}"):
                init.zeros_(getattr(self, f"feature_mean_{index}"))
                init.ones_(getattr(self, f"feature_std_{index}"))
                init.zeros_(getattr(self, f"feature_count_{index}"))

    def standardize(self, index: int, features: torch.Tensor) -> torch.Tensor:
        stats = self.feature_statistics(index)
        if stats is None or stats[2] == 0:
            return features
        mean, std, _ = stats
        return (features - mean.to(features.dtype)) / std.to(features.dtype)

    def forward(self, features: list[torch.Tensor], pool: int = 1) -> torch.Tensor:
        """Standardise, pool and project each tower's `[N, T_k, D_k]` features; returns
        `[N, sum_k T_k / pool**2, text_hidden]`."""
        tokens = []
        for index, (projector, tower_features) in enumerate(zip(self, features)):
            dtype = next(projector.parameters()).dtype
            pooled = pool_patch_grid(self.standardize(index, tower_features.to(dtype)), pool)
            tokens.append(projector(pooled))
        return torch.cat(tokens, dim=1)


PROJECTORS = {
    "mlp": build_mlp_projector,
    "attention": build_attention_projector,
    "resampler": build_resampler_projector,
}


def build_projector(
    name: str, vision_config, text_config, depth: int = 2, num_patches: int | None = None, num_queries: int = 16
) -> nn.Module:
    """Build the projector registered under `name` for one vision tower.

    Args:
        name: a key of `PROJECTORS`.
        vision_config: the tower's config.
        text_config: the LLM's config.
        depth: blocks of the attention and resampler projectors.
        num_patches: patch features per image after pooling (the resampler's positions).
        num_queries: visual tokens per image of the resampler.

    Returns:
        The projector module.
    """
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; supported: {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_config, text_config, depth=depth, num_patches=num_patches, num_queries=num_queries)
