"""Teacher and student: loading either (a VLM or a text LLM), the compatibility check, the ternary student."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, ProcessorMixin
from trl import ModelConfig, get_quantization_config

from align.families import known_family
from align.loading import is_adapter_dir, load_pretrained
from align.training import load_vlm
from model.configuration_vlm import VLMConfig
from model.ternary import ternarize_

logger = logging.getLogger(__name__)


def _is_vlm_dir(path: str) -> bool:
    if is_adapter_dir(path):
        return True  # LoRA outputs in this project are VLM runs (`load_vlm` merges them)
    return known_family(AutoConfig.from_pretrained(path)) is not None  # the suite's VLM or a stock one


def load_for_distillation(path: str, model_args: ModelConfig) -> tuple[PreTrainedModel, object]:
    """A teacher or student and its processing class: a VLM directory or LoRA output via `load_vlm` (adapters
    merged on load), or a text causal LM directory with its tokenizer."""
    if not Path(path).is_dir():
        raise ValueError(f"model path {path!r} is not a directory")
    if _is_vlm_dir(path):
        return load_vlm(path, model_args)
    kwargs = {"dtype": model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return load_pretrained(path, model_class=AutoModelForCausalLM, **kwargs), AutoTokenizer.from_pretrained(path)


def _tokenizer(processing_class):
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def _image_layout(processor) -> tuple:
    return (
        getattr(processor, "image_token", None),
        getattr(processor, "num_image_tokens", None),
        str(getattr(processor.image_processor, "size", None)),
    )


def check_compatible_teacher(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    teacher_processing,
    student_processing,
    teacher_path: str = "the teacher",
    student_path: str = "the student",
) -> None:
    """Refuse a teacher whose next-token distributions cannot be compared with the student's position by position.

    Both must have the same vocabulary size and the same tokenizer vocabulary (`get_vocab()`), and, for VLMs, lay
    the images out alike (image token, tokens per image, image size), since the teacher reads the student's batch.

    Raises:
        ValueError: naming both paths and the first differences. A mapping between different vocabularies is not
            supported.
    """
    unsupported = "; distillation between different vocabularies (a token mapping) is not supported"
    teacher_size = teacher.config.get_text_config().vocab_size
    student_size = student.config.get_text_config().vocab_size
    if teacher_size != student_size:
        raise ValueError(
            f"teacher {teacher_path} has vocab_size {teacher_size} but student {student_path} has {student_size}: "
            f"the two next-token distributions must be over the same tokens{unsupported}"
        )
    teacher_vocab, student_vocab = _tokenizer(teacher_processing).get_vocab(), _tokenizer(student_processing).get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])[:5]
        raise ValueError(
            f"teacher {teacher_path} and student {student_path} have different tokenizer vocabularies "
            f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; e.g. {differing}): both must tokenize the same "
            f"text into the same ids{unsupported}"
        )
    teacher_is_vlm, student_is_vlm = isinstance(teacher_processing, ProcessorMixin), isinstance(student_processing, ProcessorMixin)
    if teacher_is_vlm != student_is_vlm:
        raise ValueError(f"teacher {teacher_path} and student {student_path} must both be VLMs or both text LLMs")
    if teacher_is_vlm and _image_layout(teacher_processing) != _image_layout(student_processing):
        raise ValueError(
            f"teacher {teacher_path} and student {student_path} lay images out differently (image token, tokens per "
            f"image, image size: {_image_layout(teacher_processing)} vs {_image_layout(student_processing)}); the "
            "teacher reads the student's batch, so the student must share the teacher's vision encoder input and "
            "projector shape"
        )


def ternarize_student(model: PreTrainedModel) -> list[str]:
    """Turn the student's LLM decoder linears into BitNet b1.58 `BitLinear`s in place, keeping their weights as the
    latent full-precision weights, and set `config.ternary` so that `from_pretrained` rebuilds them.

    Returns:
        The qualified names of the replaced layers (empty when the model is ternary already).

    Raises:
        ValueError: for a model that is not this project's VLM (only `VLMConfig` records the ternary option).
    """
    if not isinstance(model.config, VLMConfig):
        raise ValueError(
            f"student_ternary needs a VLM student (a VLMConfig records the ternary layers so that the saved model "
            f"reloads with them); got a {type(model.config).__name__}"
        )
    if model.config.ternary:
        logger.info("the student is ternary already")
        return []
    if any(hasattr(module, "quant_state") for module in model.modules()):
        raise ValueError("student_ternary replaces full-precision linears: load the student without 4/8-bit quantization")
    replaced = ternarize_(model.get_decoder().layers)
    model.config.ternary = True
    logger.info("student ternarized: %d LLM linears are BitLinear (BitNet b1.58), trained by distillation", len(replaced))
    return replaced
