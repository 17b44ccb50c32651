"""Export a stage's output (a full VLM folder or a LoRA/QLoRA adapter folder) in formats other tools load.

- `peft/`: the adapter in standard PEFT format (`adapter_config.json` + `adapter_model.safetensors`) for
  `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), "peft")` (after `import model`);
  when the adapter touches only the LLM, also `peft-llm/` re-keyed to the bare causal LM, with that LLM saved as
  `base-llm/` (plain transformers + PEFT, no project code);
- `merged/`: the adapter merged into a full VLM (a QLoRA base dequantized first), in safetensors, with its processor;
- `llava/`: a native `LlavaForConditionalGeneration` + `LlavaProcessor` checkpoint (prepend fusion, MLP projector,
  one encoder, no pooling), loadable by plain transformers;
- `README.md`: a model card (parts, fusion, the stages that produced the model, the evaluation table).

Every export lists the SHA-256 of its files in `checksums.json`; `verify_export` re-checks them and reloads every
format in fresh processes, comparing logits and greedy generations on a fixed batch with the source model.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from align.families import FAMILIES, family_of
from align.loading import load_pretrained, load_processor
from align.runs import SETTINGS_FILE, atomic_write_text

logger = logging.getLogger(__name__)

FORMATS = ("peft", "merged", "llava", "card")
DTYPES = ("float32", "bfloat16", "float16")
CHECKSUMS_FILE = "checksums.json"
MANIFEST_FILE = "export.json"
VERIFICATION_FILE = "verification.json"
# Written after the checksums (or being them): not covered by them.
_UNCHECKED = {CHECKSUMS_FILE, VERIFICATION_FILE, SETTINGS_FILE}  # the run's bookkeeping, not the export
QLORA_MERGE_BASES = ("dequantized", "original")
_EXPORT_FOLDERS = ("peft", "peft-llm", "base-llm", "merged", "llava")

# Largest max |logit difference| to the source model that verification accepts, per kind of reload and dtype.
# An adapter reloaded on the same base runs the same operations: equal up to summation order at most (absolute).
# Merging adds B @ A into W once (a different rounding than x @ A^T @ B^T), and a LLaVA checkpoint holds the merged
# weights; half-precision exports round every weight to 8 (bfloat16) or 11 (float16) significant bits. Rounding
# errors grow with the logits, so the "merged" tolerances are relative: times max(1, largest |logit| of the source).
TOLERANCES = {
    "adapter": {"float32": 1e-6},
    "merged": {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2},
}


# ---------------------------------------------------------------------------------------------------------------
# What the source folder holds
# ---------------------------------------------------------------------------------------------------------------


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


def _resolve_base(adapter_dir: Path, base: str | None) -> Path:
    """An adapter's base folder: as written (relative to the working directory, as training wrote it), else
    relative to the adapter folder's parents."""
    if not base:
        raise ValueError(f"the adapter at {adapter_dir} names no base model (base_model_name_or_path)")
    candidates = [Path(base)] + [parent / base for parent in adapter_dir.resolve().parents]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise ValueError(
        f"the adapter at {adapter_dir} names the base model {base!r}, which is not a local model folder; pass "
        "base_model_name_or_path"
    )


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
    adapter_config = _read_json(path / "adapter_config.json")
    if not adapter_config:
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json)")
        return ExportSource(path=path, stage_config=stage_config)
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {adapter_config.get('peft_type')} adapter; only LoRA adapters are exported")
    base = _resolve_base(path, base_model_name_or_path or adapter_config.get("base_model_name_or_path"))
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
    """Why a VLM config has no native LLaVA equivalent, or None when it has one."""
    stock = _stock_model_type(config)
    if stock is not None:
        return f"the model is a stock {stock} checkpoint already: `merged/` is in its own native format"
    reasons = []
    if config.fusion != "prepend":
        reasons.append(f"{config.fusion} fusion (LLaVA prepends the visual tokens)")
    if config.projector != "mlp":
        reasons.append(f"the {config.projector} projector (LLaVA's is Linear-GELU-Linear)")
    if len(config.vision_configs) != 1:
        reasons.append(f"{len(config.vision_configs)} vision encoders (LLaVA has one)")
    if config.pool != 1:
        reasons.append(f"pool={config.pool} (LLaVA does not pool the patch grid)")
    if config.ternary:
        reasons.append("ternary (BitLinear) LLM layers")
    return "; ".join(reasons) or None


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
    adapter_config = _read_json(source.path / "adapter_config.json")
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


