"""Loading a VLM folder, whatever made it: the suite's own VLM, a stock checkpoint (`AutoModelForImageTextToText`:
LLaVA, Qwen2-VL, Idefics3/SmolVLM, Mllama, Gemma 3, ...), or a LoRA output of either.

transformers loads a checkpoint whose weights do not fit the class with a warning and random weights in their place;
an alignment run would then train and evaluate noise. Here that is an error naming the missing and unexpected keys.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.utils import PushToHubMixin, is_torchvision_available

from align.families import FAMILIES, family_of

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a PEFT adapter (a LoRA/QLoRA output) rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model folder of the adapter at `adapter_dir`: `base` if given, else its `adapter_config.json`'s
    `base_model_name_or_path`; as written (relative to the working directory, as training wrote it), else relative
    to the adapter folder's parents (a run folder moved with its base).

    Raises:
        ValueError: naming the adapter, when it names no base or the base is not a local model folder.
    """
    adapter_dir = Path(adapter_dir)
    if base is None:
        config = adapter_dir / ADAPTER_CONFIG
        base = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    if not base:
        raise ValueError(f"the adapter at {adapter_dir} names no base model (base_model_name_or_path)")
    for candidate in [Path(base)] + [parent / base for parent in adapter_dir.resolve().parents]:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise ValueError(
        f"the adapter at {adapter_dir} names the base model {str(base)!r}, which is not a local model folder; pass "
        "base_model_name_or_path"
    )


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
        config = AutoConfig.from_pretrained(path)
        family = family_of(config)
        if family is not FAMILIES["vlm"] and not getattr(quantization, "llm_int8_skip_modules", None):
            quantization.llm_int8_skip_modules = family.not_quantized(config)
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


def _has_processor(path: Path) -> bool:
    return (path / "processor_config.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_run(
    model_name_or_path: str | os.PathLike,
    base_model_name_or_path: str | os.PathLike | None = None,
    *,
    builder=None,
    dtype: str | torch.dtype | None = None,
    quantization_config=None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    merge: bool = False,
):
    """Load a run folder to use as it is (evaluate, sample, score): a whole model folder (the suite's VLM, a stock
    checkpoint, a reward model), or a PEFT adapter folder applied to its base: unmerged, or with `merge` merged
    into a full-precision base (PEFT's `merge_and_unload`), which generates faster. Weights that do not load are an
    error (`load_pretrained`). Training loads through `align.training.load_model`, which merges an adapter into its
    base first so that a new adapter can train on top.

    Args:
        model_name_or_path: a folder saved with `save_pretrained`, or an adapter folder (`adapter_config.json`).
        base_model_name_or_path: the base of an adapter (default: its `adapter_config.json`'s, `adapter_base`).
        builder: what loads the (base) folder with the load options; default `load_pretrained` (any VLM class),
            e.g. `align.reward.reward_model_from_folder`.
        dtype: load dtype (e.g. "bfloat16"; default as saved).
        quantization_config: e.g. a 4-bit `BitsAndBytesConfig` for a QLoRA adapter's base; only used when given.
        device: where the model goes (ignored for quantized models, which bitsandbytes places itself).
        attn_implementation: e.g. "sdpa", "eager" (default: transformers' choice).
        merge: merge an adapter into its base, unless the base is quantized (merging into 4-bit weights rounds
            them): the LoRA layers' extra matmuls and calls weigh on a small model's decoding step.

    Returns:
        `(model, processor)`: the model (a `PeftModel` for an unmerged adapter) in eval mode and its processor (the
        adapter folder's own when it has one, else the base's).
    """
    path = Path(model_name_or_path)
    if not path.is_dir():
        raise ValueError(f"model path {path} does not exist or is not a directory (models load by local path)")
    base_path, adapter_path = path, None
    if is_adapter_dir(path):
        adapter_path, base_path = path, adapter_base(path, base_model_name_or_path)
    options = {"dtype": dtype, "quantization_config": quantization_config, "attn_implementation": attn_implementation}
    model = (builder or load_pretrained)(base_path, **{k: v for k, v in options.items() if v is not None})
    if quantization_config is None and device is not None:
        model.to(device)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)
        merged = merge and quantization_config is None
        if merged:
            model = model.merge_and_unload()
        logger.info("applied the adapter at %s to its base at %s%s", adapter_path, base_path, " (merged)" if merged else "")
    processor_path = adapter_path if adapter_path is not None and _has_processor(adapter_path) else base_path
    return model.eval(), load_processor(processor_path)


class NoVideoProcessor(PushToHubMixin):
    """The video processor of a processor that has one (Qwen2-VL, Qwen2.5-VL), where torchvision is not installed.

    transformers 5 builds every video processor on torchvision and refuses to create such a processor without one,
    though image-text alignment never passes a video. This stand-in keeps the checkpoint's video settings (written
    back unchanged on save, so the folder still loads where torchvision is installed) and refuses videos by name.
    """

    _auto_class = None  # not a custom (remote-code) class: saved in processor_config.json like the stock one

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})

    def to_dict(self) -> dict:
        return dict(self.settings)

    def __call__(self, *args, **kwargs):
        raise ValueError("this processor was loaded without torchvision, which its video processor needs: "
                         "install torchvision to pass videos (images need nothing more)")


def without_torchvision(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` accepting a `NoVideoProcessor`: its type check of the video processor needs torchvision's
    classes. Same name and module, so that a saved processor names the stock class."""
    def check_argument_for_proper_class(self, argument_name, argument):
        if isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(processor_class.__name__, (processor_class,), {
        "__module__": processor_class.__module__, "check_argument_for_proper_class": check_argument_for_proper_class,
    })


def load_processor(path: str | os.PathLike) -> ProcessorMixin:
    """`AutoProcessor.from_pretrained(path)`; where torchvision is not installed and the folder's processor class
    has a video processor (Qwen2-VL and Qwen2.5-VL under transformers 5, whose video processors need torchvision),
    the same class built from the folder's image processor (its PIL backend), tokenizer and chat template, with
    `NoVideoProcessor` keeping the video settings."""
    path = Path(path)
    settings = _read_json(path / "processor_config.json")
    name = settings.pop("processor_class", None) or _read_json(path / "tokenizer_config.json").get("processor_class")
    processor_class = getattr(transformers, name or "", None)
    if (is_torchvision_available() or not isinstance(processor_class, type)
            or "video_processor" not in processor_class.get_attributes()):
        return AutoProcessor.from_pretrained(str(path))
    video = settings.pop("video_processor", None) or _read_json(path / "video_preprocessor_config.json")
    accepted = set(inspect.signature(processor_class.__init__).parameters) - set(processor_class.get_attributes())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = path / "chat_template.jinja"
    chat_template = (template.read_text() if template.is_file()
                     else _read_json(path / "chat_template.json").get("chat_template", tokenizer.chat_template))
    return without_torchvision(processor_class)(
        image_processor=AutoImageProcessor.from_pretrained(str(path)), tokenizer=tokenizer,
        video_processor=NoVideoProcessor(video), chat_template=chat_template,
        **{k: v for k, v in settings.items() if k in accepted and k != "chat_template"},
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = ["ADAPTER_CONFIG", "NoVideoProcessor", "adapter_base", "is_adapter_dir", "load_pretrained", "load_processor", "load_run", "without_torchvision"]
