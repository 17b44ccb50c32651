"""Writing each format: the PEFT adapter (and its bare-LLM copy), the merged model, the native LLaVA checkpoint."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from align.loading import ADAPTER_CONFIG, load_pretrained
from model.llava import to_llava

from .source import (
    _VLM_LLM_PREFIX,
    ExportSource,
    _adapter_weights,
    _read_json,
)

logger = logging.getLogger(__name__)


def export_peft(source: ExportSource, processor, output_dir: Path) -> Path:
    """`output_dir/peft`: the adapter's weights and config (base: the absolute base folder) plus the processor."""
    from safetensors.torch import save_file

    target = output_dir / "peft"
    target.mkdir(parents=True, exist_ok=True)
    adapter_config = _read_json(source.path / ADAPTER_CONFIG)
    adapter_config["base_model_name_or_path"] = str(source.base)
    (target / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    weights = source.path / "adapter_model.safetensors"
    if weights.is_file():
        shutil.copyfile(weights, target / "adapter_model.safetensors")
    else:  # an adapter saved as adapter_model.bin
        save_file(_adapter_weights(source.path), str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(target)
    return target


def base_llm_of(vlm):
    """The VLM's LLM (base model + LM head) as the stock `*ForCausalLM` of its text config, sharing no tensors."""
    from transformers import AutoModelForCausalLM

    text_config = copy.deepcopy(vlm.config.text_config)
    causal_lm = AutoModelForCausalLM.from_config(text_config, dtype=vlm.lm_head.weight.dtype)
    prefix = causal_lm.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in vlm.model.language_model.state_dict().items()}
    head_name = next(n for n, m in causal_lm.named_modules() if m is causal_lm.get_output_embeddings())
    state[f"{head_name}.weight"] = vlm.lm_head.weight
    missing, unexpected = causal_lm.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == f"{head_name}.weight" and text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"the VLM's LLM does not map onto {type(causal_lm).__name__}: missing {missing}, unexpected {unexpected}")
    causal_lm.generation_config = copy.deepcopy(vlm.generation_config)
    return causal_lm.eval(), prefix


def export_peft_llm(source: ExportSource, processor, output_dir: Path) -> tuple[Path, Path]:
    """`output_dir/base-llm` (the base VLM's LLM as an `AutoModelForCausalLM` checkpoint + tokenizer) and
    `output_dir/peft-llm` (the adapter re-keyed to it: `model.language_model.layers...` -> `model.layers...`)."""
    from safetensors.torch import save_file

    import model  # noqa: F401

    base_vlm = load_pretrained(source.base, dtype=torch.float32)
    causal_lm, prefix = base_llm_of(base_vlm)
    base_dir, adapter_dir = output_dir / "base-llm", output_dir / "peft-llm"
    causal_lm.save_pretrained(base_dir)
    processor.tokenizer.save_pretrained(base_dir)
    del base_vlm

    weights = {}
    for key, value in _adapter_weights(source.path).items():
        if key.startswith(_VLM_LLM_PREFIX):
            key = f"base_model.model.{prefix}." + key[len(_VLM_LLM_PREFIX) :]
        weights[key] = value.contiguous()
    modules = sorted({
        key[len("base_model.model.") :].split(".lora_")[0] for key in weights if ".lora_" in key
    })
    adapter_config = _read_json(source.path / ADAPTER_CONFIG)
    adapter_config.update(
        base_model_name_or_path=str(base_dir.resolve()), target_modules=modules, exclude_modules=None,
        task_type="CAUSAL_LM",
    )
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    processor.tokenizer.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def export_merged(vlm, processor, output_dir: Path, dtype: str) -> Path:
    """`output_dir/merged`: the full VLM in `dtype` (converted in place), as safetensors, with its processor."""
    target = output_dir / "merged"
    vlm.to(getattr(torch, dtype)).save_pretrained(target)
    processor.save_pretrained(target)
    return target


def export_llava(vlm, processor, output_dir: Path, dtype: str) -> Path:
    """`output_dir/llava`: a native LLaVA checkpoint (model in `dtype` + `LlavaProcessor`)."""
    target = output_dir / "llava"
    llava, llava_processor = to_llava(vlm, processor)
    llava.to(getattr(torch, dtype)).save_pretrained(target)
    llava_processor.save_pretrained(target)
    return target
