"""Sizes and parameter counts: the pruning target, the LLM's entries and what a size keeps."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass

from transformers import (
    PreTrainedModel,
)

from .layouts import HEAD_AXES, LAYOUTS, DecoderLayout

logger = logging.getLogger(__name__)


@dataclass
class PruneSizes:
    """The student's LLM sizes (the teacher's when nothing is pruned)."""

    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int

    @classmethod
    def of(cls, text_config) -> PruneSizes:
        return cls(
            num_layers=text_config.num_hidden_layers,
            intermediate_size=text_config.intermediate_size,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            hidden_size=text_config.hidden_size,
        )

    def axis_sizes(self, head_dim: int) -> dict[str, int]:
        return {
            "q": self.num_attention_heads * head_dim,
            "kv": self.num_key_value_heads * head_dim,
            "mlp": self.intermediate_size,
            "hidden": self.hidden_size,
        }


def head_dim_of(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


@dataclass
class ParamEntry:
    """One LLM weight: its state-dict key, decoder layer (None outside the layers), shape and pruning axes."""

    key: str
    layer: int | None
    name: str
    shape: tuple[int, ...]
    axes: tuple
    embedding: bool
    tied: bool = False


def llm_entries(
    model: PreTrainedModel, layout: DecoderLayout, decoder_prefix: str, head_prefix: str
) -> list[ParamEntry]:
    """Classify every weight of the LLM (under `decoder_prefix` and `head_prefix`) by the layout's axis rules.

    Raises:
        ValueError: a weight has no rule (an architecture variant the layout does not know).
    """
    entries = []
    state = model.state_dict()
    embeddings = [state[decoder_prefix + name] for name in layout.embeddings if decoder_prefix + name in state]
    embed_ptrs = {tensor.data_ptr() for tensor in embeddings}
    for key, tensor in state.items():
        if key.startswith(decoder_prefix):
            name = key[len(decoder_prefix) :]
            match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
            if match:
                layer, rule_name, rules = int(match[1]), match[2], layout.layer_axes
            else:
                layer, rule_name, rules = None, name, layout.model_axes
            embedding = name in layout.embeddings
            tied = False
        elif key.startswith(head_prefix):
            layer, rule_name, rules = None, key[len(head_prefix) :], HEAD_AXES
            embedding, tied = True, tensor.data_ptr() in embed_ptrs
        else:
            continue
        if rule_name not in rules:
            raise ValueError(
                f"unknown architecture: the LLM weight {key!r} has no pruning rule ({type(model).__name__}); "
                f"supported: {sorted(LAYOUTS)}"
            )
        entries.append(ParamEntry(key, layer, rule_name, tuple(tensor.shape), rules[rule_name], embedding, tied))
    return entries


def count_params(entries: list[ParamEntry], sizes: PruneSizes, head_dim: int, embeddings: bool = False) -> int:
    """Parameters of the LLM at `sizes` (exact: the same axis rules the slicing uses); without embeddings and LM head
    unless `embeddings`. Layer 0's weights stand for every layer (decoder layers share their shapes)."""
    axis_sizes = sizes.axis_sizes(head_dim)
    total = 0
    for entry in entries:
        if entry.tied or (entry.embedding and not embeddings) or (entry.layer is not None and entry.layer != 0):
            continue
        numel = math.prod(axis_sizes[axis] if axis else dim for axis, dim in zip(entry.axes, entry.shape))
        total += numel * (sizes.num_layers if entry.layer is not None else 1)
    return total


def _round_down(value: float, multiple: int) -> int:
    value = int(value)
    return value - value % multiple if value >= multiple else value


def _solve_width(
    teacher: PruneSizes,
    entries: list[ParamEntry],
    head_dim: int,
    target: int,
    layers: int,
    axes: set[str],
    width_multiple: int,
) -> PruneSizes | None:
    """Widths at `layers` layers that land on `target` non-embedding parameters from below, or None if none fit.

    The hidden size (if it may shrink) keeps `sqrt(w)` of the teacher's, `w = target / (layers * teacher's params
    per layer)`; every KV group is kept and the MLP intermediate size is solved; if no MLP channel would be left,
    KV groups (with their query heads) are dropped one at a time. Attention is kept whole first: Minitron-8B kept
    every head, and on the default tiny Llama dropping a KV group cost more perplexity than the same parameters of
    MLP channels or layers.
    """
    ratio = teacher.num_attention_heads // teacher.num_key_value_heads
    width = min(1.0, target / count_params(entries, teacher, head_dim) * teacher.num_layers / layers)
    lowest = 1 if "heads" in axes else teacher.num_key_value_heads
    for groups in range(teacher.num_key_value_heads, lowest - 1, -1):
        hidden = teacher.hidden_size
        if "hidden" in axes:
            # A multiple of the query heads too: transformers' LlamaConfig refuses other hidden sizes.
            multiple = math.lcm(width_multiple, groups * ratio)
            hidden = min(hidden, max(multiple, _round_down(hidden * width**0.5, multiple)))
        sizes = PruneSizes(layers, 0, groups * ratio, groups, hidden)
        base = count_params(entries, sizes, head_dim)
        sizes.intermediate_size = 1
        per_channel = count_params(entries, sizes, head_dim) - base
        intermediate = _round_down((target - base) / per_channel, width_multiple)
        if intermediate >= 1:
            sizes.intermediate_size = min(teacher.intermediate_size, intermediate)
            return sizes
    return None


