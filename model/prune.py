"""Structured pruning: a smaller student of the same architecture from a teacher LLM, alone or inside a VLM.

    python -m model.prune --teacher .cache/zoo/llama --calibration_file calibration.jsonl \\
        --target_params 0.375 --output runs/pruned-llama

writes an ordinary checkpoint of the teacher's class with a smaller config (plus its tokenizer or processor), which
`from_pretrained` loads, and `prune_plan.json` (the sizes, the kept layers/heads/channels, parameter counts before and
after, the importance scores).

Minitron (arXiv:2407.14679): one calibration pass through the teacher's decoder measures
- depth: block importance, 1 - cos(layer input, layer output) averaged over tokens (ShortGPT, arXiv:2403.03853);
- width: mean |activation| per MLP channel (the input of `down_proj`), per attention head (the L2 norm of its
  output before `o_proj`), per KV group (the sum over its query heads), per hidden channel (the outputs of the
  RMSNorms, Minitron's choice: the norm weight scales what the next linears see);
then the least important layers, MLP channels, KV groups (with their query heads, so the query heads per group stay
as in the teacher unless `--num_attention_heads` asks for fewer per group) and hidden channels are sliced away.
Nothing is retrained: the student is meant to be distilled from the teacher next.

Target: `--target_params F` keeps about F of the teacher LLM's *non-embedding* parameters (decoder layers and final
norm; the token embeddings and LM head are left out of the count because they shrink only with the hidden size).
For each depth L' the widths are solved: the MLP intermediate size lands the count as close to the target as
possible from below, attention heads are kept (as in Minitron-8B; dropping KV groups cost the most perplexity per
parameter on the default tiny Llama) unless no MLP channel would be left, then KV groups go one at a time with their
query heads; with `--prune_hidden` the hidden size keeps `sqrt(w)` of the teacher's (`w = F * L / L'`, rounded down
to a multiple of the query heads). By default every depth 1..L is built this way and the student with the lowest
calibration perplexity is kept (Minitron ranks candidate architectures by LM loss too); `--depth_share s` instead
fixes the depth at `round(L * F**s)` (0: width only, 1: depth only).
Alternatively give explicit sizes (`--num_layers`, `--intermediate_size`, `--num_attention_heads`,
`--num_key_value_heads`, `--hidden_size`); the ones left out keep the teacher's.

Supported: Llama- and Qwen2-architecture causal LMs, and VLMs (`model_type="vlm_align"`) around one, whose LLM is
pruned with *text-only* calibration (vision towers and projectors are kept as they are). Prepend-fusion VLMs prune
depth, MLP and heads; cross-attention VLMs depth only (their adapters read `hidden_size`, `num_attention_heads` and
`intermediate_size` from the LLM's config), their adapters following the kept layers onto the slots that
`cross_attention_every` gives the shallower LLM. Hidden-channel pruning is for LLMs alone: a VLM's projector is
built at the LLM's hidden width.

Calibration file: JSONL with one document per line (`{"text": ...}` or a JSON string), or plain text with one
document per non-empty line.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
)

from .configuration_vlm import VLMConfig
from .cross_attention import cross_attention_layer_indices
from .modeling_vlm import VLMForConditionalGeneration

logger = logging.getLogger(__name__)

PLAN_FILE = "prune_plan.json"

# ---------------------------------------------------------------------------------------------------------------
# Architectures: which dimension of each weight belongs to which pruning axis
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Sizes and parameter counts
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Calibration: activation statistics in one pass
# ---------------------------------------------------------------------------------------------------------------


def read_calibration_texts(path: str) -> list[str]:
    """Documents of a calibration file: JSONL (`{"text": ...}` or a JSON string per line) or one per text line."""
    if not os.path.isfile(path):
        raise ValueError(f"calibration_file {path!r} does not exist")
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
                raise ValueError(f"calibration_file {path!r} line {number}: expected {{\"text\": ...}} or a string")
            texts.append(text)
    if not texts:
        raise ValueError(f"calibration_file {path!r} holds no documents")
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


# ---------------------------------------------------------------------------------------------------------------
# Importance scores (each returns the scores and the metrics worth logging)
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Selection and slicing
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Pruning a model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PruneTarget:
    """What to prune to: a fraction of the non-embedding parameters, or explicit sizes (unset ones are kept)."""

    target_params: float | None = None
    num_layers: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    hidden_size: int | None = None
    prune_hidden: bool = False
    depth_share: float | None = None
    width_multiple: int = 1

    def explicit(self) -> dict[str, int]:
        names = ("num_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class LLMParts:
    """Where the LLM sits in a causal LM or a VLM, and what may be pruned there."""

    decoder: nn.Module
    text_config: object
    decoder_prefix: str
    head_prefix: str
    axes: set[str]
    vlm_config: VLMConfig | None = None


def llm_parts(model: PreTrainedModel) -> LLMParts:
    """The LLM of a causal LM or a VLM (prepend: depth, MLP, heads; cross-attention: depth; LLM alone: + hidden)."""
    if isinstance(model, VLMForConditionalGeneration):
        config = model.config
        axes = {"depth", "mlp", "heads"} if config.fusion == "prepend" else {"depth"}
        decoder = model.model.language_model
        return LLMParts(decoder, config.text_config, "model.language_model.", "lm_head.", axes, config)
    decoder = getattr(model, model.base_model_prefix, None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ValueError(f"unknown architecture {type(model).__name__}: expected a causal LM with decoder layers")
    axes = {"depth", "mlp", "heads", "hidden"}
    return LLMParts(decoder, model.config, f"{model.base_model_prefix}.", "lm_head.", axes)


def resolve_sizes(model: PreTrainedModel, target: PruneTarget) -> list[PruneSizes]:
    """The student's candidate sizes for `model` (searched for `target.target_params`, or explicit), checked."""
    parts = llm_parts(model)
    teacher = PruneSizes.of(parts.text_config)
    head_dim = head_dim_of(parts.text_config)
    explicit = target.explicit()
    if (target.target_params is None) == (not explicit):
        raise ValueError("give either target_params or explicit sizes (num_layers, intermediate_size, ...), not both")
    if (target.hidden_size is not None or target.prune_hidden) and parts.vlm_config is not None:
        raise ValueError(
            "hidden_size cannot be pruned in a VLM: its projectors and cross-attention adapters are built at the "
            "LLM's hidden width; prune the LLM alone, or prune depth, MLP and heads"
        )
    if target.target_params is not None:
        search_axes = parts.axes - ({"hidden"} if not target.prune_hidden else set())
        entries = llm_entries(model, layout_for(parts.text_config), parts.decoder_prefix, parts.head_prefix)
        candidates = plan_candidates(
            teacher, entries, head_dim, target.target_params, search_axes, target.depth_share, target.width_multiple
        )
    else:
        sizes = PruneSizes(**{**asdict(teacher), **explicit})
        if "num_key_value_heads" in explicit and "num_attention_heads" not in explicit:
            # Whole KV groups go with their query heads.
            ratio = teacher.num_attention_heads // teacher.num_key_value_heads
            sizes.num_attention_heads = sizes.num_key_value_heads * ratio
        candidates = [sizes]
    for sizes in candidates:
        check_sizes(sizes, teacher, parts.axes)
    return candidates


