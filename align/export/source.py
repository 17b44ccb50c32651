"""What an export starts from: the source folder (a full VLM or a LoRA/QLoRA adapter over its base), the formats it
allows, and the model loaded as trained and merged."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from align.families import FAMILIES, family_of
from align.loading import ADAPTER_CONFIG, adapter_base, load_pretrained, load_processor
from model.llava import llava_refusal as suite_llava_refusal

logger = logging.getLogger(__name__)

FORMATS = ("peft", "merged", "llava", "card")
DTYPES = ("float32", "bfloat16", "float16")
QLORA_MERGE_BASES = ("dequantized", "original")

@dataclass
class ExportSource:
    """A stage output to export.

    path: the folder (a full VLM, or a PEFT adapter).
    base: the adapter's base VLM folder (None for a full VLM).
    quantization: `BitsAndBytesConfig.to_dict()` of the base as the adapter was trained on it (QLoRA), else None.
    stage_config: the stage's `config.yaml` (empty when there is none).
    """

    path: Path
    base: Path | None = None
    quantization: dict | None = None
    stage_config: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def model_dir(self) -> Path:
        """The folder holding the VLM's `config.json` (the base for an adapter)."""
        return self.base if self.base is not None else self.path


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _quantization_of(stage_config: dict) -> dict | None:
    from trl import ModelConfig, get_quantization_config

    known = {f.name for f in fields(ModelConfig)}
    args = ModelConfig(**{k: v for k, v in stage_config.items() if k in known and k != "model_name_or_path"})
    quantization = get_quantization_config(args)
    if quantization is None:
        return None
    # Plain values (`quant_method` is an enum), so that the manifest is JSON and a subprocess can rebuild it.
    return {k: getattr(v, "value", v) for k, v in quantization.to_dict().items()}


