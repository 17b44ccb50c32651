"""The model card (`README.md`): parts, fusion, the stages that produced the model, the evaluation table."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from align.families import family_of
from align.loading import adapter_base, is_adapter_dir

from .checksums import CHECKSUMS_FILE
from .source import ExportSource, _read_json, _read_yaml, _stock_model_type

logger = logging.getLogger(__name__)


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
        if current.name == "merged" and is_adapter_dir(current.parent):
            current = current.parent
            continue
        seen.add(current.resolve())
        config = _read_yaml(current / "config.yaml")
        base = None
        if is_adapter_dir(current):
            try:
                base = adapter_base(current)
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
            "kind": "LoRA adapter" if is_adapter_dir(current) else "full model",
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
