"""Build the embedded default: the shapes world, a tokenizer, tiny pretrained parts and a base VLM that sees.

    python -m align.zoo                      # installs the shipped parts into .cache/zoo (or $VLM_ALIGN_CACHE)
    python -m align.zoo --force              # trains every part here instead (about four hours on 2 CPU cores)
    python -m align.zoo --force --ship       # ... and ships the result (maintainers, after changing a part's code)

Each part is written to its own folder as an ordinary Hugging Face checkpoint and marked valid by a
manifest written last, so a killed build redoes only the unfinished part and a rerun skips what is
built. A part's fingerprint covers its settings, the fingerprints of the parts it is built from and the code that
builds it (`code_fingerprint`: parsed code, so comments and docstrings do not count). The parts are shipped with
the package (`align/default_parts/`, safetensors with a manifest of checksums); a part whose shipped fingerprint
matches this code and these settings is installed from there instead of trained, any other is trained here.

The parts: `world` (generated, never shipped: it takes seconds), `tokenizer`, `siglip`, `llama`, and `base`, a
prepend-fusion VLM from SigLIP and the LLM through the pretraining stages a real VLM goes through, each a run of
`recipes/pretrain.py` (`BASE_STAGES`): adapter pretraining on captions with the LLM frozen
(`recipes/configs/tiny/pretrain.yaml`), then grounded pretraining, the LLM training too, on the captions and every
question of the world's training images (`pretrain_grounded.yaml`), then annealing, a second pass weighted to what
the first leaves behind (`pretrain_anneal.yaml`, as Llama 3.2's last pretraining stage), then spatial annealing, a
third pass with the spatial questions weighted eight times (`pretrain_spatial.yaml`), then spatial reasoning, the same
mixture with the yes/no spatial questions answered by their reason first (`pretrain_reasoning.yaml`,
`align.world.reasoned_answer`), then spatial conclusions, one question a conversation with the yes/no spatial ones
weighted, most of all those naming two objects of one shape, whose yes or no the reasoning run left at chance
(`pretrain_conclusions.yaml`, `align.world.SPATIAL_PAIRS`), then counting, that mixture with the count questions
weighted four times (`pretrain_counting.yaml`). Post-training starts from
`base`. `--base_continue` builds it from the shipped base through the runs appended since (maintainers: refused
unless the shipped base is what the earlier runs build with this code and these settings). The quality figures (encoder retrieval and object probe, LM perplexity, each against a
random-init twin; the base VLM's held-out accuracy per question category) are printed and saved to
`quality.json`.

The package: `build` (the settings, each part's build, `build_zoo`, the command line), `parts` (the tiny SigLIP's
and Llama's pretraining on transformers' `Trainer`), `tokenizer` (the byte-level BPE tokenizer), `documents` (their
training text and patch labels, from the world), `manifest` (fingerprints, manifests, checksums, shipping), `carry`
(`python -m align.zoo.carry`: the shipped fingerprints carried across a change of code that builds the same parts).
"""

from align.zoo.build import (
    BASE_CODE,
    BASE_STAGES,
    LLAMA_CODE,
    PARTS,
    SIGLIP_CODE,
    TOKENIZER_CODE,
    WORLD_CODE,
    ZooConfig,
    build_zoo,
    format_quality,
    main,
    part_fingerprints,
)
from align.zoo.documents import lm_documents, object_patch_labels, tokenizer_documents
from align.zoo.manifest import MANIFEST, SHIPPED, code_fingerprint, file_checksums, read_manifest, ship

__all__ = [
    "BASE_CODE",
    "BASE_STAGES",
    "LLAMA_CODE",
    "MANIFEST",
    "PARTS",
    "SHIPPED",
    "SIGLIP_CODE",
    "TOKENIZER_CODE",
    "WORLD_CODE",
    "ZooConfig",
    "build_zoo",
    "code_fingerprint",
    "file_checksums",
    "format_quality",
    "lm_documents",
    "main",
    "object_patch_labels",
    "part_fingerprints",
    "read_manifest",
    "ship",
    "tokenizer_documents",
]
