"""Loading a VLM folder, whatever made it: the suite's own VLM, a stock checkpoint (`AutoModelForImageTextToText`:
LLaVA, Qwen2-VL, Idefics3/SmolVLM, Mllama, Gemma 3, ...), or a LoRA output of either.

transformers loads a checkpoint whose weights do not fit the class with a warning and random weights in their place;
an alignment run would then train and evaluate noise. Here that is an error naming the missing and unexpected keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from align.families import FAMILIES, family_of

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a PEFT adapter (a LoRA/QLoRA output) rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_pretrained(path: str | os.PathLike, model_class=AutoModelForImageTextToText, **kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained(path, **kwargs)`, refusing a checkpoint whose weights do not all load.

    Under QLoRA (`quantization_config` in `kwargs`) a stock VLM's vision side and LM head are kept out of 4-bit
    (`Family.not_quantized`); the suite's own VLM says so itself (`modules_not_to_quantize`). `model_class` may be
    another Auto class (`AutoModelForCausalLM` for a text teacher).

    Raises:
        ValueError: `path` is not a folder, or weights are missing from or unexpected in the checkpoint (listed).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model path {path} does not exist or is not a directory (models load by local path)")
    quantization = kwargs.get("quantization_config")
    if quantization is not None and model_class is AutoModelForImageTextToText:
        family = family_of(AutoConfig.from_pretrained(path))
        if family is not FAMILIES["vlm"] and not getattr(quantization, "llm_int8_skip_modules", None):
            quantization.llm_int8_skip_modules = family.not_quantized()
    model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
    if any(problems.values()):
        listed = "; ".join(
            f"{kind.replace('_', ' ')} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
            for kind, keys in problems.items() if keys
        )
        raise ValueError(
            f"the checkpoint at {path} does not fit {type(model).__name__} ({listed}); it would start from random "
            "weights there. Check that the folder holds the model you meant (and its config.json its class)"
        )
    return model


__all__ = ["ADAPTER_CONFIG", "is_adapter_dir", "load_pretrained"]