# ---------------------------------------------------------------------------------------------------------------
# Writing each format
# ---------------------------------------------------------------------------------------------------------------


def export_peft(source: ExportSource, processor, output_dir: Path) -> Path:
    """`output_dir/peft`: the adapter's weights and config (base: the absolute base folder) plus the processor."""
    from safetensors.torch import save_file

    target = output_dir / "peft"
    target.mkdir(parents=True, exist_ok=True)
    adapter_config = _read_json(source.path / "adapter_config.json")
    adapter_config["base_model_name_or_path"] = str(source.base)
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
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
    adapter_config = _read_json(source.path / "adapter_config.json")
    adapter_config.update(
        base_model_name_or_path=str(base_dir.resolve()), target_modules=modules, exclude_modules=None,
        task_type="CAUSAL_LM",
    )
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    processor.tokenizer.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def export_merged(vlm, processor, output_dir: Path, dtype: str) -> Path:
    """`output_dir/merged`: the full VLM in `dtype` (converted in place), as safetensors, with its processor."""
    target = output_dir / "merged"
    vlm.to(getattr(torch, dtype)).save_pretrained(target)
    processor.save_pretrained(target)
    return target


def _tower_has_cls(tower, vision_config) -> bool:
    from model.configuration_vlm import _grid_side

    size = vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    probe = torch.zeros(1, getattr(vision_config, "num_channels", 3), height, width, dtype=tower.dtype)
    with torch.no_grad():
        tokens = tower(probe, return_dict=True).last_hidden_state.shape[1]
    grid = _grid_side(vision_config)
    if tokens not in (grid * grid, grid * grid + 1):
        raise ValueError(
            f"cannot export a native LLaVA checkpoint: the {vision_config.model_type} tower returns {tokens} tokens "
            f"for a {grid}x{grid} patch grid (LLaVA keeps all of them or drops one CLS token)"
        )
    return tokens == grid * grid + 1


