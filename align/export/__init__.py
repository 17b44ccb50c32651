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

from model.llava import to_llava

from .card import model_card, stage_chain
from .checksums import CHECKSUMS_FILE, VERIFICATION_FILE, check_checksums, write_checksums
from .formats import base_llm_of, export_llava, export_merged, export_peft, export_peft_llm
from .source import (
    DTYPES,
    FORMATS,
    QLORA_MERGE_BASES,
    ExportSource,
    available_formats,
    inspect_source,
    llava_refusal,
    load_merged,
    parse_formats,
    peft_llm_refusal,
    resolve_formats,
)
from .verify import TOLERANCES, load_for_probe, probe_batch, probe_outputs, verify_export
from .writer import MANIFEST_FILE, export

__all__ = [
    "CHECKSUMS_FILE",
    "DTYPES",
    "FORMATS",
    "MANIFEST_FILE",
    "QLORA_MERGE_BASES",
    "TOLERANCES",
    "VERIFICATION_FILE",
    "ExportSource",
    "available_formats",
    "base_llm_of",
    "check_checksums",
    "export",
    "export_llava",
    "export_merged",
    "export_peft",
    "export_peft_llm",
    "inspect_source",
    "llava_refusal",
    "load_for_probe",
    "load_merged",
    "model_card",
    "parse_formats",
    "peft_llm_refusal",
    "probe_batch",
    "probe_outputs",
    "resolve_formats",
    "stage_chain",
    "to_llava",
    "verify_export",
    "write_checksums",
]
