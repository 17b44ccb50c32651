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

from .calibration import ActivationStats, calibration_blocks, collect_activation_stats, read_calibration_texts
from .cli import PruneArguments, main, make_parser
from .importance import (
    block_importance,
    head_importance,
    hidden_channel_importance,
    kv_group_importance,
    mlp_channel_importance,
    top_indices,
)
from .layouts import (
    HEAD_AXES,
    LAYOUTS,
    LLAMA_LAYER_AXES,
    LLAMA_LAYOUT,
    LLAMA_MODEL_AXES,
    PLAN_FILE,
    DecoderLayout,
    layout_for,
)
from .pruning import (
    LLMParts,
    PruneTarget,
    build_student,
    calibration_loss,
    llm_parameter_counts,
    llm_parts,
    load_teacher,
    prune_model,
    resolve_sizes,
    save_student,
)
from .selection import (
    KeptIndices,
    prune_state_dict,
    remap_cross_attention_adapters,
    select,
    slice_tensor,
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

__all__ = [
    "ActivationStats",
    "DecoderLayout",
    "HEAD_AXES",
    "KeptIndices",
    "LAYOUTS",
    "LLAMA_LAYER_AXES",
    "LLAMA_LAYOUT",
    "LLAMA_MODEL_AXES",
    "LLMParts",
    "PLAN_FILE",
    "ParamEntry",
    "PruneArguments",
    "PruneSizes",
    "PruneTarget",
    "block_importance",
    "build_student",
    "calibration_blocks",
    "calibration_loss",
    "check_sizes",
    "collect_activation_stats",
    "count_params",
    "head_dim_of",
    "head_importance",
    "hidden_channel_importance",
    "kv_group_importance",
    "layout_for",
    "llm_entries",
    "llm_parameter_counts",
    "llm_parts",
    "load_teacher",
    "main",
    "make_parser",
    "mlp_channel_importance",
    "plan_candidates",
    "prune_model",
    "prune_state_dict",
    "read_calibration_texts",
    "remap_cross_attention_adapters",
    "resolve_sizes",
    "save_student",
    "select",
    "slice_tensor",
    "student_text_config",
    "top_indices",
]
