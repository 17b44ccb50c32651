"""Build a VLM from pretrained parts on disk: vision tower(s), a causal LLM and its tokenizer.

    python -m model.build --vision runs/parts/siglip --text runs/parts/llama \\
        --fusion prepend --projector mlp --output runs/vlm

writes a checkpoint that `AutoModelForImageTextToText.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` load after `import model`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from .chat_template import IMAGE_TOKEN, end_of_turn_token, prepare_vlm_tokenizer
from .configuration_vlm import FUSIONS, VLMConfig
from .modeling_vlm import VLMForConditionalGeneration
from .processing_vlm import VLMProcessor
from .projectors import PROJECTORS

logger = logging.getLogger(__name__)


def _check_path(path: str, role: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{role} path {path!r} does not exist or is not a directory (parts are loaded by local path)")
    return path


def _is_vision_tower(config) -> bool:
    return all(getattr(config, name, None) is not None for name in ("image_size", "patch_size", "hidden_size"))


def load_vision_tower(path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a ViT-style vision tower (SigLIP, CLIP, ...) that returns patch features.

    A dual-encoder checkpoint (`SiglipModel`, `CLIPModel`) is reduced to its vision tower: the tower's
    class is loaded from it, which reads only the `vision_model.*` weights.
    """
    path = _check_path(path, "vision")
    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and not _is_vision_tower(config):
        if not _is_vision_tower(vision_config) or type(vision_config) not in MODEL_MAPPING:
            raise ValueError(
                f"{path!r} is a {config.model_type!r} checkpoint whose vision part ({vision_config.model_type!r}) "
                "is not a ViT-style vision tower with image_size/patch_size"
            )
        tower_class = MODEL_MAPPING[type(vision_config)]
        tower, info = tower_class.from_pretrained(path, output_loading_info=True, **_dtype_kwargs(dtype))
        if info["missing_keys"]:
            raise ValueError(
                f"cannot reduce the {config.model_type!r} checkpoint at {path!r} to a {tower_class.__name__}: "
                f"{len(info['missing_keys'])} tower weights are missing (e.g. {sorted(info['missing_keys'])[:3]})"
            )
        logger.info("reduced the %s checkpoint at %s to its %s", config.model_type, path, tower_class.__name__)
        return tower
    if not _is_vision_tower(config) or type(config) not in MODEL_MAPPING:
        raise ValueError(
            f"{path!r} holds a {config.model_type!r} model, not a vision tower: expected a ViT-style encoder "
            "returning patch features (e.g. SiglipVisionModel, CLIPVisionModel, or a SiglipModel/CLIPModel "
            "checkpoint, reduced to its vision tower)"
        )
    return AutoModel.from_pretrained(path, **_dtype_kwargs(dtype))


def load_image_processor(path: str, tower: PreTrainedModel):
    """The image processor saved with a vision tower, checked to produce the image size the tower expects."""
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"no image processor found at vision path {path!r}: {error}") from error
    size = tower.config.image_size
    expected = (size, size) if isinstance(size, int) else tuple(size)
    probe = Image.new("RGB", (expected[1] + 7, expected[0] + 3))
    produced = tuple(image_processor(probe, return_tensors="pt")["pixel_values"].shape[-2:])
    if produced != expected:
        raise ValueError(
            f"the image processor at {path!r} produces {produced[0]}x{produced[1]} images but its tower expects "
            f"{expected[0]}x{expected[1]}"
        )
    return image_processor


def _causal_lm_config(path: str):
    path = _check_path(path, "text")
    config = AutoConfig.from_pretrained(path)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{path!r} holds a {config.model_type!r} model, not a causal LM: expected a checkpoint that "
            "AutoModelForCausalLM loads (Llama, Qwen2, OLMo, ...)"
        )
    return config


