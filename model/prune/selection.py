"""Selection and slicing: keeping the most important units of each axis and cutting the weights to them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..cross_attention import cross_attention_layer_indices
from .calibration import ActivationStats
from .importance import (
    block_importance,
    head_importance,
    hidden_channel_importance,
    kv_group_importance,
    mlp_channel_importance,
    top_indices,
)
from .sizes import ParamEntry, PruneSizes, head_dim_of

logger = logging.getLogger(__name__)


@dataclass
class KeptIndices:
    """What the student keeps of the teacher: decoder layers, and per kept layer its heads, KV groups and MLP
    channels; hidden channels are shared by all layers."""

    layers: list[int]
    heads: list[torch.Tensor]
    kv_groups: list[torch.Tensor]
    mlp: list[torch.Tensor]
    hidden: torch.Tensor


def select(stats: ActivationStats, teacher: PruneSizes, sizes: PruneSizes) -> tuple[KeptIndices, dict, dict]:
    """Rank everything by importance and keep the top of each axis at `sizes`.

    Returns:
        `(kept, scores, metrics)`: the kept indices, the importance scores by axis, the metrics to log.
    """
    depth, depth_metrics = block_importance(stats)
    mlp, mlp_metrics = mlp_channel_importance(stats)
    heads, head_metrics = head_importance(stats)
    groups, group_metrics = kv_group_importance(heads, teacher.num_key_value_heads)
    hidden, hidden_metrics = hidden_channel_importance(stats)
    ratio = teacher.num_attention_heads // teacher.num_key_value_heads
    per_group = sizes.num_attention_heads // sizes.num_key_value_heads
    layers = top_indices(depth, sizes.num_layers).tolist()
    kept = KeptIndices(layers=layers, heads=[], kv_groups=[], mlp=[], hidden=top_indices(hidden, sizes.hidden_size))
    for layer in layers:
        kept_groups = top_indices(groups[layer], sizes.num_key_value_heads)
        # Query heads stay grouped by KV group, in order, so head j of the student reads KV head j // per_group.
        member_scores = heads[layer].view(teacher.num_key_value_heads, ratio)
        kept_heads = torch.cat([g * ratio + top_indices(member_scores[g], per_group) for g in kept_groups.tolist()])
        kept.kv_groups.append(kept_groups)
        kept.heads.append(kept_heads)
        kept.mlp.append(top_indices(mlp[layer], sizes.intermediate_size))
    metrics = {**depth_metrics, **mlp_metrics, **head_metrics, **group_metrics, **hidden_metrics}
    metrics["dropped_layers"] = sorted(set(range(teacher.num_layers)) - set(layers))
    # Share of the teacher's total importance (over all layers) that the student keeps, per axis.
    mlp_mass = sum(mlp[layer][channels].sum() for layer, channels in zip(layers, kept.mlp))
    head_mass = sum(heads[layer][members].sum() for layer, members in zip(layers, kept.heads))
    metrics["kept_mlp_importance"] = float(mlp_mass / mlp.sum())
    metrics["kept_head_importance"] = float(head_mass / heads.sum())
    metrics["kept_hidden_importance"] = float(hidden[kept.hidden].sum() / hidden.sum())
    scores = {"depth": depth, "heads": heads, "kv_groups": groups, "mlp": mlp, "hidden": hidden}
    return kept, scores, metrics


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `width` rows each."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def slice_tensor(tensor: torch.Tensor, axes: tuple, index: dict[str, torch.Tensor]) -> torch.Tensor:
    """Keep `index[axis]` along every dimension that belongs to a pruning axis."""
    for dim, axis in enumerate(axes):
        if axis is not None:
            tensor = tensor.index_select(dim, index[axis].to(tensor.device))
    return tensor


def remap_cross_attention_adapters(num_layers: int, kept_layers: list[int], every: int) -> dict[int, int]:
    """Which teacher adapter each adapter slot of the shallower LLM takes over.

    An adapter runs in front of decoder layer a; with layers dropped it would naturally run in front of the first
    kept layer at or after a, i.e. at student position p(a) = #kept layers before a. The student's config puts
    adapters at `cross_attention_layer_indices(len(kept_layers), every)`; each slot takes the unused teacher adapter
    whose p(a) is nearest (the earlier one on a tie); teacher adapters left over are dropped.

    Returns:
        `{student slot: teacher adapter layer}`.
    """
    teacher_adapters = cross_attention_layer_indices(num_layers, every)
    natural = {a: sum(1 for k in kept_layers if k < a) for a in teacher_adapters}
    mapping, unused = {}, list(teacher_adapters)
    for slot in cross_attention_layer_indices(len(kept_layers), every):
        chosen = min(unused, key=lambda a: (abs(natural[a] - slot), a))
        unused.remove(chosen)
        mapping[slot] = chosen
    return mapping


def prune_state_dict(
    state: dict[str, torch.Tensor],
    entries: list[ParamEntry],
    kept: KeptIndices,
    head_dim: int,
    decoder_prefix: str,
    adapter_map: dict[int, int] | None = None,
    adapter_prefix: str = "model.cross_attention.",
) -> dict[str, torch.Tensor]:
    """The student's state dict: LLM weights sliced and layers renumbered, adapters moved to their slots, every
    other weight (vision towers, projectors) as it is."""
    by_key = {entry.key: entry for entry in entries}
    position = {layer: i for i, layer in enumerate(kept.layers)}
    moved = {str(old): str(new) for new, old in (adapter_map or {}).items()}
    pruned = {}
    for key, tensor in state.items():
        entry = by_key.get(key)
        if entry is None:
            if adapter_map is not None and key.startswith(adapter_prefix):
                old, rest = key[len(adapter_prefix) :].split(".", 1)
                if old in moved:
                    pruned[f"{adapter_prefix}{moved[old]}.{rest}"] = tensor.clone()
            else:
                pruned[key] = tensor.clone()
            continue
        if entry.layer is not None and entry.layer not in position:
            continue
        index = {"hidden": kept.hidden}
        if entry.layer is not None:
            i = position[entry.layer]
            index.update(q=_rows(kept.heads[i], head_dim), kv=_rows(kept.kv_groups[i], head_dim), mlp=kept.mlp[i])
            key = f"{decoder_prefix}layers.{i}.{entry.name}"
        pruned[key] = slice_tensor(tensor, entry.axes, index).clone()
    return pruned


def student_text_config(text_config, sizes: PruneSizes, kept_layers: list[int]):
    """The teacher LLM's config at the student's sizes; `head_dim` is set explicitly (it stays the teacher's, which
    hidden_size / num_attention_heads no longer gives) and per-layer lists (Qwen2's `layer_types`) follow the kept
    layers."""
    data = text_config.to_dict()
    data.update(
        num_hidden_layers=sizes.num_layers,
        intermediate_size=sizes.intermediate_size,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        hidden_size=sizes.hidden_size,
        head_dim=head_dim_of(text_config),
    )
    if isinstance(data.get("layer_types"), list):
        data["layer_types"] = [data["layer_types"][i] for i in kept_layers]
    return type(text_config).from_dict(data)
