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

from .config import DistillConfig, DistillScriptArguments
from .losses import (
    LOSSES,
    MODES,
    TOPK_COLUMNS,
    distillation_loss,
    divergence_beta,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    teacher_topk,
    topk_divergence,
    topk_log_probs,
)
from .models import check_compatible_teacher, load_for_distillation, ternarize_student
from .off_policy import (
    DistillTrainer,
    WithTeacherTopK,
    add_teacher_topk,
    cache_teacher_topk,
    next_token_positions,
    teacher_topk_rows,
)
from .on_policy import distill_trainer, distillation_metrics, on_policy_config, on_policy_trainer, prompt_rows

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