def _reaches(sizes: PruneSizes, teacher: PruneSizes, entries: list[ParamEntry], head_dim: int, target: int) -> bool:
    """Whether `sizes` comes within one MLP channel per layer of `target` (a depth too shallow to reach the target
    at the teacher's widths would undershoot it)."""
    one_channel = PruneSizes(**{**asdict(sizes), "intermediate_size": sizes.intermediate_size + 1})
    return count_params(entries, one_channel, head_dim) > target or sizes.num_layers == teacher.num_layers


def plan_candidates(
    teacher: PruneSizes,
    entries: list[ParamEntry],
    head_dim: int,
    fraction: float,
    axes: set[str],
    depth_share: float | None = None,
    width_multiple: int = 1,
) -> list[PruneSizes]:
    """Student sizes keeping about `fraction` of the teacher's non-embedding parameters (see the module docstring).

    Args:
        teacher: the teacher's sizes.
        entries: the teacher LLM's weights (`llm_entries`).
        head_dim: attention head width (kept).
        fraction: in (0, 1].
        axes: what may shrink: a subset of {"depth", "mlp", "heads", "hidden"}.
        depth_share: None: one candidate per depth (1..L layers, widths solved for each), for the caller to rank;
            a number: layers keep `round(L * fraction ** depth_share)` (0: width only, 1: depth only).
        width_multiple: intermediate and hidden sizes are rounded down to a multiple of this.

    Returns:
        The candidate `PruneSizes` (one unless `depth_share` is None).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"target_params must be a fraction in (0, 1], got {fraction}")
    target = round(fraction * count_params(entries, teacher, head_dim))
    if "mlp" not in axes or depth_share == 1:
        layers = round(teacher.num_layers * fraction)
        if layers < 1 or "depth" not in axes:
            raise ValueError(
                f"target_params={fraction} leaves no decoder layers (the teacher has {teacher.num_layers}; pruning "
                f"only depth, the smallest reachable target is {0.5 / teacher.num_layers:.3f})"
            )
        return [PruneSizes(**{**asdict(teacher), "num_layers": min(layers, teacher.num_layers)})]
    if "depth" not in axes:
        depths = [teacher.num_layers]
    elif depth_share is None:
        depths = list(range(teacher.num_layers, 0, -1))
    else:
        # The fixed depth first, then shallower ones if its widths cannot reach the target.
        start = min(teacher.num_layers, max(1, round(teacher.num_layers * fraction**depth_share)))
        depths = list(range(start, 0, -1))
    candidates = []
    for layers in depths:
        sizes = _solve_width(teacher, entries, head_dim, target, layers, axes, width_multiple)
        if sizes is None:
            continue
        if depth_share is not None:
            # A fixed depth is kept even where full widths fall short of the target.
            candidates.append(sizes)
            break
        if _reaches(sizes, teacher, entries, head_dim, target):
            candidates.append(sizes)
    if not candidates:
        groups = 1 if "heads" in axes else teacher.num_key_value_heads
        ratio = teacher.num_attention_heads // teacher.num_key_value_heads
        smallest = count_params(entries, PruneSizes(1, 1, groups * ratio, groups, teacher.hidden_size), head_dim)
        raise ValueError(
            f"target_params={fraction} leaves no MLP channel, head or layer: a one-layer student with {groups} KV "
            f"group(s) and one MLP channel keeps {smallest / count_params(entries, teacher, head_dim):.4f} of the "
            "teacher's non-embedding parameters"
        )
    return candidates


def check_sizes(sizes: PruneSizes, teacher: PruneSizes, axes: set[str]) -> None:
    """Refuse sizes that leave nothing, grow the teacher, break grouped-query attention or touch a locked axis."""
    # KV groups first: explicit ones set the query heads that go with them.
    for name in ("num_layers", "intermediate_size", "num_key_value_heads", "num_attention_heads", "hidden_size"):
        value, limit = getattr(sizes, name), getattr(teacher, name)
        if not 1 <= value <= limit:
            raise ValueError(f"{name} must be between 1 and the teacher's {limit}, got {value}")
    if sizes.num_attention_heads % sizes.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={sizes.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={sizes.num_key_value_heads} (the same query heads per KV group)"
        )
    if sizes.hidden_size % sizes.num_attention_heads:
        raise ValueError(
            f"hidden_size={sizes.hidden_size} must be a multiple of num_attention_heads={sizes.num_attention_heads} "
            "(transformers' LlamaConfig requires it, although head_dim stays the teacher's)"
        )
    ratio = teacher.num_attention_heads // teacher.num_key_value_heads
    if sizes.num_attention_heads // sizes.num_key_value_heads > ratio:
        raise ValueError(
            f"num_attention_heads={sizes.num_attention_heads} gives more query heads per KV group than the teacher's "
            f"{ratio}: prune whole KV groups (num_key_value_heads) with their query heads"
        )
    changed = {
        "depth": sizes.num_layers != teacher.num_layers,
        "mlp": sizes.intermediate_size != teacher.intermediate_size,
        "heads": (sizes.num_attention_heads, sizes.num_key_value_heads)
        != (teacher.num_attention_heads, teacher.num_key_value_heads),
        "hidden": sizes.hidden_size != teacher.hidden_size,
    }
    names = dict(depth="num_layers", mlp="intermediate_size", heads="num_attention_heads", hidden="hidden_size")
    for axis, was_changed in changed.items():
        if was_changed and axis not in axes:
            raise ValueError(
                f"{names[axis]} cannot be pruned for this model (prunable here: {sorted(axes)}; see model.prune)"
            )
