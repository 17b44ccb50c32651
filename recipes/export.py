"""Export a stage's output for other tools: PEFT adapter (+ a bare-LLM copy), merged model, native LLaVA, model card.

    python recipes/export.py --config recipes/configs/tiny/export.yaml
    python recipes/export.py --model_name_or_path runs/tiny/sft --output_dir runs/tiny/sft-export --formats merged,llava \\
        --dtype bfloat16 --verify true

`model_name_or_path` is a whole VLM folder or a LoRA/QLoRA adapter folder (`adapter_config.json`; a QLoRA base is
read as 4-bit from the stage's `config.yaml` and dequantized before merging). Writes into `output_dir` the formats
asked for (default: all that apply): `peft/` (and `peft-llm/` + `base-llm/` when the adapter touches only the LLM),
`merged/`, `llava/` (prepend fusion, MLP projector, one encoder, pool 1), `README.md`, plus `export.json` and
`checksums.json` (SHA-256 of every file; written last, so a folder without it was cut short and a rerun redoes it).
A rerun into the same folder with other settings is refused unless `--force`. `--verify true` re-checks the checksums and reloads each format in a fresh
process, comparing logits and greedy generations with the source model; the result goes to `verification.json`
and a failed check exits with status 1.
"""

import json
import logging
from dataclasses import dataclass, field

from transformers import set_seed
from trl import TrlParser

from align.export import DTYPES, FORMATS, QLORA_MERGE_BASES, export, parse_formats, verify_export
from align.runs import RunArguments, claim_output_dir, resolved_config

logger = logging.getLogger(__name__)


@dataclass
class ExportArguments(RunArguments):
    """What to export, how, and where to."""

    model_name_or_path: str = field(metadata={"help": "Stage output to export: a VLM folder or a LoRA/QLoRA adapter folder."})
    output_dir: str = field(metadata={"help": "Folder the export is written to (one subfolder per format)."})
    formats: str | None = field(
        default=None,
        metadata={"help": f"Comma-separated formats out of {','.join(FORMATS)}; default: all that apply to the model."},
    )
    dtype: str = field(default="float32", metadata={"help": f"Dtype of the merged and LLaVA weights: {', '.join(DTYPES)}."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base VLM of an adapter (default: adapter_config.json's base_model_name_or_path)."}
    )
    base_load_in_4bit: bool | None = field(
        default=None,
        metadata={"help": "Whether the adapter was trained on a 4-bit base (QLoRA); default: the stage's config.yaml."},
    )
    qlora_base: str = field(
        default="dequantized",
        metadata={
            "help": "What a QLoRA adapter is merged into: 'dequantized' (the 4-bit weights it was trained against, "
            "dequantized) or 'original' (the unquantized base weights)."
        },
    )
    eval_metrics: str | None = field(
        default=None,
        metadata={"help": "An evaluation's metrics.json for the model card (default: <model>/eval/metrics.json if any)."},
    )
    verify: bool = field(
        default=False,
        metadata={"help": "Re-check the checksums and reload every format in a fresh process, comparing logits and "
                  "greedy generations with the source model."},
    )
    verify_new_tokens: int = field(default=8, metadata={"help": "Greedy tokens compared by --verify."})
    seed: int = field(default=0, metadata={"help": "Random seed (nothing here samples; kept for reproducibility)."})

    def __post_init__(self):
        parse_formats(self.formats)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.qlora_base not in QLORA_MERGE_BASES:
            raise ValueError(f"qlora_base must be one of {QLORA_MERGE_BASES}, got {self.qlora_base!r}")
        if self.verify_new_tokens < 1:
            raise ValueError(f"verify_new_tokens must be at least 1, got {self.verify_new_tokens}")


def main(args: ExportArguments) -> dict:
    # ----- logging and seed -------------------------------------------------------------------------------------
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)

    # ----- export -----------------------------------------------------------------------------------------------
    # The checks (`--verify`) do not change what is written: a rerun may add or drop them.
    claim_output_dir(args.output_dir, resolved_config(args), force=args.force, allowed={"verify", "verify_new_tokens"})
    manifest = export(
        args.model_name_or_path,
        args.output_dir,
        formats=parse_formats(args.formats),
        dtype=args.dtype,
        base_model_name_or_path=args.base_model_name_or_path,
        base_load_in_4bit=args.base_load_in_4bit,
        qlora_base=args.qlora_base,
        eval_metrics=args.eval_metrics,
    )
    print(json.dumps({"written": manifest["written"], "skipped": manifest["skipped"]}, indent=2))

    # ----- verify -----------------------------------------------------------------------------------------------
    if args.verify:
        report = verify_export(args.output_dir, new_tokens=args.verify_new_tokens)
        print(json.dumps(report, indent=2))
        if not report["ok"]:
            logger.error("verification failed; see %s/verification.json", args.output_dir)
            raise SystemExit(1)
        logger.info("verified: checksums intact, every format reloads and matches the source")
        manifest["verification"] = report
    return manifest


def make_parser() -> TrlParser:
    return TrlParser((ExportArguments,))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
