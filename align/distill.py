"""Knowledge distillation: a student VLM (or text LLM) trained against a frozen teacher's token-level distributions.

Losses, each a small function returning `(loss, metrics)` and averaged over the labelled positions (`labels != -100`):

- `forward_kl`: KL(teacher || student), mode-covering (the classic distillation loss);
- `reverse_kl`: KL(student || teacher), mode-seeking (MiniLLM);
- `generalized_jsd`: the generalized Jensen-Shannon divergence of GKD, interpolating the two with `beta`;
- `topk_divergence`: any of them against a teacher given as cached top-k (token ids, log-probs), the rest of the
  teacher's mass in one tail bucket;
- `distillation_loss`: `alpha * divergence + ce_weight * CE(labels)` (`ce_weight = 1 - alpha` by default).

All run at a temperature T: both logits are divided by T and the divergence is multiplied by T² (Hinton et al.), so
that its gradients keep their size as T changes. The divergences themselves are TRL's
`GKDTrainer.generalized_jsd_loss` (beta 0 is forward KL, 1 reverse KL), reused rather than re-implemented.

Trainers:

- off-policy (`DistillTrainer`): on a dataset's conversations. TRL 1.16's `DistillationTrainer` is on-policy only
  (it always samples the completions from the student and reads prompts only) and has no cross-entropy term, so this
  is TRL's `SFTTrainer` with `compute_loss` overridden: its VLM collator already builds `input_ids`, assistant-only
  `labels` and `pixel_values` from conversational rows with images; the override runs the frozen teacher on the same
  batch and adds the divergence. With `cache_teacher_topk: K` the teacher's top-K log-probs are computed once over
  the data (`cache_teacher_topk`) and the teacher is released before training.
- on-policy (`on_policy_trainer`): TRL's `DistillationTrainer`, which takes VLM prompts with images: the student
  samples the answers, the teacher scores them. It uses TRL's own loss: the divergence only (no cross-entropy, no T²
  factor), the temperature doubling as the sampling temperature.

Teacher and student must share one tokenizer (`check_compatible_teacher`); a mapping between vocabularies is not
supported. A student whose LLM linears are BitNet `BitLinear` (`ternarize_student`) is distilled from the
full-precision teacher: post-training ternarization by distillation.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, List, Value
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    ProcessorMixin,
    TrainingArguments,
)
from trl import (
    DistillationConfig,
    DistillationTrainer,
    ModelConfig,
    SFTConfig,
    SFTTrainer,
    get_quantization_config,
)

from align.families import known_family
from align.loading import is_adapter_dir, load_pretrained
from align.sft import SFTScriptArguments
from align.training import load_vlm
from model.configuration_vlm import VLMConfig
from model.ternary import ternarize_

with warnings.catch_warnings():
    # Every import from `trl.experimental` warns that its APIs may change; only GKD's loss function is used, and the
    # tests pin it against hand-computed values.
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer

logger = logging.getLogger(__name__)

LOSSES = ("forward_kl", "reverse_kl", "jsd")
MODES = ("off_policy", "on_policy")
TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logps")
IGNORE_INDEX = -100
# Added to a top-k distribution's tail bucket, so that its log stays finite when the top k hold all the mass.
TAIL_FLOOR = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def divergence_beta(loss: str, jsd_beta: float = 0.5) -> float:
    """The generalized JSD's `beta` that a loss name stands for: 0 forward KL, 1 reverse KL, `jsd_beta` for "jsd"."""
    betas = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": jsd_beta}
    if loss not in betas:
        raise ValueError(f"unknown distillation loss {loss!r}; supported: {list(betas)}")
    return betas[loss]


def _labelled_rows(tensor: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """`[..., V]` -> `[N, V]`: the rows at labelled positions (all rows without labels), in row-major order."""
    if labels is None:
        return tensor.reshape(-1, tensor.shape[-1])
    if labels.shape != tensor.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not line up with logits {tuple(tensor.shape)}")
    return tensor[labels != IGNORE_INDEX]


def _per_token(total: torch.Tensor, rows: int, num_tokens) -> torch.Tensor:
    # `num_tokens` (the Trainer's `num_items_in_batch`) spans every micro-batch of a gradient-accumulation step;
    # clamped so that a batch without labelled tokens gives a finite zero.
    denominator = rows if num_tokens is None else num_tokens
    return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device).clamp(min=1)


