"""Loading a built VLM for post-training (full, LoRA or QLoRA) and writing a run's outputs.

Shared by the SFT and DPO recipes. The trainers themselves are TRL's; this module adds what TRL's scripts
do not know about a VLM:

- `VLMModelConfig`: TRL's `ModelConfig` plus the training `stage` (what trains besides LoRA);
- `load_vlm`: a VLM directory (or a LoRA output, merged on load) in full precision or with its LLM in 4 bit;
- `lora_config`: LoRA on the LLM's attention and MLP projections only, plus the stage's small parts in full
  (`modules_to_save`), so the vision tower and the adapters are never LoRA-wrapped;
- `write_outputs`: model or adapter, processor, resolved config, `metrics.json` (TensorBoard logs are written by
  the trainer itself with `report_to: tensorboard`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import is_peft_model
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import PreTrainedModel
from trl import ModelConfig, get_peft_config, get_quantization_config

from align.families import FAMILIES, family_of, freeze_components
from align.loading import ADAPTER_CONFIG, adapter_base, is_adapter_dir, load_pretrained, load_processor
from align.runs import (
    EXTENDABLE_SETTINGS,
    checkpoint_is_complete,
    claim_output_dir,
    last_complete_checkpoint,
    resolved_config,
    save_metrics,
    save_resolved_config,
    staged_dir,
)
from model.stages import COMPONENTS, STAGES, freeze_for_stage  # `model` registers the VLM's Auto classes

logger = logging.getLogger(__name__)

# The suite VLM's LLM attention and MLP projections (Llama, Qwen2, Mistral, Gemma names); other families' targets are
# in `align.families`.
DEFAULT_LORA_TARGETS = FAMILIES["vlm"].lora_targets


@dataclass
class VLMModelConfig(ModelConfig):
    """TRL's `ModelConfig` plus what a VLM post-training run needs on top."""

    stage: str = field(
        default="finetune",
        metadata={
            "help": f"Which parts of the VLM train: one of {sorted(STAGES)}. Without --use_peft, the parts outside "
            "the stage are frozen (`freeze_for_stage`); with --use_peft, LoRA adapts the LLM and the stage's vision "
            "parts (projectors, cross-attention adapters, towers) train in full via `modules_to_save`, unless "
            "--lora_modules_to_save is given."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {sorted(STAGES)}")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError(
                "load_in_4bit/load_in_8bit train only through adapters: add --use_peft (QLoRA), or drop the "
                "quantization for full fine-tuning"
            )


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------


def setup_logging(training_args) -> None:
    """Log to stdout: this project's messages at INFO on the main process (WARNING on the others), the libraries
    at `--log_level` (their own default when "passive"), as TRL's scripts do."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    library_level = training_args.get_process_log_level()
    own_level = library_level if training_args.log_level != "passive" else logging.INFO
    for name in ("align", "model", "__main__"):
        logging.getLogger(name).setLevel(own_level if training_args.should_log else logging.WARNING)
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def check_launch(training_args) -> None:
    """Refuse processes that a launcher started together but that did not join one process group: on a machine
    without GPUs, `accelerate launch --multi_gpu`/`torchrun` start them, but without `--use_cpu true` each would
    train alone and all would write the same output_dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise ValueError(
            f"{launched} processes were launched but they did not form a process group; on CPUs add "
            "`--use_cpu true` (DDP over gloo), e.g. accelerate launch --config_file recipes/accelerate/ddp.yaml "
            "--num_processes 2 recipes/sft.py --config ... --use_cpu true"
        )


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def _component_of(name: str) -> str | None:
    """The VLM component a module name belongs to (PEFT prefixes and `modules_to_save` copies included)."""
    parts = name.split(".")
    return next((component for component in COMPONENTS if component in parts), None)


def linear_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Linear layers per component, split into bitsandbytes 4-bit (`Linear4bit`) and full precision.

    Returns:
        `{component: {"4bit": n, "full_precision": m}}` for the components that hold linears (plus `"8bit"` where
        there are `Linear8bitLt` layers).
    """
    import bitsandbytes as bnb

    counts: dict[str, Counter] = {}
    for name, module in model.named_modules():
        # LoRA's own linears and PEFT's frozen originals of `modules_to_save` copies are not the model's layers.
        if not isinstance(module, nn.Linear) or "lora_" in name or ".original_module." in name:
            continue
        component = _component_of(name) or "other"
        if isinstance(module, bnb.nn.Linear4bit):
            kind = "4bit"
        elif isinstance(module, bnb.nn.Linear8bitLt):
            kind = "8bit"
        else:
            kind = "full_precision"
        counts.setdefault(component, Counter())[kind] += 1
    return {
        component: {"4bit": c["4bit"], **({"8bit": c["8bit"]} if c["8bit"] else {}), "full_precision": c["full_precision"]}
        for component, c in counts.items()
    }


def _log_quantization(counts: dict[str, dict[str, int]], quantization) -> None:
    bits = "4bit" if quantization.load_in_4bit else "8bit"
    llm = counts.get("language_model", {})
    kept = {component: c["full_precision"] for component, c in counts.items() if c["full_precision"]}
    other = sum(c.get(bits, 0) for component, c in counts.items() if component != "language_model")
    kind = (
        f"{quantization.bnb_4bit_quant_type.upper()}{' with double quantization' if quantization.bnb_4bit_use_double_quant else ''}"
        if quantization.load_in_4bit
        else "8 bit"
    )
    logger.info(
        "QLoRA: %d linears of the LLM quantized to %s%s; %d kept in full precision (%s)",
        llm.get(bits, 0),
        kind,
        f", and {other} outside it" if other else "",
        sum(kept.values()),
        ", ".join(f"{component} {n}" for component, n in kept.items()),
    )


def _dtype(model_args: ModelConfig):
    if model_args.dtype in (None, "auto"):
        return model_args.dtype
    return getattr(torch, model_args.dtype)


def merged_base(path: str, **kwargs) -> Path:
    """A LoRA output (adapter + its base's path) merged into one plain VLM folder, `<path>/merged`, made once.

    A run that continues from a LoRA output (DPO after SFT) trains a new adapter on the merged weights; that
    adapter's `base_model_name_or_path` must be a folder holding those weights, not the first run's base (which
    lacks the first adapter) nor a temporary folder, so that later stages and evaluation load it correctly.
    """
    merged = Path(path) / "merged"
    adapter_file = Path(path) / ADAPTER_CONFIG
    done = merged / "config.json"
    with PartialState().main_process_first():
        if not done.is_file() or done.stat().st_mtime < adapter_file.stat().st_mtime:
            base_path = adapter_base(path)
            # PEFT initialises the adapter's layers at random before loading their weights: without a fork, a run
            # that merges here (the first stage to start from this output) would draw from the global RNG after its
            # `set_seed`, and its own new adapter would start from other weights than a rerun's, which finds the
            # merged folder made.
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                base = load_pretrained(base_path, **kwargs)
                model = PeftModel.from_pretrained(base, path).merge_and_unload()
            if PartialState().is_main_process:
                if merged.is_dir() and (not done.is_file() or done.stat().st_mtime < adapter_file.stat().st_mtime):
                    shutil.rmtree(merged)  # merged from an older adapter in this folder
                # Written aside and renamed into place: a kill, or another stage merging the same output at the
                # same moment (the demo's DPO and reward model both start from SFT), never leaves a half folder
                # that looks finished.
                with staged_dir(merged, shared=True) as staging:
                    model.save_pretrained(staging)
                    load_processor(path).save_pretrained(staging)
            logger.info("merged the LoRA adapter at %s into its base model %s: %s", path, base_path, merged)
    return merged


def load_model(path: str, model_args: ModelConfig, from_pretrained=None) -> PreTrainedModel:
    """Load a VLM for training.

    Args:
        path: a VLM directory (`python -m model.build`, a pretrain/SFT/DPO output), or the output of a LoRA run,
            whose adapter is merged into its base model on load.
        model_args: `dtype`, `attn_implementation` and the bitsandbytes flags (`--load_in_4bit`,
            `--bnb_4bit_quant_type`, `--use_bnb_nested_quant`). Quantization covers the LLM only: the towers,
            projectors, cross-attention adapters and LM head stay in full precision
            (`VLMForConditionalGeneration.modules_not_to_quantize`, or the family's rules for a stock checkpoint:
            `align.families`); the split is logged.
        from_pretrained: what builds the model from the (merged) folder and the load kwargs; default
            `align.loading.load_pretrained` (any VLM class; a checkpoint whose weights do not load is an error),
            e.g. `VLMForRewardModeling.from_vlm` for a reward model.
    """
    if not Path(path).is_dir():
        raise ValueError(f"model path {path!r} is not a directory; build a VLM first (python -m model.build ...)")
    quantization = get_quantization_config(model_args)
    kwargs = {"dtype": _dtype(model_args)}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if is_adapter_dir(path):
        path = str(merged_base(path, **kwargs))
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = (from_pretrained or load_pretrained)(path, **kwargs)
    if quantization is not None:
        _log_quantization(linear_counts(model), quantization)
    return model


def load_vlm(path: str, model_args: ModelConfig) -> tuple[PreTrainedModel, transformers.ProcessorMixin]:
    """`load_model` plus the processor saved with the model (a LoRA output keeps its processor too), with the
    family's training chat template where TRL has none for its stock one (`use_training_chat_template`)."""
    model = load_model(path, model_args)
    processor = load_processor(path)
    use_training_chat_template(processor, model)
    return model, processor


def _trl_patches(processor, get_training_chat_template) -> bool:
    """Whether TRL has a training version of the processor's chat template (it raises ValueError when not)."""
    try:
        get_training_chat_template(processor)
    except ValueError:
        return False
    return True


def use_training_chat_template(processor, model) -> None:
    """Give `processor` its family's chat template with `{% generation %}` markers (`Family.training_chat_template`,
    Mllama's) when its own has none and TRL has no training version of it.

    TRL's assistant-only loss needs those markers, and TRL patches only the templates it knows (Qwen2.5-VL,
    SmolVLM/Idefics3, LLaVA-NeXT, Gemma 3, ...): for Llama 3.2 Vision it raises. The family's template renders the
    same conversation text (the markers print nothing), so the processor saved with the run keeps working for
    generation in plain transformers.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = family_of(model).chat_template_for_training()
    current = getattr(processor, "chat_template", None)
    if template is None or not isinstance(current, str) or has_generation_markers(current):
        return
    if _trl_patches(processor, get_training_chat_template):
        return
    processor.chat_template = template
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.chat_template = template
    logger.info("chat template: the %s training template (with assistant markers for the loss), as TRL has none",
                family_of(model).name)


def load_reference(path: str, model_args: ModelConfig) -> PreTrainedModel:
    """A frozen reference model (eval mode, no gradients), loaded like the policy (`load_model`)."""
    return load_model(path, model_args).eval().requires_grad_(False)


def lora_config(model_args: ModelConfig, model: PreTrainedModel) -> LoraConfig | None:
    """TRL's LoRA config from the `--use_peft`/`--lora_*` flags, with the VLM's defaults filled in (into
    `model_args` too, so that the saved config says what was used).

    Defaults, from the model's family (`align.families`): `lora_target_modules` = the LLM's attention and MLP
    projections (`DEFAULT_LORA_TARGETS` for the suite's VLM) and `lora_modules_to_save` = the stage's parts that
    LoRA does not adapt and that the model has (the suite's `projectors` and, for cross-attention fusion,
    `cross_attention` in stage `finetune`; a stock model's projector, merger or connector). Returns None without
    `--use_peft`.
    """
    if not model_args.use_peft:
        return None
    family = family_of(model)
    if model_args.lora_modules_to_save is None:
        stage = getattr(model_args, "stage", "finetune")
        model_args.lora_modules_to_save = family.trained_in_full_under_lora(stage, model) or None
    if model_args.lora_target_modules is None:
        model_args.lora_target_modules = family.lora_targets_for(model, model_args.lora_modules_to_save)
    # PEFT reads a string as one regex and a list as module-name suffixes; TRL hands it over as given.
    return get_peft_config(model_args)


def prepare_for_training(model: PreTrainedModel, model_args: ModelConfig) -> LoraConfig | None:
    """Decide what trains: the LoRA config for the trainer to apply (`--use_peft`), or, for full fine-tuning, the
    stage's components unfrozen and the rest frozen (`freeze_for_stage`; for a stock model its family's parts,
    `align.families.freeze_components`). Returns the LoRA config or None."""
    peft_config = lora_config(model_args, model)
    if peft_config is None:
        stage = getattr(model_args, "stage", "finetune")
        family = family_of(model)
        if family is FAMILIES["vlm"]:
            freeze_for_stage(model, stage)
        else:
            freeze_components(model, stage, family)
    else:
        targets = peft_config.target_modules
        logger.info(
            "LoRA r=%d alpha=%d on %s; trained in full: %s",
            peft_config.r, peft_config.lora_alpha, targets if isinstance(targets, str) else sorted(targets),
            ", ".join(sorted(peft_config.modules_to_save or [])) or "nothing else",
        )
    return peft_config


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (each shared tensor once)."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        # A bitsandbytes 4-bit weight packs two values per byte.
        count = parameter.numel() * (2 if parameter.dtype == torch.uint8 else 1)
        total += count
        trainable += count if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total}


def load_trained(path: str | os.PathLike, dtype=None) -> PreTrainedModel:
    """Load a run's output as a plain VLM: a full model as is, a LoRA output merged into its base."""
    path = str(path)
    if is_adapter_dir(path):
        path = str(merged_base(path, dtype=dtype))
    return load_pretrained(path, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and outputs
# ---------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint a training run continues from, `--resume_from_checkpoint`:

    - unset: the newest checkpoint in `output_dir` that was written whole, if any, so that rerunning a killed
      command continues it (`align.runs.last_complete_checkpoint`; one cut short by the kill is deleted);
    - "last"/"true": the same, but there must be one;
    - "false"/"none": none (train from the start);
    - a checkpoint folder: that one.
    """
    if value is not None and str(value).lower() in ("", "false", "none"):
        return None
    if value is None or str(value).lower() in ("last", "true"):
        checkpoint = last_complete_checkpoint(output_dir, remove_incomplete=PartialState().is_main_process)
        if checkpoint is None and value is not None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir}")
        if checkpoint is not None and value is None:
            logger.info("continuing from %s, the newest complete checkpoint in %s (--resume_from_checkpoint false "
                        "trains from the start)", checkpoint, output_dir)
        return checkpoint
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder")
    if not checkpoint_is_complete(value):
        raise ValueError(f"--resume_from_checkpoint {value!r} was not written whole (no readable trainer_state.json)")
    return value


def start_run(training_args, *configs, force: bool = False) -> str | None:
    """Make `training_args.output_dir` this run's and return the checkpoint to continue from.

    The run's settings (the resolved `configs`) are recorded in the folder; a rerun with the same settings
    continues (from the newest complete checkpoint: `resolve_checkpoint`), one with other settings is refused naming
    them, unless `force` (the folder is emptied first). With an explicit `--resume_from_checkpoint`, `max_steps` and
    `num_train_epochs` may grow (`align.runs.claim_output_dir`).
    """
    value = training_args.resume_from_checkpoint
    explicit = value is not None and str(value).lower() not in ("", "false", "none")  # continuing, and said so
    with training_args.main_process_first(desc="claiming the output folder"):
        claim_output_dir(
            training_args.output_dir, resolved_config(*configs), force=force,
            allowed=EXTENDABLE_SETTINGS if explicit else set(), main_process=training_args.process_index == 0,
        )
        return resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)


def write_outputs(trainer, processor, configs: tuple, metrics: dict, header: str | None = None) -> None:
    """Save the model (or LoRA adapter) and processor, `config.yaml` (the resolved `configs`, re-runnable with
    `--config`) and `metrics.json` into the run's `output_dir`; `metrics.json` last, whole (`align.runs`): it marks
    the run finished, so a kill before it leaves a run that a rerun completes."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(output_dir)
        save_resolved_config(Path(output_dir) / "config.yaml", *configs, header=header)
        save_metrics(Path(output_dir) / "metrics.json", metrics)
    trainer.accelerator.wait_for_everyone()
    saved = "LoRA adapter" if is_peft_model(trainer.model) else "model"
    logger.info("wrote the %s, processor, config.yaml and metrics.json to %s", saved, output_dir)


def run_metrics(trainer, train_result, rows: int, rejects: dict[str, int], extra: dict | None = None) -> dict:
    """`metrics.json`: the trainer's train metrics, the logged losses and the counts of the run."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    metrics = {
        "train": dict(train_result.metrics),
        "global_step": trainer.state.global_step,
        "loss": {"first": losses[0][1] if losses else None, "last": losses[-1][1] if losses else None, "history": losses},
        "rows": {"train": rows, "rejected": sum(rejects.values()), "rejected_by_reason": rejects},
        "parameters": parameter_counts(model),
        "linears": linear_counts(model),
    }
    metrics.update(extra or {})
    return metrics


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "VLMModelConfig",
    "check_launch",
    "linear_counts",
    "load_model",
    "load_reference",
    "load_trained",
    "load_vlm",
    "lora_config",
    "parameter_counts",
    "prepare_for_training",
    "resolve_checkpoint",
    "run_metrics",
    "setup_logging",
    "start_run",
    "write_outputs",
]