def to_llava(vlm, processor):
    """The VLM as `(LlavaForConditionalGeneration, LlavaProcessor)` computing the same logits.

    LLaVA reads `hidden_states[vision_feature_layer]` of its tower, and for SigLIP and CLIP `hidden_states[-1]` is
    taken before the final layer norm, while this project's layer -1 is the tower's `last_hidden_state` (SigLIP's
    includes `post_layernorm`). transformers' `tie_last_hidden_states` config flag makes `hidden_states[-1]` the
    `last_hidden_state`, so it is set on the tower config exactly when the VLM uses layer -1.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = vlm.config
    refusal = llava_refusal(config)
    if refusal is not None:
        raise ValueError(f"cannot export a native LLaVA checkpoint: {refusal}")
    tower = vlm.model.vision_towers[0]
    vision_config = copy.deepcopy(tower.config)
    has_cls = _tower_has_cls(tower, vision_config)
    vision_config.tie_last_hidden_states = config.vision_feature_layer == -1
    strategy = "default" if has_cls else "full"
    llava_config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=copy.deepcopy(config.text_config).to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(llava_config).to(vlm.lm_head.weight.dtype)
    renames = {
        "model.vision_towers.0.": "model.vision_tower.",
        "model.projectors.0.": "model.multi_modal_projector.",
    }
    state = {}
    source = vlm.state_dict()
    # LLaVA's projector has no input standardisation: fold ours into its first linear layer, exactly
    # (W((x - m) / s) + b = (W / s) x + (b - W (m / s))); average pooling is refused above, so the order is free.
    stats = vlm.model.projectors.feature_statistics(0)
    for key in [k for k in source if k.startswith("model.projectors.feature_")]:
        del source[key]
    if stats is not None and stats[2] > 0:
        mean, std = stats[0].double(), stats[1].double()
        weight = source["model.projectors.0.linear_1.weight"].double()
        source["model.projectors.0.linear_1.bias"] = (
            source["model.projectors.0.linear_1.bias"].double() - weight @ (mean / std)
        ).to(vlm.lm_head.weight.dtype)
        source["model.projectors.0.linear_1.weight"] = (weight / std).to(vlm.lm_head.weight.dtype)
    for key, value in source.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        state[key] = value.detach().clone()
    missing, unexpected = llava.load_state_dict(state, strict=False)
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    missing = [k for k in missing if k != tied]
    if missing or unexpected:
        raise ValueError(f"the VLM's weights do not map onto LLaVA: missing {missing}, unexpected {unexpected}")
    llava.generation_config = copy.deepcopy(vlm.generation_config)
    llava_processor = LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0],
        vision_feature_select_strategy=strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=1 if has_cls else 0,
    )
    return llava.eval(), llava_processor


def export_llava(vlm, processor, output_dir: Path, dtype: str) -> Path:
    """`output_dir/llava`: a native LLaVA checkpoint (model in `dtype` + `LlavaProcessor`)."""
    target = output_dir / "llava"
    llava, llava_processor = to_llava(vlm, processor)
    llava.to(getattr(torch, dtype)).save_pretrained(target)
    llava_processor.save_pretrained(target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------

# Settings worth a line in the card's stage table, when the stage's config.yaml has them.
_CARD_SETTINGS = (
    "stage", "use_peft", "lora_r", "lora_alpha", "load_in_4bit", "learning_rate", "max_steps",
    "per_device_train_batch_size", "beta", "loss_type",
)


def stage_chain(path: str | os.PathLike) -> list[dict]:
    """The stages that produced a model, earliest first: each `{"path", "kind", "config", "metrics", "note"}`.

    Followed backwards from `path` while the folders exist: to the input model its `config.yaml` names
    (`model_name_or_path`), else to an adapter's base (a `<stage>/merged` folder is that stage's output). `note` says
    when an adapter's base is not the stage's declared input (nor that input's `merged/`): the adapter is then
    applied to other weights than the stage started from.
    """
    chain, seen = [], set()
    current = Path(path)
    while current is not None and current.is_dir() and current.resolve() not in seen:
        if current.name == "merged" and (current.parent / "adapter_config.json").is_file():
            current = current.parent
            continue
        seen.add(current.resolve())
        adapter = _read_json(current / "adapter_config.json")
        config = _read_yaml(current / "config.yaml")
        base = None
        if adapter:
            try:
                base = _resolve_base(current, adapter.get("base_model_name_or_path"))
            except ValueError:
                base = None
        declared = Path(config["model_name_or_path"]) if config.get("model_name_or_path") else None
        declared = declared if declared is not None and declared.is_dir() else None
        note = None
        if base is not None and declared is not None and base not in (declared.resolve(), (declared / "merged").resolve()):
            note = (
                f"`{current}`: the adapter's base is `{base}`, but the stage's config.yaml names `{declared}` as its "
                "input model"
            )
        chain.append({
            "path": str(current),
            "kind": "LoRA adapter" if adapter else "full model",
            "config": config,
            "metrics": _read_json(current / "metrics.json"),
            "note": note,
        })
        current = declared if declared is not None else base
    return list(reversed(chain))


def _stage_row(entry: dict) -> str:
    config, metrics = entry["config"], entry["metrics"]
    shown = [k for k in _CARD_SETTINGS if config.get(k) not in (None, False)]
    if not config.get("use_peft"):  # TRL's ModelConfig records LoRA defaults for full fine-tuning runs too
        shown = [k for k in shown if not k.startswith("lora_")]
    settings = ", ".join(f"{k}={config[k]}" for k in shown)
    if not config:
        settings = "built from parts (no config.yaml)"
    loss = metrics.get("loss", {}) if isinstance(metrics.get("loss"), dict) else {}
    losses = (
        f"{loss['first']:.3f} → {loss['last']:.3f}"
        if isinstance(loss.get("first"), (int, float)) and isinstance(loss.get("last"), (int, float))
        else "–"
    )
    steps = metrics.get("global_step", "–")
    return f"| `{entry['path']}` | {entry['kind']} | {settings} | {steps} | {losses} |"


def model_card(
    source: ExportSource, config, written: dict[str, str], skipped: dict[str, str], eval_metrics: dict | None,
    dtype: str,
) -> str:
    """The export's README.md."""
    from align.evaluation import category_table

    stock = _stock_model_type(config)
    if stock is None:
        vision_configs = config.vision_configs
        architecture = (f"- fusion: {config.fusion}; projector: {config.projector}; pool: {config.pool}; "
                        f"vision feature layer: {config.vision_feature_layer}; {config.num_image_tokens} image "
                        "token(s) per image")
    else:
        vision_configs = [config.vision_config]
        architecture = f"- a stock `{stock}` checkpoint ({', '.join(config.architectures or [])}), family `{family_of(config).name}`"
    towers = ", ".join(
        f"{c.model_type} ({getattr(c, 'hidden_size', '?')} wide, {getattr(c, 'image_size', '?')}px, "
        f"patch {getattr(c, 'patch_size', '?')})" for c in vision_configs
    )
    text = config.text_config
    lines = [
        f"# {source.path.name} (exported)",
        "",
        f"Exported from `{source.path}`" + (f", a LoRA adapter on `{source.base}`" if source.is_adapter else "")
        + (" trained on a 4-bit base (QLoRA)" if source.quantization else "") + ".",
        "",
        "## Model",
        "",
        f"- vision: {towers}",
        f"- language model: {text.model_type} ({getattr(text, 'num_hidden_layers', '?')} layers, "
        f"{text.hidden_size} wide, vocabulary {text.vocab_size})",
        architecture,
        "",
        "## Files",
        "",
    ]
    after_import = "" if stock else " after `import model`"  # a stock checkpoint loads with plain transformers
    usage = {
        "peft": "`PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), \"peft\")`"
        + after_import + (" (the adapter was trained on the 4-bit base: load the base with the same "
                            "BitsAndBytesConfig to reproduce it exactly)" if source.quantization else ""),
        "peft-llm": "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"base-llm\"), \"peft-llm\")`: "
        "the adapter on the bare LLM (text only), plain transformers + PEFT"
        + (" (load `base-llm` with the same 4-bit BitsAndBytesConfig to reproduce the QLoRA model)" if source.quantization else ""),
        "merged": f"`AutoModelForImageTextToText.from_pretrained(\"merged\")`{after_import} ({dtype})",
        "llava": f"`LlavaForConditionalGeneration.from_pretrained(\"llava\")` + `AutoProcessor`, plain transformers "
        f"({dtype})",
    }
    for name, folder in written.items():
        if name in usage:
            lines.append(f"- `{folder}/`: {usage[name]}")
    for name, reason in skipped.items():
        lines.append(f"- no `{name}`: {reason}")
    lines += [
        f"- `{CHECKSUMS_FILE}`: SHA-256 of every file; `python recipes/export.py --verify` re-checks them and "
        "reloads each format in a fresh process, comparing logits and greedy generations with the source model.",
        "",
        "## Stages",
        "",
        "| folder | kind | settings | steps | loss first → last |",
        "|---|---|---|---:|---|",
    ]
    chain = stage_chain(source.path)
    lines += [_stage_row(entry) for entry in chain]
    notes = [entry["note"] for entry in chain if entry["note"]]
    if notes:
        lines += [""] + [f"**Note:** {note}." for note in notes]
    for entry in chain:
        if entry["config"]:
            lines += [
                "", f"<details><summary>{entry['path']}/config.yaml</summary>", "", "```yaml",
                yaml.safe_dump(entry["config"], sort_keys=False).rstrip(), "```", "", "</details>",
            ]
    lines += ["", "## Evaluation", ""]
    if eval_metrics:
        lines += [category_table(eval_metrics)]
    else:
        lines += ["No evaluation found (`eval/metrics.json` in the stage folder, or `--eval_metrics FILE`)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export_files(output_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(output_dir).as_posix()
        for p in output_dir.rglob("*")
        if p.is_file() and p.relative_to(output_dir).as_posix() not in _UNCHECKED
    )


def write_checksums(output_dir: str | os.PathLike) -> dict[str, str]:
    """Write `checksums.json`: the SHA-256 of every file of the export (relative path -> hex digest)."""
    output_dir = Path(output_dir)
    sums = {name: _sha256(output_dir / name) for name in _export_files(output_dir)}
    atomic_write_text(output_dir / CHECKSUMS_FILE, json.dumps(sums, indent=2) + "\n")
    return sums


def check_checksums(output_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Compare the export's files with `checksums.json`: `{"modified": [...], "missing": [...], "unlisted": [...]}`
    (all empty when intact)."""
    output_dir = Path(output_dir)
    path = output_dir / CHECKSUMS_FILE
    if not path.is_file():
        raise ValueError(f"{output_dir} has no {CHECKSUMS_FILE}: not an export, or an interrupted one")
    recorded = json.loads(path.read_text())
    present = set(_export_files(output_dir))
    return {
        "modified": sorted(n for n in recorded if n in present and _sha256(output_dir / n) != recorded[n]),
        "missing": sorted(n for n in recorded if n not in present),
        "unlisted": sorted(present - set(recorded)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def export(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    formats: list[str] | None = None,
    dtype: str = "float32",
    base_model_name_or_path: str | None = None,
    base_load_in_4bit: bool | None = None,
    qlora_base: str = "dequantized",
    eval_metrics: str | os.PathLike | None = None,
) -> dict:
    """Export a stage output; returns the manifest also written to `output_dir/export.json`.

    Args:
        path: the stage output (a VLM folder or a LoRA/QLoRA adapter folder).
        output_dir: where the formats go (one subfolder each, plus README.md, export.json, checksums.json).
        formats: some of `FORMATS` (default: all that apply; asking for one that does not apply is an error naming
            those that do). "peft" also writes `peft-llm/` + `base-llm/` when the adapter touches only the LLM.
        dtype: dtype of the merged and LLaVA weights ("float32", "bfloat16", "float16").
        base_model_name_or_path, base_load_in_4bit: see `inspect_source`.
        qlora_base: "dequantized" or "original", see `load_merged`.
        eval_metrics: an evaluation's metrics.json (default: `<path>/eval/metrics.json` when present).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    source = inspect_source(path, base_model_name_or_path, base_load_in_4bit)
    config = _vlm_config(source.model_dir)
    available = available_formats(source, config)
    chosen = resolve_formats(formats, available)
    # Asked-for formats that do not apply were refused above; by default, say which ones were left out and why.
    skipped = {name: reason for name, reason in available.items() if reason is not None and formats is None}
    if "peft" in chosen and available["peft-llm"] is not None:
        skipped["peft-llm"] = available["peft-llm"]
    for name, reason in skipped.items():
        logger.info("no %s export: %s", name, reason)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # A previous export into the same folder must not leave formats this one does not list; its checksums go
    # first, so that a kill from here on leaves a folder that reads as unfinished.
    for stale in (CHECKSUMS_FILE, VERIFICATION_FILE, MANIFEST_FILE, "README.md"):
        (output_dir / stale).unlink(missing_ok=True)
    for stale in _EXPORT_FOLDERS:
        shutil.rmtree(output_dir / stale, ignore_errors=True)
    processor = _processor(source)
    written: dict[str, str] = {}
    manifest = {
        "source": str(source.path.resolve()),
        "base": str(source.base) if source.base else None,
        "quantization": source.quantization,
        "dtype": dtype,
        "qlora_base": qlora_base if source.quantization else None,
        "formats": {},
    }
    if "peft" in chosen:
        export_peft(source, processor, output_dir)
        written["peft"] = "peft"
        manifest["formats"]["peft"] = {"kind": "peft-vlm", "path": "peft", "base": str(source.base)}
        if available["peft-llm"] is None:
            export_peft_llm(source, processor, output_dir)
            written["peft-llm"] = "peft-llm"
            manifest["formats"]["peft-llm"] = {"kind": "peft-llm", "path": "peft-llm", "base": "base-llm"}
        logger.info("wrote the PEFT adapter%s", " and its bare-LLM copy" if "peft-llm" in written else "")
    if "merged" in chosen or "llava" in chosen:
        vlm = load_merged(source, qlora_base)
        if "llava" in chosen:
            export_llava(vlm, processor, output_dir, dtype)
            written["llava"] = "llava"
            manifest["formats"]["llava"] = {"kind": "llava", "path": "llava"}
            logger.info("wrote the native LLaVA checkpoint (%s)", dtype)
        if "merged" in chosen:
            export_merged(vlm, processor, output_dir, dtype)
            written["merged"] = "merged"
            manifest["formats"]["merged"] = {"kind": "vlm", "path": "merged"}
            logger.info("wrote the merged model (%s)", dtype)
        del vlm
    manifest["skipped"] = skipped
    if "card" in chosen:
        metrics_path = Path(eval_metrics) if eval_metrics else source.path / "eval" / "metrics.json"
        if eval_metrics and not metrics_path.is_file():
            raise ValueError(f"--eval_metrics {metrics_path} does not exist")
        card = model_card(source, config, written, skipped, _read_json(metrics_path) or None, dtype)
        atomic_write_text(output_dir / "README.md", card)
        written["card"] = "README.md"
    manifest["written"] = written
    atomic_write_text(output_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    write_checksums(output_dir)  # last: an export without its checksums.json was cut short (a rerun redoes it)
    logger.info("exported %s to %s (%s)", ", ".join(written), output_dir, CHECKSUMS_FILE)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Verification: reload in fresh processes, compare with the source
# ---------------------------------------------------------------------------------------------------------------

# The two functions below run in the verification subprocesses too (their source is sent there), so they import
# only torch, PIL, transformers and PEFT; a VLM format needs `import model` done before `load_for_probe`.


def load_for_probe(spec: dict):
    """Load one exported format (or the source) for `probe_model`: `(model, processor_or_tokenizer)`.

    spec: `kind` ("vlm", "peft-vlm", "peft-llm", "llava"), `path`, `base` (adapters), `dtype`, `quantization`
    (`BitsAndBytesConfig` dict of an adapter's base, or None).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        BitsAndBytesConfig,
    )

    kind, path = spec["kind"], spec["path"]
    kwargs = {"dtype": getattr(torch, spec.get("dtype") or "float32")}
    if spec.get("quantization"):
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(dict(spec["quantization"]))
    def processor_of(folder):
        try:
            return AutoProcessor.from_pretrained(folder)
        except (ImportError, ValueError) as error:
            if "torchvision" not in str(error).lower() or kind == "llava":
                raise
            # A Qwen2-VL-style processor (its video part needs torchvision) where torchvision is missing: the
            # project's loader builds it without the video part. Only the reload of suite and stock VLM formats
            # (a process that imports the project anyway) gets here; the native LLaVA format stays plain.
            from align.loading import load_processor

            return load_processor(folder)

    if kind in ("vlm", "llava"):
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval(), processor_of(path)
    from peft import PeftModel

    if kind == "peft-vlm":
        base = AutoModelForImageTextToText.from_pretrained(spec["base"], **kwargs)
        loaded, processor = PeftModel.from_pretrained(base, path).eval(), processor_of(path)
    elif kind == "peft-llm":
        base = AutoModelForCausalLM.from_pretrained(spec["base"], **kwargs)
        loaded, processor = PeftModel.from_pretrained(base, path).eval(), AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"unknown format kind {kind!r}")
    for module in loaded.modules():
        # On CPUs with AVX512-BF16, bitsandbytes runs 4-bit layers in eval mode through a bfloat16 kernel. The
        # reference is the function the QLoRA adapter was trained with: the 4-bit weights dequantized, in float32.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return loaded, processor


def probe_model(model, processor, image_path: str | None, question: str, new_tokens: int) -> dict:
    """Logits and greedy tokens of `model` on one prompt: the question about the image through the processor's chat
    template, or (`image_path=None`) the bare question through the tokenizer (an LLM without vision)."""
    import torch
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    if image_path is None:
        inputs = tokenizer([question], return_tensors="pt")
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt")
    inputs = dict(inputs)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        # min_new_tokens: a fixed number of tokens on both sides, whatever the end-of-turn tokens are.
        generated = model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return {
        "input_ids": inputs["input_ids"].cpu(),
        "logits": logits.cpu(),
        "generated": generated[:, inputs["input_ids"].shape[1] :].cpu(),
    }


_CHILD_MAIN = '''
if __name__ == "__main__":
    import importlib
    import json
    import sys

    job = json.loads(open(sys.argv[1]).read())
    if job["import_model"]:
        importlib.import_module("model")
    results, loaded = {}, {}
    for name, spec in job["specs"].items():
        key = json.dumps({k: v for k, v in spec.items() if k != "text_only"}, sort_keys=True)
        if key not in loaded:
            loaded.clear()
            loaded[key] = load_for_probe(spec)
        reloaded, processor = loaded[key]
        if spec.get("text_only"):
            results[name] = probe_model(reloaded, processor, None, job["text"], job["new_tokens"])
        else:
            results[name] = probe_model(reloaded, processor, job["image"], job["question"], job["new_tokens"])
        results[name]["class"] = type(reloaded).__name__
    project = sorted({m.split(".")[0] for m in sys.modules} & {"model", "align", "recipes", "tests"})
    # Tensors as safetensors and the rest as JSON in its metadata: the parent loads no pickle.
    from safetensors.torch import save_file

    info = {"classes": {name: result.pop("class") for name, result in results.items()}, "project_modules": project}
    tensors = {f"{name}/{field}": value.contiguous() for name, result in results.items() for field, value in result.items()}
    save_file(tensors, job["out"], metadata={"info": json.dumps(info)})
'''


def _child_source() -> str:
    header = "from __future__ import annotations\n\n"
    functions = [textwrap.dedent(inspect.getsource(f)) for f in (load_for_probe, probe_model)]
    return header + "\n\n".join(functions) + _CHILD_MAIN


def _run_children(jobs: list[dict], workdir: Path, timeout: int) -> list[dict]:
    """Run each job (formats to reload and probe) in its own fresh Python process, all at once; their results."""
    running = []
    for index, job in enumerate(jobs):
        job_path = workdir / f"job-{index}.json"
        job = {**job, "out": str(job_path.with_suffix(".safetensors"))}
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if len(jobs) > 1:
            env["OMP_NUM_THREADS"] = "1"  # the processes run side by side
        if job["import_model"]:
            # The VLM formats need this project's `model` package importable; the others run with nothing added.
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-c", _child_source(), str(job_path)], cwd=workdir, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        running.append((job, process))
    results = []
    for job, process in running:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"reloading {sorted(job['specs'])} took longer than {timeout} s") from None
        if process.returncode != 0:
            raise RuntimeError(f"reloading {sorted(job['specs'])} in a fresh process failed:\n{stderr[-4000:]}")
        results.append(_read_child_results(job["out"]))
    return results


def _read_child_results(path: str) -> dict:
    """What a verification child wrote: per format its tensors (safetensors) and class name (JSON metadata)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        info = json.loads(handle.metadata()["info"])
        results = {name: {"class": cls} for name, cls in info["classes"].items()}
        for key in handle.keys():
            name, field = key.rsplit("/", 1)
            results[name][field] = handle.get_tensor(key)
    return {"results": results, "project_modules": info["project_modules"]}


def probe_batch(workdir: Path) -> tuple[str, str, str]:
    """The fixed verification batch: a shapes-world test image (saved as PNG in `workdir`), one of its questions,
    and a text-only prompt for LLM-only formats."""
    from align.world import WorldConfig
    from align.world.dataset import make_example

    example = make_example("test", 0, seed=0, config=WorldConfig())
    image_path = workdir / "probe.png"
    example["images"][0].save(image_path)
    question = json.loads(example["questions"])[0]["question"]
    return str(image_path), question, f"Question: {question} Answer:"


def verify_export(output_dir: str | os.PathLike, new_tokens: int = 8, timeout: int = 600) -> dict:
    """Re-check the checksums, reload every format of an export in fresh processes and compare it with the source.

    The source (the stage output as trained: an adapter on its base, 4-bit for QLoRA) and the VLM formats are
    loaded in one subprocess that imports this project's `model`; the LLaVA and bare-LLM formats in another one
    that imports only torch, transformers and PEFT (checked). Each format's logits on the fixed batch
    (`probe_batch`) must be within `TOLERANCES` of the source's (max |difference|; adapters 1e-6 absolute, merged
    and LLaVA 1e-5 in float32, 5e-2 in bfloat16, 1e-2 in float16, times max(1, largest |logit|)), its `input_ids`
    equal to the source's, and for float32 formats its greedy tokens equal to the source's. 4-bit bases run the
    float32 dequantized matmul QLoRA trained with (see `load_for_probe`). A QLoRA adapter merged into the original
    weights (`qlora_base="original"`) is compared with the adapter on the unquantized base.

    Returns:
        The report also written to `output_dir/verification.json`: `ok`, `checksums` (`check_checksums`),
        `checksums_ok`, `plain_process_project_modules`, and per format `class`, `dtype`, `reference`,
        `max_abs_diff`, `tolerance`, `logit_scale`, `same_input_ids`, `same_generation`, `generation_checked`, `ok`.
    """
    output_dir = Path(output_dir)
    checksums = check_checksums(output_dir)
    manifest = _read_json(output_dir / MANIFEST_FILE)
    if not manifest:
        raise ValueError(f"{output_dir} has no {MANIFEST_FILE}: not an export")
    report = {"checksums": checksums, "checksums_ok": not any(checksums.values()), "formats": {}}
    dtype = manifest["dtype"]
    source_spec = {
        "kind": "peft-vlm" if manifest["base"] else "vlm", "path": manifest["source"], "base": manifest["base"],
        "quantization": manifest["quantization"], "dtype": "float32",
    }
    vlm_specs, plain_specs = {"source": source_spec}, {}
    if any(entry["kind"] == "peft-llm" for entry in manifest["formats"].values()):
        # The text-only prompt through the source: what the bare-LLM adapter must reproduce.
        vlm_specs["source-text"] = {**source_spec, "text_only": True}
    merged_reference = "source"
    if manifest["quantization"] and manifest["qlora_base"] == "original":
        # Merged into the unquantized base: compared with the adapter on that base, not with the 4-bit model.
        vlm_specs["source-unquantized"] = {**source_spec, "quantization": None}
        merged_reference = "source-unquantized"
    for name, entry in manifest["formats"].items():
        spec = {"kind": entry["kind"], "path": str((output_dir / entry["path"]).resolve())}
        if entry["kind"] in ("peft-vlm", "peft-llm"):
            base = entry["base"]
            spec["base"] = str((output_dir / base).resolve()) if entry["kind"] == "peft-llm" else base
            spec["quantization"], spec["dtype"] = manifest["quantization"], "float32"
        else:
            spec["dtype"] = dtype
        if entry["kind"] == "peft-llm":
            spec["text_only"] = True
        (vlm_specs if entry["kind"] in ("vlm", "peft-vlm") else plain_specs)[name] = spec

    with tempfile.TemporaryDirectory(prefix="export-verify-") as tmp:
        workdir = Path(tmp)
        image, question, text = probe_batch(workdir)
        job = {"image": image, "question": question, "text": text, "new_tokens": new_tokens}
        jobs = [{**job, "specs": vlm_specs, "import_model": True}]
        if plain_specs:
            jobs.append({**job, "specs": plain_specs, "import_model": False})
        done = _run_children(jobs, workdir, timeout)
        results = done[0]["results"]
        if plain_specs:
            plain = done[1]
            if plain["project_modules"]:
                raise RuntimeError(f"the plain-transformers reload imported this project's {plain['project_modules']}")
            results.update(plain["results"])
        report["plain_process_project_modules"] = plain["project_modules"] if plain_specs else None

    for name, spec in {**vlm_specs, **plain_specs}.items():
        if name.startswith("source"):
            continue
        kind = "adapter" if spec["kind"] in ("peft-vlm", "peft-llm") else "merged"
        reference_name = "source-text" if spec["kind"] == "peft-llm" else "source" if kind == "adapter" else merged_reference
        reference, reloaded = results[reference_name], results[name]
        format_dtype = spec.get("dtype", "float32")
        scale = reference["logits"].abs().max().item()
        tolerance = TOLERANCES[kind][format_dtype] * (max(1.0, scale) if kind == "merged" else 1.0)
        same_ids = torch.equal(reloaded["input_ids"], reference["input_ids"])
        diff = (reloaded["logits"] - reference["logits"]).abs().max().item() if same_ids else math.inf
        same_generation = torch.equal(reloaded["generated"], reference["generated"])
        ok = same_ids and diff <= tolerance and (same_generation or format_dtype != "float32")
        report["formats"][name] = {
            "class": reloaded["class"], "dtype": format_dtype, "reference": reference_name,
            "max_abs_diff": diff, "tolerance": tolerance, "logit_scale": scale,
            "same_input_ids": same_ids, "same_generation": same_generation,
            "generation_checked": format_dtype == "float32", "ok": ok,
        }
        logger.info(
            "%s (%s, %s) vs %s: max |Δlogit| %.2e (tolerance %.1e), %s greedy tokens%s", name, reloaded["class"],
            format_dtype, reference_name, diff, tolerance, "same" if same_generation else "different",
            "" if format_dtype == "float32" else " (not required below float32)",
        )
    report["ok"] = report["checksums_ok"] and all(r["ok"] for r in report["formats"].values())
    atomic_write_text(output_dir / VERIFICATION_FILE, json.dumps(report, indent=2) + "\n")
    return report


__all__ = [
    "CHECKSUMS_FILE",
    "DTYPES",
    "FORMATS",
    "MANIFEST_FILE",
    "TOLERANCES",
    "VERIFICATION_FILE",
    "ExportSource",
    "available_formats",
    "base_llm_of",
    "check_checksums",
    "export",
    "inspect_source",
    "llava_refusal",
    "load_for_probe",
    "load_merged",
    "model_card",
    "parse_formats",
    "peft_llm_refusal",
    "probe_model",
    "resolve_formats",
    "stage_chain",
    "to_llava",
    "verify_export",
    "write_checksums",
]