def load_causal_lm(path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM (`AutoModelForCausalLM`), refusing checkpoints of other kinds clearly."""
    _causal_lm_config(path)
    return AutoModelForCausalLM.from_pretrained(path, **_dtype_kwargs(dtype))


def _dtype_kwargs(dtype: torch.dtype | None) -> dict:
    # Only passed when set, so that by default every part loads in the dtype it was saved in.
    return {} if dtype is None else {"dtype": dtype}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def build_vlm(
    vision: str | list[str],
    text: str,
    fusion: str = "prepend",
    projector: str = "mlp",
    projector_depth: int = 2,
    projector_queries: int = 16,
    pool: int = 1,
    cross_attention_every: int = 4,
    ternary: bool = False,
    vision_feature_layer: int = -1,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, VLMProcessor]:
    """Build a VLM and its processor from pretrained parts, reusing their weights.

    Args:
        vision: path(s) of the vision tower(s), each with its image processor, in encoder order.
        text: path of the causal LLM with its tokenizer.
        fusion: "prepend" (LLaVA) or "cross_attention" (Flamingo / Llama 3.2 Vision).
        projector: "mlp", "attention" or "resampler".
        projector_depth: blocks of the attention and resampler projectors.
        projector_queries: visual tokens per image and tower of the resampler projector.
        pool: average-pool the patch grid by this factor per side.
        cross_attention_every: one cross-attention adapter every this many decoder layers.
        ternary: build the LLM's decoder linears as BitNet b1.58 layers.
        vision_feature_layer: which hidden state of the towers feeds the projector (-1: the last).
        dtype: dtype the parts are loaded in (default: as saved).

    Returns:
        `(model, processor)`: a `VLMForConditionalGeneration` in eval mode (as `from_pretrained` returns models)
        and its `VLMProcessor`. The tokenizer gains the `<image>` token if it lacked it (the LLM's embeddings are
        resized), an image-aware chat template and a pad token.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; supported: {sorted(FUSIONS)}")
    if projector not in PROJECTORS:
        raise ValueError(f"unknown projector {projector!r}; supported: {sorted(PROJECTORS)}")
    vision_paths = [vision] if isinstance(vision, (str, os.PathLike)) else list(vision)
    if not vision_paths:
        raise ValueError("at least one vision tower path is needed")
    for path in vision_paths:
        _check_path(path, "vision")
    text_config = _causal_lm_config(text)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if fusion == "cross_attention" and num_layers is not None and num_layers < cross_attention_every:
        raise ValueError(
            f"cross-attention fusion with cross_attention_every={cross_attention_every} needs at least that many "
            f"decoder layers; the LLM at {text!r} has {num_layers}"
        )
    dtype = _as_dtype(dtype)

    towers = [load_vision_tower(path, dtype) for path in vision_paths]
    image_processors = [load_image_processor(path, tower) for path, tower in zip(vision_paths, towers)]
    causal_lm = load_causal_lm(text, dtype)
    tokenizer = AutoTokenizer.from_pretrained(text)

    added = prepare_vlm_tokenizer(tokenizer, IMAGE_TOKEN)
    if len(tokenizer) > causal_lm.get_input_embeddings().num_embeddings:
        causal_lm.resize_token_embeddings(len(tokenizer))
        logger.info("added %s to the tokenizer; resized the LLM's embeddings to %d", added, len(tokenizer))
    causal_lm.config.pad_token_id = tokenizer.pad_token_id
    causal_lm.generation_config.pad_token_id = tokenizer.pad_token_id
    # Chat models end a turn with their own marker (<|eot_id|>, <|im_end|>); generation must stop there too.
    stop_ids = causal_lm.generation_config.eos_token_id
    stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    for token in (tokenizer.eos_token, end_of_turn_token(tokenizer)):
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(token_id)
    causal_lm.generation_config.eos_token_id = stop_ids

    # Copies: a composite config resets its sub-configs' attention implementation, which must not reach the parts.
    config = VLMConfig(
        vision_configs=[copy.deepcopy(tower.config) for tower in towers],
        text_config=copy.deepcopy(causal_lm.config),
        fusion=fusion,
        projector=projector,
        projector_depth=projector_depth,
        projector_queries=projector_queries,
        pool=pool,
        cross_attention_every=cross_attention_every,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        ternary=ternary,
    )
    model = VLMForConditionalGeneration.from_parts(config, towers, causal_lm).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stop_ids
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = VLMProcessor(
        image_processors[0],
        tokenizer,
        image_token=IMAGE_TOKEN,
        num_image_tokens=config.num_image_tokens,
        fusion=fusion,
        extra_vision_processors=image_processors[1:],
    )
    return model, processor


@dataclass
class BuildArguments:
    """Command-line arguments of `python -m model.build`."""

    vision: list[str] = field(metadata={"help": "Path(s) of the vision tower(s) with their image processors.", "nargs": "+"})
    text: str = field(metadata={"help": "Path of the causal LLM with its tokenizer."})
    output: str = field(metadata={"help": "Directory the VLM and its processor are written to."})
    fusion: str = field(default="prepend", metadata={"help": f"How images reach the LLM: {sorted(FUSIONS)}."})
    projector: str = field(default="mlp", metadata={"help": f"Projector: {sorted(PROJECTORS)}."})
    projector_depth: int = field(default=2, metadata={"help": "Blocks of the attention and resampler projectors."})
    projector_queries: int = field(default=16, metadata={"help": "Visual tokens per image of the resampler projector."})
    pool: int = field(default=1, metadata={"help": "Average-pool the patch grid by this factor per side."})
    cross_attention_every: int = field(
        default=4, metadata={"help": "One cross-attention adapter every this many decoder layers."}
    )
    ternary: bool = field(default=False, metadata={"help": "Build the LLM's decoder linears as ternary BitLinear."})
    vision_feature_layer: int = field(default=-1, metadata={"help": "Hidden state of the towers that is projected."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype of the parts, e.g. bfloat16; unset keeps the dtype each part was saved in."})

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; supported: {sorted(FUSIONS)}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; supported: {sorted(PROJECTORS)}")


def main(args: BuildArguments) -> None:
    model, processor = build_vlm(
        args.vision,
        args.text,
        fusion=args.fusion,
        projector=args.projector,
        projector_depth=args.projector_depth,
        projector_queries=args.projector_queries,
        pool=args.pool,
        cross_attention_every=args.cross_attention_every,
        ternary=args.ternary,
        vision_feature_layer=args.vision_feature_layer,
        dtype=args.dtype,
    )
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    logger.info(
        "wrote a %s-fusion VLM (%d vision tower(s), %d image tokens per image, %.1fM parameters) to %s",
        args.fusion, len(args.vision), processor.num_image_tokens, model.num_parameters() / 1e6, args.output,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (build_args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses()
    main(build_args)
