"""What the suite knows about each family of VLMs it aligns, in one registry instead of `if`s across the recipes.

A `Family` maps the suite's training components (`model.stages.COMPONENTS`: vision towers, projectors,
cross-attention, language model, LM head) to the module paths of a model class, and says how LoRA targets its LLM.
From that follow the rest: what a stage trains without LoRA (`freeze_for_stage`), what trains in full beside LoRA
(`modules_to_save`), what stays out of 4-bit under QLoRA, and the tokens that end an answer. The suite's own VLM is
one entry; stock checkpoints (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM, Mllama, Gemma 3) are the others, and an
unknown `model_type` gets generic rules with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from model.stages import COMPONENTS, STAGES

logger = logging.getLogger(__name__)

_PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def llm_lora_targets(llm: str, blocks: str = "self_attn|mlp") -> str:
    """A LoRA target regex: the attention and MLP projections of the decoder layers under module path `llm`.
    Anchored on the LLM's layers because vision towers and adapters have `q_proj`/`v_proj`/`fc1` linears too."""
    return rf".*{re.escape(llm)}\.layers\.\d+\.({blocks})\.{_PROJECTIONS}"


@dataclass(frozen=True)
class Family:
    """One family of VLMs: its module layout and the rules derived from it."""

    name: str
    model_types: tuple[str, ...]
    # Suite component -> module paths under the model (`model.vision_tower`, ...); a later component overrides an
    # earlier one when nested (Qwen2-VL's merger sits inside its vision tower).
    components: dict[str, tuple[str, ...]]
    lora_targets: str
    stop_tokens: tuple[str, ...] = ()
    image_inputs: tuple[str, ...] = ("pixel_values",)
    notes: str = ""
    # Components whose module paths depend on the checkpoint's config: Mllama's cross-attention decoder layers sit
    # among its LLM's layers at `text_config.cross_attention_layers`.
    config_components: Callable[[object], dict[str, tuple[str, ...]]] | None = None
    # The chat template with `{% generation %}` markers for TRL's assistant-only loss, where TRL has none for the
    # family's stock template (a file in `align/chat_templates/`).
    training_chat_template: str | None = None
    # Whether the vision tower's input rows are whole images (so repeated images can be encoded once,
    # `align.towers.RowMemo`); Qwen2-VL's tower takes the flattened patches of all images instead.
    image_rows: bool = True

    def paths(self, model_or_config, component: str) -> tuple[str, ...]:
        """The module paths of `component` (`model.vision_tower`, ...) for this model or config."""
        paths = self.components.get(component, ())
        if self.config_components is not None:
            paths += self.config_components(getattr(model_or_config, "config", model_or_config)).get(component, ())
        return paths

    def modules(self, model: nn.Module, component: str) -> list[nn.Module]:
        """The modules of `component` that `model` has (`lm_head`: its output embeddings)."""
        if component == "lm_head":
            head = model.get_output_embeddings()
            return [head] if head is not None else []
        return [model.get_submodule(path) for path in self.paths(model, component) if _has_submodule(model, path)]

    def trained_in_full_under_lora(self, stage: str, model: nn.Module) -> list[str]:
        """Module names PEFT's `modules_to_save` takes (matched as name suffixes): the parts of `model` that the
        stage trains and LoRA does not adapt (projectors/connectors, cross-attention layers, towers in `prealign`)."""
        names = []
        for component in ("vision_towers", "projectors", "cross_attention"):
            if component in STAGES[stage]:
                names += [_suffix(path) for path in self.paths(model, component) if _has_submodule(model, path)]
        return names

    def lora_targets_for(self, model: nn.Module, modules_to_save: list[str] | None) -> str:
        """`lora_targets`, leaving out the decoder layers that train in full (`modules_to_save`): PEFT cannot both
        copy a layer whole and adapt the linears inside it."""
        layers = [path for path in self.paths(model, "cross_attention")
                  if path.rsplit(".", 1)[-1].isdigit() and _suffix(path) in (modules_to_save or [])]
        if not layers:
            return self.lora_targets
        llm = self.components["language_model"][0].rsplit(".", 1)[-1]
        indices = "|".join(path.rsplit(".", 1)[-1] for path in layers)
        return rf".*{re.escape(llm)}\.layers\.(?!(?:{indices})\.)\d+\.(self_attn|mlp)\.{_PROJECTIONS}"

    def not_quantized(self, model_or_config=None) -> list[str]:
        """Module paths bitsandbytes leaves in full precision (`llm_int8_skip_modules`, matched from the start of a
        module's name): the vision side, cross-attention layers and the LM head; only the LLM's linears are
        quantized under QLoRA. `model_or_config` resolves config-dependent paths (Mllama's cross-attention
        layers)."""
        paths = [path for c in ("vision_towers", "projectors", "cross_attention")
                 for path in (self.paths(model_or_config, c) if model_or_config is not None else self.components.get(c, ()))]
        return [*paths, "lm_head"]

    def chat_template_for_training(self) -> str | None:
        """The family's training chat template (`training_chat_template`), read from `align/chat_templates/`."""
        if self.training_chat_template is None:
            return None
        return (Path(__file__).parent / "chat_templates" / self.training_chat_template).read_text()