def _divergence_sum(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """T² times the summed generalized JSD of `[N, V]` logits (TRL's GKD loss, summed over rows)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape: the "
            "two models must share one vocabulary and see the same tokens"
        )
    total = GKDTrainer.generalized_jsd_loss(
        student.float(), teacher.float(), beta=beta, temperature=temperature, reduction="sum"
    )
    return temperature**2 * total


def _divergence(name, student_logits, teacher_logits, labels, beta, temperature, num_tokens):
    student = _labelled_rows(student_logits, labels)
    total = _divergence_sum(student, _labelled_rows(teacher_logits, labels), beta, temperature)
    return _per_token(total, student.shape[0], num_tokens), {name: _per_token(total.detach(), student.shape[0], None)}


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward KL(teacher || student) per labelled token at `temperature`, times T² (Hinton et al.,
    arXiv:1503.02531): mode-covering, the student spreads its mass over all the teacher finds likely.

    Args:
        student_logits: `[..., V]`.
        teacher_logits: `[..., V]`, same shape.
        labels: `[...]` aligned with the logits (already shifted); positions holding -100 are left out.
        temperature: both logits are divided by it; the loss is multiplied by its square.
        num_tokens: the denominator (e.g. the labelled tokens of a whole gradient-accumulation step); default: the
            labelled positions given.

    Returns:
        The loss and `{"forward_kl": per-token mean}` (detached).
    """
    return _divergence("forward_kl", student_logits, teacher_logits, labels, 0.0, temperature, num_tokens)


def reverse_kl(student_logits, teacher_logits, labels=None, temperature=1.0, num_tokens=None):
    """Reverse KL(student || teacher) per labelled token at `temperature`, times T² (MiniLLM, arXiv:2306.08543):
    mode-seeking, the student puts its mass where the teacher's is. Arguments as `forward_kl`; returns the loss
    and `{"reverse_kl": per-token mean}`."""
    return _divergence("reverse_kl", student_logits, teacher_logits, labels, 1.0, temperature, num_tokens)


def generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, num_tokens=None):
    """Generalized JSD of GKD (arXiv:2306.13649, eq. 1), times T²: with the mixture m = beta * p_teacher +
    (1 - beta) * p_student, `beta * KL(teacher || m) + (1 - beta) * KL(student || m)`; beta 0.5 is the symmetric
    JSD, and beta 0 / 1 fall back to forward / reverse KL (TRL's convention). Arguments as `forward_kl`; returns the
    loss and `{"jsd": per-token mean}`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return _divergence("jsd", student_logits, teacher_logits, labels, beta, temperature, num_tokens)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's `k` most likely tokens and their log-probs at `temperature`: what `cache_teacher_topk` stores.

    Returns:
        `(ids, logps)`, both `[..., k]`, most likely first.
    """
    logps = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, ids = logps.topk(k, dim=-1)
    return ids, values


