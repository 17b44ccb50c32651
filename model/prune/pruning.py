"""Pruning a model: the search over target sizes, slicing the teacher into the student, and saving it with its plan."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)

from ..configuration_vlm import VLMConfig
from ..modeling_vlm import VLMForConditionalGeneration
from .calibration import calibration_blocks, collect_activation_stats
from .layouts import PLAN_FILE, layout_for
from .selection import (
    KeptIndices,
    prune_state_dict,
    remap_cross_attention_adapters,
    select,
    student_text_config,
)
from .sizes import (
    ParamEntry,
    PruneSizes,
    check_sizes,
    count_params,
    head_dim_of,
    llm_entries,
    plan_candidates,
)

logger = logging.getLogger(__name__)


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