def _suffix(path: str) -> str:
    """The name PEFT's `modules_to_save` matches `path` by: its last part, or for a numbered layer the path from the
    LLM on (`language_model.layers.3`: a bare `3` would match any module of that index)."""
    parts = path.split(".")
    return ".".join(parts[-3:]) if parts[-1].isdigit() else parts[-1]


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def _stock(name, model_types, vision, projector, llm, stop_tokens=(), image_inputs=("pixel_values",), cross=(), notes="",
           image_rows=True):
    return Family(
        name=name, model_types=model_types,
        components={"vision_towers": vision, "projectors": projector, "cross_attention": cross, "language_model": (llm,)},
        lora_targets=llm_lora_targets(llm.rsplit(".", 1)[-1]), stop_tokens=stop_tokens, image_inputs=image_inputs,
        notes=notes, image_rows=image_rows,
    )


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="vlm", model_types=("vlm_align",),
            components={c: (f"model.{c}",) for c in COMPONENTS if c != "lm_head"},
            lora_targets=llm_lora_targets("language_model"),
            notes="the suite's own VLM (model.VLMForConditionalGeneration): prepend or cross-attention fusion",
        ),
        _stock("llava", ("llava", "llava_next", "llava_onevision"), ("model.vision_tower",),
               ("model.multi_modal_projector",), "model.language_model",
               image_inputs=("pixel_values", "image_sizes")),
        _stock("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), ("model.visual",), ("model.visual.merger",),
               "model.language_model", stop_tokens=("<|im_end|>",), image_inputs=("pixel_values", "image_grid_thw"),
               image_rows=False),
        _stock("idefics3", ("idefics3", "smolvlm"), ("model.vision_model",), ("model.connector",), "model.text_model",
               stop_tokens=("<end_of_utterance>",), image_inputs=("pixel_values", "pixel_attention_mask")),
        _stock("gemma3", ("gemma3",), ("model.vision_tower",), ("model.multi_modal_projector",),
               "model.language_model", stop_tokens=("<end_of_turn>",), image_inputs=("pixel_values", "token_type_ids")),
        Family(
            name="mllama", model_types=("mllama",),
            components={"vision_towers": ("model.vision_model",), "projectors": ("model.multi_modal_projector",),
                        "language_model": ("model.language_model",)},
            config_components=lambda config: {"cross_attention": tuple(
                f"model.language_model.layers.{i}"
                for i in getattr(getattr(config, "text_config", config), "cross_attention_layers", None) or ()
            )},
            lora_targets=llm_lora_targets("language_model", blocks="self_attn|cross_attn|mlp"),
            stop_tokens=("<|eot_id|>",),
            image_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
            training_chat_template="mllama_training.jinja",
            notes="the cross-attention decoder layers (text_config.cross_attention_layers) train in full beside "
                  "LoRA, as the suite's cross-attention adapters do; LoRA adapts the self-attention layers",
        ),
    )
}
# Anything else: the commonest layout (a `language_model` under `model`, LLaVA-style names), with a warning.
GENERIC = _stock("generic", (), ("model.vision_tower", "model.vision_model", "model.visual"),
                 ("model.multi_modal_projector", "model.connector"), "model.language_model")


def known_family(model_or_config) -> Family | None:
    """The registry's `Family` of a model (or its config), by `config.model_type`; None for a type it does not
    know (a text LLM, or a VLM family without rules)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    return next((family for family in FAMILIES.values() if model_type in family.model_types), None)


def family_of(model_or_config) -> Family:
    """The `Family` of a model (or its config), by `config.model_type`; generic rules, with a warning, for a type
    the registry does not know."""
    family = known_family(model_or_config)
    if family is not None:
        return family
    model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    logger.warning(
        "no rules for model_type %r (known: %s): using generic ones (LoRA on `model.language_model.layers`, the "
        "projector or connector trained in full); check what trains in the log", model_type,
        ", ".join(t for f in FAMILIES.values() for t in f.model_types),
    )
    return GENERIC


def freeze_components(model: nn.Module, stage: str, family: Family | None = None) -> dict[str, dict]:
    """`model.stages.freeze_for_stage` for any family: the stage's components train, the others are frozen, in
    `COMPONENTS` order (so a projector nested in a tower follows its own setting). Returns what it set, as
    `{component: {"trainable": bool, "parameters": int}}` for the components the model has."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; supported: {sorted(STAGES)}")
    family = family or family_of(model)
    trainable = set(STAGES[stage])
    summary = {}
    for component in COMPONENTS:
        modules = family.modules(model, component)
        for module in modules:
            module.requires_grad_(component in trainable)
        if modules:
            summary[component] = {
                "trainable": component in trainable, "parameters": sum(p.numel() for m in modules for p in m.parameters()),
            }
    for component, entry in summary.items():
        logger.info("stage %s: %s %s (%s parameters)", stage, component,
                    "trainable" if entry["trainable"] else "frozen", f"{entry['parameters']:,}")
    return summary


__all__ = ["FAMILIES", "GENERIC", "Family", "family_of", "freeze_components", "known_family", "llm_lora_targets"]