def build_student(
    model: PreTrainedModel, parts: LLMParts, entries: list[ParamEntry], sizes: PruneSizes, kept: KeptIndices
) -> tuple[PreTrainedModel, dict[int, int] | None]:
    """A new model of the teacher's class at `sizes` holding the kept weights; returns it (in eval mode) and, for a
    cross-attention VLM, which teacher adapter each adapter slot took over."""
    teacher_layers = parts.text_config.num_hidden_layers
    text_config = student_text_config(parts.text_config, sizes, kept.layers)
    adapter_map = None
    if parts.vlm_config is not None:
        data = parts.vlm_config.to_dict()
        data["text_config"] = text_config.to_dict()
        config = VLMConfig.from_dict(data)
        if parts.vlm_config.fusion == "cross_attention":
            every = parts.vlm_config.cross_attention_every
            adapter_map = remap_cross_attention_adapters(teacher_layers, kept.layers, every)
    else:
        config = text_config
    head_dim = head_dim_of(parts.text_config)
    state = prune_state_dict(model.state_dict(), entries, kept, head_dim, parts.decoder_prefix, adapter_map)
    student = type(model)(config).to(model.dtype)
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval(), adapter_map


@torch.inference_mode()
def calibration_loss(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss of `model` on the calibration blocks (text only, also for a VLM)."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        tokens = batch[:, 1:].numel()
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * tokens
        count += tokens
    return total / count


def prune_model(
    model: PreTrainedModel,
    tokenizer,
    texts: list[str],
    target: PruneTarget,
    block_size: int = 128,
    max_blocks: int = 64,
    batch_size: int = 8,
) -> tuple[PreTrainedModel, dict]:
    """Prune a causal LM or a VLM's LLM with calibration texts.

    With `target_params` and no `depth_share`, one candidate per depth is built and the one with the lowest
    calibration loss is kept (Minitron ranks its candidate architectures by LM loss too, after a short retraining).

    Args:
        model: the teacher (`LlamaForCausalLM`, `Qwen2ForCausalLM`, or a `VLMForConditionalGeneration` around one).
        tokenizer: its tokenizer (a VLM's `processor.tokenizer`).
        texts: calibration documents (text only, also for a VLM).
        target: `target_params` or explicit sizes.
        block_size, max_blocks, batch_size: calibration tokens per block, blocks, blocks per forward.

    Returns:
        `(student, report)`: the student, a new model of the teacher's class in eval mode, and the report written
        to `prune_plan.json` (sizes, kept indices, parameter counts, importance scores, metrics).
    """
    parts = llm_parts(model)
    layout = layout_for(parts.text_config)
    candidates = resolve_sizes(model, target)
    teacher = PruneSizes.of(parts.text_config)
    head_dim = head_dim_of(parts.text_config)
    entries = llm_entries(model, layout, parts.decoder_prefix, parts.head_prefix)

    blocks = calibration_blocks(texts, tokenizer, block_size, max_blocks)
    stats = collect_activation_stats(parts.decoder, layout, blocks, batch_size)
    best, search = None, []
    for sizes in candidates:
        kept, scores, metrics = select(stats, teacher, sizes)
        student, adapter_map = build_student(model, parts, entries, sizes, kept)
        loss = calibration_loss(student, blocks, batch_size) if len(candidates) > 1 else None
        if loss is not None:
            search.append({**asdict(sizes), "calibration_perplexity": math.exp(loss)})
            logger.info(
                "candidate: %d layers, intermediate %d, %d/%d heads, hidden %d: calibration perplexity %.3f",
                sizes.num_layers, sizes.intermediate_size, sizes.num_attention_heads, sizes.num_key_value_heads,
                sizes.hidden_size, math.exp(loss),
            )
        if best is None or (loss is not None and loss < best[0]):
            best = (loss, sizes, kept, scores, metrics, student, adapter_map)
        del student
    _, sizes, kept, scores, metrics, student, adapter_map = best

    before, after = llm_parameter_counts(model), llm_parameter_counts(student)
    report = {
        "sizes": asdict(sizes),
        "teacher_sizes": asdict(teacher),
        "head_dim": head_dim,
        "target": {k: v for k, v in asdict(target).items() if v is not None},
        "search": search or None,
        "kept": {
            "layers": kept.layers,
            "kv_groups": [g.tolist() for g in kept.kv_groups],
            "heads": [h.tolist() for h in kept.heads],
            "mlp_channels": [len(m) for m in kept.mlp],
            "hidden_channels": len(kept.hidden),
        },
        "cross_attention_adapters": {str(k): v for k, v in adapter_map.items()} if adapter_map is not None else None,
        "params_before": before,
        "params_after": after,
        "kept_fraction_non_embedding": after["llm_non_embedding"] / before["llm_non_embedding"],
        "calibration": {"blocks": len(blocks), "tokens": stats.tokens},
        "importance": {
            "depth": scores["depth"].tolist(),
            "heads": scores["heads"].tolist(),
            "kv_groups": scores["kv_groups"].tolist(),
            "hidden": scores["hidden"].tolist(),
            # Per-channel MLP scores would be layers x intermediate floats; their summary per layer is kept.
            "mlp_per_layer_mean": scores["mlp"].mean(-1).tolist(),
        },
        "metrics": metrics,
    }
    logger.info(
        "pruned %d -> %d layers (dropped %s), intermediate %d -> %d, heads %d/%d -> %d/%d, hidden %d -> %d; "
        "LLM non-embedding parameters %d -> %d (%.3f), whole model %d -> %d",
        teacher.num_layers, sizes.num_layers, metrics["dropped_layers"], teacher.intermediate_size,
        sizes.intermediate_size, teacher.num_attention_heads, teacher.num_key_value_heads, sizes.num_attention_heads,
        sizes.num_key_value_heads, teacher.hidden_size, sizes.hidden_size, before["llm_non_embedding"],
        after["llm_non_embedding"], report["kept_fraction_non_embedding"], before["model"], after["model"],
    )
    if adapter_map is not None:
        logger.info("cross-attention adapters (student slot <- teacher layer): %s", adapter_map)
    return student, report


def llm_parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Parameters of a causal LM or a VLM as `prune_plan.json` reports them: the LLM's non-embedding ones (decoder
    layers and final norm, what `target_params` is a fraction of), the LLM's with token embeddings and LM head, and
    the whole model's."""
    parts = llm_parts(model)
    layout = layout_for(parts.text_config)
    entries = llm_entries(model, layout, parts.decoder_prefix, parts.head_prefix)
    sizes, head_dim = PruneSizes.of(parts.text_config), head_dim_of(parts.text_config)
    return {
        "llm_non_embedding": count_params(entries, sizes, head_dim),
        "llm": count_params(entries, sizes, head_dim, embeddings=True),
        "model": model.num_parameters(),
    }


