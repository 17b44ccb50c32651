"""Training stages as data: which parts of a VLM train in each stage, applied by one visible call.

    freeze_for_stage(model, "align")

It works on the bare model. With PEFT, the wrapping decides what trains instead: LoRA on the targeted layers plus
the modules listed in `modules_to_save` (e.g. `["projectors", "cross_attention"]` for the `align` parts).
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

# The components of a `VLMForConditionalGeneration`, in the order they are reported.
COMPONENTS = ("vision_towers", "projectors", "cross_attention", "language_model", "lm_head")

# Trainable components per stage; every other component is frozen. The cross-attention adapters train whenever the
# projectors do: behind zero-initialised gates, a projector alone receives no gradient.
STAGES = {
    "prealign": ("vision_towers", "projectors", "cross_attention"),
    "align": ("projectors", "cross_attention"),
    "finetune": ("projectors", "cross_attention", "language_model", "lm_head"),
    "full": COMPONENTS,
}


def _component(model: nn.Module, name: str) -> nn.Module | None:
    if name == "lm_head":
        return model.get_output_embeddings()
    return getattr(model.model, name, None)


def freeze_for_stage(model: nn.Module, stage: str) -> dict[str, dict]:
    """Set `requires_grad` of a VLM's components for `stage` and log what trains.

    Args:
        model: a `VLMForConditionalGeneration` (not wrapped by PEFT).
        stage: a key of `STAGES`: `prealign` (towers + projectors/adapters), `align` (projectors/adapters only),
            `finetune` (projectors/adapters + LLM), `full` (everything).

    Returns:
        `{component: {"trainable": bool, "parameters": int}}` for the components the model has. Parameters shared
        with an earlier component (an LM head tied to the input embeddings) are counted once, under the first.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; supported: {sorted(STAGES)}")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "freeze_for_stage works on the bare model: under PEFT, LoRA and `modules_to_save` decide what trains"
        )
    # Every stage trains the LM head and the LLM together or not at all, so a head tied to the input embeddings
    # (one shared parameter) never gets two conflicting settings.
    trainable = set(STAGES[stage])
    summary, seen = {}, set()
    for name in COMPONENTS:
        module = _component(model, name)
        if module is None:
            continue
        module.requires_grad_(name in trainable)
        count = 0
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                count += parameter.numel()
        summary[name] = {"trainable": name in trainable, "parameters": count}
    for name, entry in summary.items():
        logger.info(
            "stage %s: %s %s (%s parameters)",
            stage,
            name,
            "trainable" if entry["trainable"] else "frozen",
            f"{entry['parameters']:,}",
        )
    return summary


__all__ = ["COMPONENTS", "STAGES", "freeze_for_stage"]
