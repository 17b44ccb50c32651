"""The distillation losses: forward and reverse KL, GKD's generalized JSD, the top-k form, and the mix with
cross-entropy, each returning `(loss, metrics)`."""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F

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