def topk_log_probs(
    student_logps: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over k + 1 categories: the teacher's top-k tokens, then one tail bucket with the rest.

    Merging the tail into one category keeps both distributions normalised, so every divergence stays defined and
    is a lower bound of the full-vocabulary one (coarse-graining never increases a KL or JSD); with k = V it is the
    full one. Renormalising the teacher over its top k instead would overstate the teacher's confidence and leave
    the student's tail unpenalised.

    Args:
        student_logps: `[N, V]` student log-probs (at the distillation temperature).
        teacher_ids: `[N, k]` the teacher's top-k token ids.
        teacher_logps: `[N, k]` their teacher log-probs (at the same temperature).

    Returns:
        `(student, teacher)` log-probs, `[N, k + 1]` each.
    """
    in_topk = torch.zeros_like(student_logps, dtype=torch.bool).scatter_(-1, teacher_ids, True)
    floor = student_logps.new_full((student_logps.shape[0], 1), math.log(TAIL_FLOOR))
    # The student's tail as a log-sum-exp over the other tokens, not log(1 - sum): exact, with no cancellation.
    student_tail = torch.logsumexp(torch.cat([student_logps.masked_fill(in_topk, float("-inf")), floor], dim=-1), dim=-1)
    teacher_logps = teacher_logps.float()
    teacher_tail = 1 - teacher_logps.exp().sum(dim=-1)
    # A tail within the rounding of summing k float32 probabilities is no tail: it would otherwise be compared with
    # the student's (floored) empty tail when k = V.
    rounding = teacher_logps.shape[-1] * torch.finfo(torch.float32).eps
    teacher_tail = torch.log(torch.where(teacher_tail > rounding, teacher_tail, 0.0) + TAIL_FLOOR)
    student = torch.cat([student_logps.gather(-1, teacher_ids), student_tail[:, None]], dim=-1)
    teacher = torch.cat([teacher_logps, teacher_tail[:, None]], dim=-1)
    return student, teacher


def _topk_divergence_sum(student, teacher_ids, teacher_logps, beta, temperature):
    if teacher_ids.shape != teacher_logps.shape or teacher_ids.shape[0] != student.shape[0]:
        raise ValueError(
            f"cached teacher top-k {tuple(teacher_ids.shape)} / {tuple(teacher_logps.shape)} does not line up with "
            f"the {student.shape[0]} labelled positions of the batch"
        )
    student_logps = F.log_softmax(student.float() / temperature, dim=-1)
    student_k, teacher_k = topk_log_probs(student_logps, teacher_ids.long(), teacher_logps)
    # Already normalised log-probs at the temperature: TRL's log_softmax leaves them as they are at T = 1.
    return temperature**2 * GKDTrainer.generalized_jsd_loss(student_k, teacher_k, beta=beta, temperature=1.0, reduction="sum")


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logps: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generalized JSD (beta 0 forward KL, 1 reverse KL) against a teacher given as its top-k tokens, the
    remaining mass as one tail bucket (`topk_log_probs`), times T². The idea of sparse teacher logits as in
    "Sparse Logit Sampling" (arXiv:2503.16870) and TRL's GOLD trainer.

    Args:
        student_logits: `[..., V]`.
        teacher_ids, teacher_logps: `[N, k]` for the N labelled positions of `student_logits`, in row-major order
            (`teacher_topk` at the same temperature).
        labels, temperature, num_tokens: as `forward_kl`.

    Returns:
        The loss and `{"topk_divergence": per-token mean}`.
    """
    student = _labelled_rows(student_logits, labels)
    total = _topk_divergence_sum(student, teacher_ids, teacher_logps, beta, temperature)
    return _per_token(total, student.shape[0], num_tokens), {"topk_divergence": _per_token(total.detach(), student.shape[0], None)}


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss: str = "forward_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 1.0,
    ce_weight: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`alpha * divergence(teacher, student) + ce_weight * CE(student, labels)` over the labelled positions
    (Hinton et al., arXiv:1503.02531); `ce_weight` defaults to `1 - alpha`. The cross-entropy is at temperature 1.

    Args:
        student_logits: `[..., V]`.
        labels: `[...]` the next tokens, aligned with the logits (already shifted), -100 where not trained.
        teacher_logits: `[..., V]` (on-the-fly teacher), or
        teacher_topk_cache: `(ids, logps)`, `[N, k]` each for the N labelled positions (cached teacher).
            Neither is needed when `alpha` is 0 (the cross-entropy baseline).
        loss: "forward_kl", "reverse_kl" or "jsd" (with `jsd_beta`).
        temperature: of the divergence.
        alpha, ce_weight: the weights of the divergence and of the cross-entropy.
        num_tokens: the denominator of both terms; default: the labelled positions given.

    Returns:
        The loss and, as per-token means (detached), `ce_loss`, and with a teacher `distill_loss` and
        `teacher_agreement` (how often the student's most likely token is the teacher's).
    """
    beta = divergence_beta(loss, jsd_beta)
    ce_weight = 1.0 - alpha if ce_weight is None else ce_weight
    student = _labelled_rows(student_logits, labels).float()
    targets = labels[labels != IGNORE_INDEX]
    rows = student.shape[0]
    ce_sum = F.cross_entropy(student, targets, reduction="sum")
    total = ce_weight * _per_token(ce_sum, rows, num_tokens)
    metrics = {"ce_loss": _per_token(ce_sum.detach(), rows, None)}
    if alpha > 0:
        if teacher_topk_cache is not None:
            distill_sum = _topk_divergence_sum(student, *teacher_topk_cache, beta, temperature)
            teacher_top1 = teacher_topk_cache[0][:, 0]
        elif teacher_logits is not None:
            teacher = _labelled_rows(teacher_logits, labels)
            distill_sum = _divergence_sum(student, teacher, beta, temperature)
            teacher_top1 = teacher.argmax(dim=-1)
        else:
            raise ValueError("alpha > 0 needs the teacher: its logits or its cached top-k")
        total = total + alpha * _per_token(distill_sum, rows, num_tokens)
        metrics["distill_loss"] = _per_token(distill_sum.detach(), rows, None)
        agreement = (student.detach().argmax(dim=-1) == teacher_top1).float().sum()
        metrics["teacher_agreement"] = _per_token(agreement, rows, None)
    return total, metrics


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DistillScriptArguments(SFTScriptArguments):
    """The teacher and the student's form, plus the SFT data (`SFTScriptArguments`: the shapes world's
    conversations and refusals by default, or a `datasets:` mixture). The student is `--model_name_or_path`."""

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher: a VLM directory, a LoRA output (merged on load) or a text LLM directory, with the "
            "student's tokenizer. Required unless alpha is 0. The student (--model_name_or_path) defaults to it."
        },
    )
    student_ternary: bool = field(
        default=False,
        metadata={
            "help": "Turn the student's LLM decoder linears into ternary BitLinear (BitNet b1.58) before training, "
            "saved as such: post-training ternarization by distillation. VLM students, without --use_peft."
        },
    )


@dataclass
class DistillConfig(SFTConfig):
    """TRL's `SFTConfig` plus the distillation settings. Off-policy runs train with it as is (`DistillTrainer`);
    on-policy runs hand its settings to TRL's `DistillationConfig` (`on_policy_config`)."""

    distillation_loss: str = field(
        default="forward_kl",
        metadata={
            "help": f"Divergence between the teacher's and the student's next-token distributions: one of {list(LOSSES)} "
            "(forward KL(teacher||student), reverse KL(student||teacher), generalized JSD with `jsd_beta`)."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "distillation_loss jsd: the teacher's weight in the mixture (0 forward KL ... 1 reverse KL)."},
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Distillation temperature: both logits are divided by it and the divergence multiplied by its "
            "square (Hinton et al.). On-policy it is also the student's sampling temperature."
        },
    )
    alpha: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the distillation loss; the cross-entropy on the labels gets 1 - alpha unless ce_weight "
            "is set. alpha 0 is plain SFT on the labels with everything else the same: the no-distillation baseline "
            "(the teacher is then not loaded)."
        },
    )
    ce_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the cross-entropy on the labels, instead of 1 - alpha."},
    )
    cache_teacher_topk: int | None = field(
        default=None,
        metadata={
            "help": "Off-policy: compute the teacher's top-K log-probs once over the data before training and train "
            "from them (the remaining mass as one tail bucket), releasing the teacher; default: the teacher runs on "
            "every batch."
        },
    )
    mode: str = field(
        default="off_policy",
        metadata={
            "help": f"One of {list(MODES)}: off_policy distills on the dataset's answers; on_policy on answers the "
            "student samples itself, scored by the teacher (TRL's DistillationTrainer; distillation loss only)."
        },
    )
    max_completion_length: int = field(
        default=64,
        metadata={"help": "on_policy: the most tokens the student samples per answer."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.distillation_loss not in LOSSES:
            raise ValueError(f"distillation_loss must be one of {list(LOSSES)}, got {self.distillation_loss!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.ce_weight is not None and self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0 or unset, got {self.ce_weight}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.cache_teacher_topk is not None:
            if self.cache_teacher_topk < 1:
                raise ValueError(f"cache_teacher_topk must be >= 1 or unset, got {self.cache_teacher_topk}")
            if self.alpha == 0:
                raise ValueError("cache_teacher_topk caches the teacher, which alpha 0 (no distillation) does not use")
            if self.mode == "on_policy":
                raise ValueError("cache_teacher_topk is off-policy only: on-policy the teacher scores fresh samples")
        if self.mode == "on_policy":
            if self.alpha != 1.0 or self.ce_weight:
                raise ValueError(
                    "on_policy trains on the student's own samples, which have no labels: set alpha 1 and no ce_weight"
                )
            if self.max_completion_length < 1:
                raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        elif self.packing or self.padding_free:
            raise ValueError("off-policy distillation needs one row per sequence: turn packing and padding_free off")


# ---------------------------------------------------------------------------------------------------------------
# Teacher and student
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Off-policy trainer
# ---------------------------------------------------------------------------------------------------------------


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loss is: position t predicts token t + 1, so `keep[b, t]` is True when `labels[b, t + 1]` is
    labelled. Returns `(keep [B, L] bool, targets [N])`, the next tokens of the kept positions in row-major order."""
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = next_labels != IGNORE_INDEX
    return keep, next_labels[keep]


class DistillTrainer(SFTTrainer):
    """TRL's `SFTTrainer` whose loss is `distillation_loss` against a frozen teacher (off-policy distillation).

    Overridden: `compute_loss` (the teacher's forward on the same batch, the loss), `prediction_step` (loss only),
    and `_set_signature_columns_if_needed` (keeps the cached teacher columns, which TRL's column pruning would drop).
    Both models project only the positions that are trained (transformers' boolean `logits_to_keep`), so neither
    builds `[batch, length, vocab]` logits.
    """

    def __init__(
        self,
        model,
        teacher_model: PreTrainedModel | None,
        args: DistillConfig,
        train_dataset: Dataset,
        processing_class,
        peft_config=None,
        eval_dataset: Dataset | None = None,
        callbacks: list | None = None,
    ):
        if args.alpha > 0 and teacher_model is None:
            raise ValueError("alpha > 0 distills from a teacher: pass teacher_model (or set alpha 0 for plain SFT)")
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        self.teacher_model = None
        if teacher_model is not None and args.alpha > 0:
            student_size = self.model.config.get_text_config().vocab_size
            teacher_size = teacher_model.config.get_text_config().vocab_size
            if student_size != teacher_size:
                raise ValueError(f"the student has vocab_size {student_size}, the teacher {teacher_size}: they must match")
            teacher_model.eval().requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        if args.cache_teacher_topk:
            cache_teacher_topk(self)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(c for c in TOPK_COLUMNS if c not in self._signature_columns)]

    def teacher_logits(self, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits `[N, V]` at the kept positions of the batch (no gradient, eval mode)."""
        with torch.no_grad():
            return self.teacher_model(**inputs, use_cache=False, logits_to_keep=keep).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cached = (inputs.pop(TOPK_COLUMNS[0]), inputs.pop(TOPK_COLUMNS[1])) if TOPK_COLUMNS[0] in inputs else None
        keep, targets = next_token_positions(labels)
        student_logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        teacher_logits = None
        if self.args.alpha > 0 and cached is None:
            if self.teacher_model is None:
                raise ValueError("no teacher to distill from: neither a teacher model nor cached teacher columns")
            teacher_logits = self.teacher_logits(inputs, keep)
        loss, metrics = distillation_loss(
            student_logits,
            targets,
            teacher_logits=teacher_logits,
            teacher_topk_cache=cached,
            loss=self.args.distillation_loss,
            jsd_beta=self.args.jsd_beta,
            temperature=self.args.temperature,
            alpha=self.args.alpha,
            ce_weight=self.args.ce_weight,
            num_tokens=num_items_in_batch,
        )
        # As SFTTrainer: `num_items_in_batch` counts the tokens of every process and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# ---------------------------------------------------------------------------------------------------------------
# Cached teacher top-k
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class WithTeacherTopK:
    """A collator that builds the batch with `collator` (TRL's) and adds the rows' cached teacher top-k as `[N, k]`
    tensors, rows concatenated in batch order (the order of `next_token_positions`)."""

    collator: Callable
    k: int

    def __call__(self, examples: list[dict]) -> dict:
        ids = [torch.tensor(e[TOPK_COLUMNS[0]], dtype=torch.long).reshape(-1, self.k) for e in examples]
        logps = [torch.tensor(e[TOPK_COLUMNS[1]], dtype=torch.float32).reshape(-1, self.k) for e in examples]
        batch = self.collator([{key: v for key, v in e.items() if key not in TOPK_COLUMNS} for e in examples])
        batch[TOPK_COLUMNS[0]], batch[TOPK_COLUMNS[1]] = torch.cat(ids), torch.cat(logps)
        return batch


def teacher_topk_rows(trainer: DistillTrainer, dataset: Dataset, k: int, batch_size: int) -> tuple[list, list]:
    """The teacher's top-k (ids, log-probs at the distillation temperature) at every labelled position of every
    row of `dataset`, in row order, each row flattened to `positions * k` values.

    Built with the trainer's own collator, so the positions are those training will see. Runs on every process:
    batches are sharded over the processes and gathered back in order.
    """
    data = trainer._remove_unused_columns(dataset, description="teacher top-k")
    loader = trainer.accelerator.prepare(
        DataLoader(data, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False, num_workers=0)
    )
    all_ids, all_logps = [], []
    for batch in loader:
        labels = batch.pop("labels")
        keep, _ = next_token_positions(labels)
        ids, logps = teacher_topk(trainer.teacher_logits(batch, keep), k, trainer.args.temperature)
        counts = keep.sum(dim=1).tolist()
        rows_ids = [part.flatten().tolist() for part in ids.cpu().split(counts)]
        rows_logps = [part.flatten().tolist() for part in logps.cpu().split(counts)]
        all_ids += trainer.accelerator.gather_for_metrics(rows_ids, use_gather_object=True)
        all_logps += trainer.accelerator.gather_for_metrics(rows_logps, use_gather_object=True)
    return all_ids, all_logps


def add_teacher_topk(trainer: DistillTrainer, dataset: Dataset, k: int, batch_size: int) -> Dataset:
    """`dataset` with the `teacher_topk_ids` (int32) and `teacher_topk_logps` (float32) columns."""
    ids, logps = teacher_topk_rows(trainer, dataset, k, batch_size)
    if len(ids) != len(dataset):
        raise RuntimeError(f"computed the teacher top-k of {len(ids)} rows for {len(dataset)}")
    dataset = dataset.remove_columns([c for c in TOPK_COLUMNS if c in dataset.column_names])
    dataset = dataset.add_column(TOPK_COLUMNS[0], ids, feature=List(Value("int32")))
    return dataset.add_column(TOPK_COLUMNS[1], logps, feature=List(Value("float32")))


def cache_teacher_topk(trainer: DistillTrainer, batch_size: int | None = None) -> None:
    """Compute the teacher's top-k log-probs of the trainer's datasets once (like `align.dpo.precompute_reference`
    does for DPO's reference), make the loss read them, and release the teacher.

    Memory: `k` ids and log-probs (8 bytes each) per labelled token, in the dataset's Arrow cache, instead of a
    teacher model in accelerator memory during training.
    """
    k = trainer.args.cache_teacher_topk
    vocab = trainer.teacher_model.config.get_text_config().vocab_size
    if k > vocab:
        raise ValueError(f"cache_teacher_topk {k} exceeds the vocabulary ({vocab} tokens)")
    train_batch = batch_size or trainer.args.per_device_train_batch_size
    trainer.train_dataset = add_teacher_topk(trainer, trainer.train_dataset, k, train_batch)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {
            name: add_teacher_topk(trainer, data, k, batch_size or trainer.args.per_device_eval_batch_size)
            for name, data in trainer.eval_dataset.items()
        }
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = add_teacher_topk(
            trainer, trainer.eval_dataset, k, batch_size or trainer.args.per_device_eval_batch_size
        )
    trainer.data_collator = WithTeacherTopK(trainer.data_collator, k)
    trainer.teacher_model = None
    logger.info(
        "cached the teacher's top-%d log-probs of %d rows (temperature %g); the teacher is released",
        k, len(trainer.train_dataset), trainer.args.temperature,
    )


# ---------------------------------------------------------------------------------------------------------------
# On-policy trainer
# ---------------------------------------------------------------------------------------------------------------


def prompt_rows(dataset: Dataset) -> Dataset:
    """Conversations as on-policy prompts: the turns before each row's last assistant answer, which the student
    then writes itself; the row's images are kept. Rows without an assistant turn are dropped."""

    def to_prompt(row):
        assistant = [i for i, message in enumerate(row["messages"]) if message["role"] == "assistant"]
        return {"prompt": row["messages"][: assistant[-1]] if assistant else []}

    keep = [c for c in dataset.column_names if c in ("images", "image")]
    prompts = dataset.map(to_prompt, remove_columns=[c for c in dataset.column_names if c not in keep])
    return prompts.filter(lambda row: len(row["prompt"]) > 0)


def on_policy_config(args: DistillConfig) -> DistillationConfig:
    """TRL's `DistillationConfig` with every `TrainingArguments` setting of `args`, plus the divergence (`beta`),
    the temperature and the completion length."""
    shared = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
    # The deprecated alias would override `activation_checkpointing` with its own (default) value.
    shared.pop("gradient_checkpointing", None)
    return DistillationConfig(
        **shared,
        beta=divergence_beta(args.distillation_loss, args.jsd_beta),
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        shuffle_dataset=args.shuffle_dataset,
    )


def on_policy_trainer(
    model, teacher_model, args: DistillConfig, train_dataset: Dataset, processing_class, peft_config=None, callbacks=None
) -> DistillationTrainer:
    """TRL's `DistillationTrainer` (on-policy: the student samples, the teacher scores) on the prompts of
    `train_dataset` (conversations are cut before their last answer, `prompt_rows`). Text LLMs and VLMs alike:
    TRL passes the prompts' images to generation and to both models' forwards."""
    if args.mode != "on_policy":
        raise ValueError(f"on_policy_trainer needs mode on_policy, got {args.mode!r}")
    prompts = prompt_rows(train_dataset) if "messages" in train_dataset.column_names else train_dataset
    return DistillationTrainer(
        model=model,
        teacher_model=teacher_model,
        args=on_policy_config(args),
        train_dataset=prompts,
        processing_class=processing_class,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def distill_trainer(
    model, teacher_model, args: DistillConfig, train_dataset: Dataset, processing_class, peft_config=None, callbacks=None
):
    """The trainer for `args.mode`: `DistillTrainer` (off-policy) or TRL's `DistillationTrainer` (on-policy)."""
    if args.mode == "on_policy":
        return on_policy_trainer(model, teacher_model, args, train_dataset, processing_class, peft_config, callbacks)
    return DistillTrainer(
        model, teacher_model, args, train_dataset, processing_class, peft_config=peft_config, callbacks=callbacks
    )


def distillation_metrics(trainer) -> dict:
    """The logged distillation terms of a run: first, last and history of `distill_loss`, `ce_loss` and
    `teacher_agreement` (on-policy, TRL's loss is the distillation loss)."""
    keys = {"distill_loss": "distill_loss", "ce_loss": "ce_loss", "teacher_agreement": "teacher_agreement"}
    if isinstance(trainer, DistillationTrainer):
        keys = {"distill_loss": "loss"}
    summary = {}
    for name, key in keys.items():
        history = [(log["step"], log[key]) for log in trainer.state.log_history if key in log and "train_runtime" not in log]
        if history:
            summary[name] = {"first": history[0][1], "last": history[-1][1], "history": history}
    return summary


__all__ = [
    "LOSSES",
    "MODES",
    "TOPK_COLUMNS",
    "DistillConfig",
    "DistillScriptArguments",
    "DistillTrainer",
    "WithTeacherTopK",
    "add_teacher_topk",
    "cache_teacher_topk",
    "check_compatible_teacher",
    "distill_trainer",
    "distillation_loss",
    "distillation_metrics",
    "divergence_beta",
    "forward_kl",
    "generalized_jsd",
    "load_for_distillation",
    "next_token_positions",
    "on_policy_config",
    "on_policy_trainer",
    "prompt_rows",
    "reverse_kl",
    "teacher_topk",
    "teacher_topk_rows",
    "ternarize_student",
    "topk_divergence",
    "topk_log_probs",
]