def load_teacher(path: str) -> tuple[PreTrainedModel, object]:
    """Load a teacher directory: a VLM (`model_type="vlm_align"`) with its processor, or a causal LM with its
    tokenizer."""
    if not os.path.isdir(path):
        raise ValueError(f"teacher {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"teacher {path!r} holds a LoRA adapter; prune its merged model (e.g. {path}/merged)")
        raise ValueError(f"teacher {path!r} holds no config.json")
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, VLMConfig):
        layout_for(config.text_config)
        return VLMForConditionalGeneration.from_pretrained(path), AutoProcessor.from_pretrained(path)
    layout_for(config)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def save_student(student: PreTrainedModel, processing, report: dict, output: str) -> None:
    """Write the student (safetensors), its tokenizer or processor, and `prune_plan.json`."""
    os.makedirs(output, exist_ok=True)
    student.save_pretrained(output)
    processing.save_pretrained(output)
    # Written last and whole (a temporary name, then one rename): a plan file marks a finished student.
    partial = os.path.join(output, f".{PLAN_FILE}.partial")
    with open(partial, "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(partial, os.path.join(output, PLAN_FILE))


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PruneArguments:
    """Command-line arguments of `python -m model.prune`."""

    teacher: str = field(metadata={"help": "Directory of the teacher: a Llama/Qwen2 causal LM, or a VLM around one."})
    output: str = field(
        metadata={"help": "Directory the pruned student, its tokenizer/processor and prune_plan.json go to."}
    )
    calibration_file: str = field(
        metadata={"help": "Calibration documents: JSONL ({\"text\": ...} per line) or plain text, one per line."}
    )
    target_params: float | None = field(
        default=None,
        metadata={"help": "Keep about this fraction, in (0, 1], of the teacher LLM's non-embedding parameters."},
    )
    num_layers: int | None = field(default=None, metadata={"help": "Explicit: decoder layers to keep."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Explicit: MLP channels per layer."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Explicit: query heads per layer."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Explicit: KV groups per layer (their query heads go with them)."}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Explicit: hidden channels (LLM alone only)."})
    prune_hidden: bool = field(
        default=False, metadata={"help": "Let the target_params search shrink the hidden size too (LLM alone only)."}
    )
    depth_share: float | None = field(
        default=None,
        metadata={
            "help": "Unset: try every depth and keep the lowest calibration perplexity. Set: layers keep "
            "target_params**depth_share of the teacher's (0: width only, 1: depth only)."
        },
    )
    width_multiple: int = field(
        default=1, metadata={"help": "Round searched intermediate/hidden sizes down to a multiple of this."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per calibration block."})
    calibration_blocks: int = field(default=64, metadata={"help": "Calibration blocks (at most)."})
    batch_size: int = field(default=8, metadata={"help": "Calibration blocks per forward."})

    def __post_init__(self):
        target = self.target()
        if (self.target_params is None) == (not target.explicit()):
            raise ValueError(
                "give either --target_params or explicit sizes (--num_layers, --intermediate_size, ...), not both"
            )
        if self.target_params is not None and not 0 < self.target_params <= 1:
            raise ValueError(f"target_params must be a fraction in (0, 1], got {self.target_params}")
        for name, value in target.explicit().items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.depth_share is not None and not 0 <= self.depth_share <= 1:
            raise ValueError(f"depth_share must be in [0, 1], got {self.depth_share}")
        for name in ("width_multiple", "block_size", "calibration_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def target(self) -> PruneTarget:
        return PruneTarget(
            target_params=self.target_params,
            num_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_size=self.hidden_size,
            prune_hidden=self.prune_hidden,
            depth_share=self.depth_share,
            width_multiple=self.width_multiple,
        )


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(PruneArguments)


def main(args: PruneArguments) -> dict:
    """Load the teacher, prune it on the calibration file, save the student; returns the plan report."""
    model, processing = load_teacher(args.teacher)
    tokenizer = getattr(processing, "tokenizer", processing)
    texts = read_calibration_texts(args.calibration_file)
    student, report = prune_model(
        model, tokenizer, texts, args.target(), args.block_size, args.calibration_blocks, args.batch_size
    )
    report["teacher"] = args.teacher
    save_student(student, processing, report, args.output)
    logger.info("wrote the pruned %s and %s to %s", type(student).__name__, PLAN_FILE, args.output)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (prune_args,) = make_parser().parse_args_into_dataclasses()
    main(prune_args)