def inspect_source(
    path: str | os.PathLike, base_model_name_or_path: str | None = None, base_load_in_4bit: bool | None = None
) -> ExportSource:
    """Describe a stage output: a full VLM folder or a PEFT adapter folder.

    Args:
        path: the folder.
        base_model_name_or_path: an adapter's base VLM (default: its `adapter_config.json`'s).
        base_load_in_4bit: whether the adapter was trained on a 4-bit base (QLoRA); default: as the stage's
            `config.yaml` says (`load_in_4bit`, `bnb_4bit_quant_type`, `use_bnb_nested_quant`, `dtype`).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: expected a stage output (a VLM or a LoRA adapter folder)")
    stage_config = _read_yaml(path / "config.yaml")
    adapter_config = _read_json(path / ADAPTER_CONFIG)
    if not adapter_config:
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)")
        return ExportSource(path=path, stage_config=stage_config)
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {adapter_config.get('peft_type')} adapter; only LoRA adapters are exported")
    base = adapter_base(path, base_model_name_or_path or adapter_config.get("base_model_name_or_path"))
    settings = dict(stage_config)
    if base_load_in_4bit is not None:
        settings["load_in_4bit"] = base_load_in_4bit
    if settings.get("load_in_8bit") and not settings.get("load_in_4bit"):
        raise ValueError(f"{path} was trained on an 8-bit base; only full-precision and 4-bit (QLoRA) bases are exported")
    return ExportSource(path=path, base=base, quantization=_quantization_of(settings), stage_config=stage_config)


def _stock_model_type(config) -> str | None:
    """The `model_type` of a stock checkpoint's config (LLaVA, Qwen2-VL, ...), None for the suite's own VLM."""
    return None if family_of(config) is FAMILIES["vlm"] else config.model_type


def llava_refusal(config) -> str | None:
    """Why a VLM config has no native LLaVA equivalent, or None when it has one (`model.llava.llava_refusal` for
    the suite's VLM; a stock checkpoint is in its own native format already)."""
    stock = _stock_model_type(config)
    if stock is not None:
        return f"the model is a stock {stock} checkpoint already: `merged/` is in its own native format"
    return suite_llava_refusal(config)


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    return load_peft_weights(str(path), device="cpu")


_VLM_LLM_PREFIX = "base_model.model.model.language_model."
_VLM_HEAD_PREFIX = "base_model.model.lm_head."


def peft_llm_refusal(source: ExportSource, config) -> str | None:
    """Why an adapter cannot be re-keyed to the bare LLM (`peft-llm/`), or None when it can."""
    if not source.is_adapter:
        return "the source is a full model, not an adapter"
    stock = _stock_model_type(config)
    if stock is not None:
        return f"re-keying an adapter to the bare LLM is done for the suite's own VLM only, not for {stock}"
    if config.ternary:
        return "the LLM has ternary (BitLinear) layers, which plain transformers does not build"
    adapter_config = _read_json(source.path / ADAPTER_CONFIG)
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(key):
            return f"the adapter uses a per-module {key}"
    if adapter_config.get("layers_to_transform") is not None or adapter_config.get("target_parameters"):
        return "the adapter selects layers or parameters by pattern"
    outside = sorted({
        key.split(".")[3] if key.startswith("base_model.model.model.") else key
        for key in _adapter_weights(source.path)
        if not key.startswith((_VLM_LLM_PREFIX, _VLM_HEAD_PREFIX))
    })
    if outside:
        return f"the adapter also trains parts outside the LLM ({', '.join(outside)})"
    return None


def available_formats(source: ExportSource, config=None) -> dict[str, str | None]:
    """Each format of `FORMATS` (plus "peft-llm") mapped to None when it applies to `source`, else to why not."""
    config = config if config is not None else _vlm_config(source.model_dir)
    return {
        "peft": None if source.is_adapter else "the source is a full model, not an adapter",
        "peft-llm": peft_llm_refusal(source, config),
        "merged": None,
        "llava": llava_refusal(config),
        "card": None,
    }


def _vlm_config(path: Path):
    from transformers import AutoConfig

    import model  # noqa: F401  (registers the VLM's config class)

    return AutoConfig.from_pretrained(str(path))


def parse_formats(value: str | list[str] | None) -> list[str] | None:
    """`"peft,merged"` (or a list) as a checked list of formats; None stays None (all that apply)."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"formats must be a comma-separated list out of {list(FORMATS)}, got {value!r}")
    return names


def resolve_formats(requested: list[str] | None, available: dict[str, str | None]) -> list[str]:
    """The formats to write: all that apply when `requested` is None; asked-for ones that do not apply are refused
    with the reason and the formats that do."""
    usable = [name for name in FORMATS if available[name] is None]
    if requested is None:
        return usable
    unknown = [name for name in requested if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; supported: {list(FORMATS)}")
    for name in requested:
        if available[name] is not None:
            label = "a native LLaVA checkpoint" if name == "llava" else f"the {name!r} format"
            raise ValueError(
                f"cannot export {label} for this model: {available[name]}. Formats available for this model: "
                f"{', '.join(usable)}"
            )
    return [name for name in FORMATS if name in requested]


# ---------------------------------------------------------------------------------------------------------------
# Loading the model as trained, and merged
# ---------------------------------------------------------------------------------------------------------------


def _bnb_config(quantization: dict | None):
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(dict(quantization))


def load_merged(source: ExportSource, qlora_base: str = "dequantized"):
    """The source as one plain full-precision VLM (float32): a full model as is, an adapter merged into its base.

    A QLoRA adapter was trained against the 4-bit weights: with `qlora_base="dequantized"` (default) the base is
    loaded in 4 bit as in training and dequantized before merging, so the merged model computes what the QLoRA
    model computed; `"original"` merges into the unquantized base weights instead.
    """
    from peft import PeftModel

    import model  # noqa: F401

    if qlora_base not in QLORA_MERGE_BASES:
        raise ValueError(f"qlora_base must be one of {QLORA_MERGE_BASES}, got {qlora_base!r}")
    if not source.is_adapter:
        return load_pretrained(source.path, dtype=torch.float32).eval()
    quantization = source.quantization if qlora_base == "dequantized" else None
    kwargs = {"dtype": torch.float32}
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization)
    base = load_pretrained(source.base, **kwargs)
    if quantization is not None:
        base = base.dequantize(dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(source.path)).merge_and_unload()
    return merged.to(torch.float32).eval()


def _processor(source: ExportSource):
    import model  # noqa: F401

    has_own = (source.path / "processor_config.json").is_file() or (source.path / "tokenizer_config.json").is_file()
    return load_processor(source.path if has_own else source.model_dir)
