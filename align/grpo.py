"""Online RL for VLMs: GRPO (Shao et al. 2024, arXiv:2402.03300) on TRL's `GRPOTrainer`, with verifiable rewards
from the shapes world, each image encoded once per group of completions.

Rewards are TRL reward functions `f(prompts, completions, **columns) -> list[float]`; the dataset's columns
(`record`, `images`, ...) arrive as keyword arguments. Several are summed with `GRPOConfig.reward_weights`:

- `verifier`: 1 for an answer the world's verifier accepts (`align.world.verify`), 0 otherwise (Tülu 3's RLVR);
  with `verify_reasons`, a reasoned answer ("The red circle is further left, so yes.") also needs a true reason;
- `format`: 1 for a short answer that commits to one value of the asked type or declines (`well_formed`), right
  or wrong; a shaping term that keeps answers checkable;
- `reward_model`: the Bradley-Terry score of a VLM reward model from `recipes/reward.py` (`align.scoring`).

Why `VisionGRPOTrainer` extends TRL's trainer: TRL repeats each prompt `num_generations` times and hands the
processor's pixels of every copy to generation, to the old-policy and reference passes and to the loss, so a
group of G completions runs the vision tower G times per pass. `TowerMemo` sits on the VLM's
`get_vision_features` and encodes each distinct image of a generation batch once: with a frozen tower the
features are kept for every pass over that batch (generation, reference, loss, and the later steps of
`steps_per_generation`); with a trainable tower, copies within one forward share one encode (gradients flow to
it through the index). TRL also generates with the model's `use_cache` setting, which training turns off; the
trainer generates with the KV cache (and the images encoded at prefill only) unless `generation_kwargs` says
otherwise.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import PeftModel
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, pad

from align.families import family_of
from align.prompts import PromptArguments
from align.runs import RunArguments
from align.sampling import generate_groups
from align.towers import TowerMemo, memoize_stock_towers, same_frozen_towers, vlm_models
from align.world import verify, well_formed

logger = logging.getLogger(__name__)

REWARDS = ("verifier", "format", "reward_model")


# ---------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------


def completion_text(completion) -> str:
    """The answer text of a TRL completion: a string, or conversational messages (the last one's text)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def _records(record, count: int, reward: str) -> list[dict]:
    if record is None:
        raise ValueError(
            f"the {reward} reward needs prompts with a `record` column (question records, as the shapes world's "
            "prompts have); use the reward_model reward for prompts without one"
        )
    if len(record) != count:
        raise ValueError(f"{count} completions but {len(record)} question records")
    return [json.loads(r) if isinstance(r, str) else r for r in record]


def verifier_reward(prompts, completions, record=None, reasons: bool = False, **kwargs) -> list[float]:
    """1.0 for an answer the world's verifier accepts, 0.0 otherwise; with `reasons` an answer that states its
    reason first ("The red circle is further left, so yes.") must state a true one (`verify(reasons=True)`): a right
    yes/no after a false reason is a guess that landed, not a skill to reinforce."""
    records = _records(record, len(completions), "verifier")
    return [
        1.0 if verify(r, completion_text(c), reasons=reasons) else 0.0 for r, c in zip(records, completions, strict=True)
    ]


def format_reward(prompts, completions, record=None, max_words: int = 12, **kwargs) -> list[float]:
    """1.0 for an answer of at most `max_words` words that commits to exactly one value of the question's type or
    declines (`align.world.well_formed`), right or wrong; 0.0 for hedges, lists of values, empty or long answers.
    Without question records only the length counts."""
    texts = [completion_text(c) for c in completions]
    records = _records(record, len(texts), "format") if record is not None else [None] * len(texts)
    out = []
    for r, text in zip(records, texts, strict=True):
        words = len(text.split())
        ok = 0 < words <= max_words and (r is None or well_formed(r, text))
        out.append(1.0 if ok else 0.0)
    return out


class RewardModelReward:
    """A trained VLM reward model (`recipes/reward.py`) as a GRPO reward: its score of each (image, prompt,
    answer), batched (`align.scoring.RewardModelScorer`)."""

    __name__ = "reward_model"

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, prompts, completions, images=None, **kwargs) -> list[float]:
        if images is None:
            raise ValueError("the reward_model reward needs the prompts' `images` column")
        rows = [{"images": imgs, "prompt": prompt} for imgs, prompt in zip(images, prompts, strict=True)]
        scores = self.scorer(rows, [[completion_text(c)] for c in completions])
        return [s[0] for s in scores]


def _named(name: str, func: Callable) -> Callable:
    """`func` under `name`: TRL logs each reward function's mean as `rewards/<its __name__>/mean`."""

    def reward(prompts, completions, **kwargs):
        return func(prompts, completions, **kwargs)

    reward.__name__ = name
    return reward


def reward_functions(
    names: Sequence[str], reward_model_name_or_path: str | None = None, max_words: int = 12, device=None,
    verify_reasons: bool = False,
) -> list[Callable]:
    """The named reward functions, in order (their weights are `GRPOConfig.reward_weights`); `verify_reasons`: the
    verifier reward checks an answer's stated reason too (`verifier_reward`)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown or not names:
        raise ValueError(f"reward_funcs must name one or more of {list(REWARDS)}, got {list(names)}")
    funcs = []
    for name in names:
        if name == "verifier":
            funcs.append(_named("verifier", functools.partial(verifier_reward, reasons=verify_reasons)))
        elif name == "format":
            funcs.append(_named("format", functools.partial(format_reward, max_words=max_words)))
        else:
            if not reward_model_name_or_path:
                raise ValueError("the reward_model reward needs reward_model_name_or_path (a recipes/reward.py output)")
            from align.scoring import RewardModelScorer

            funcs.append(RewardModelReward(RewardModelScorer.from_pretrained(reward_model_name_or_path, device=device)))
    return funcs


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class VisionGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` with each image encoded once per group (`TowerMemo` on the policy's and, when it is a
    separate model, the reference's VLM), and generation with the KV cache. Stock VLMs (no suite `VLMModel`
    inside) train as TRL trains them.

    `ref_model`: the reference of a full fine-tuning run with `beta > 0` (a frozen copy of the starting policy).
    TRL builds that copy itself from the policy's config through the architectures transformers ships, which a
    suite VLM is not one of; given here, it is prepared as TRL prepares its own."""

    def __init__(self, model, reward_funcs, args, *, ref_model=None, **kwargs):
        family = family_of(model)
        if "cross_attention_mask" in family.image_inputs:
            # TRL's GRPO forward passes pixel_values, image_grid_thw, pixel_attention_mask, image_sizes and the
            # token type ids on, and drops the rest of what the processor returned.
            raise ValueError(
                f"GRPO does not run on {family.name} models: TRL's GRPOTrainer drops their aspect_ratio_ids, "
                "aspect_ratio_mask and cross_attention_mask; align them with rejection sampling and DPO rounds "
                "(recipes/rounds.py) instead"
            )
        separate_reference = ref_model is not None and args.beta != 0.0
        if separate_reference and (isinstance(model, PeftModel) or kwargs.get("peft_config") is not None):
            raise ValueError("ref_model is for full fine-tuning: under LoRA the reference is the policy without adapters")
        if separate_reference and args.sync_ref_model:
            raise ValueError("sync_ref_model with an explicit ref_model is not supported")
        beta = args.beta
        if separate_reference:
            args.beta = 0.0  # TRL then builds no reference of its own
        try:
            super().__init__(model, reward_funcs, args, **kwargs)
        finally:
            args.beta = beta
        if separate_reference:
            self.beta = beta
            self.ref_model = self._prepare_reference(ref_model)
        self.tower_memos: list[TowerMemo] = []
        for vlm in vlm_models(self.model, self.ref_model):
            # A separate reference with the policy's frozen towers reads the policy's memo: one encode serves both.
            shared = next((memo for memo in self.tower_memos if same_frozen_towers(memo.vlm, vlm)), None)
            if shared is not None:
                vlm.get_vision_features = shared
            else:
                self.tower_memos.append(TowerMemo(vlm))
        # A stock VLM: TRL repeats each prompt's images for every answer of its group; each is encoded once per call.
        self.row_memos = [] if self.tower_memos else memoize_stock_towers(self.model, self.ref_model)
        if "use_cache" not in (self.args.generation_kwargs or {}):
            self.generation_config.use_cache = True
            self.generation_kwargs["use_cache"] = True

    def _prepare_reference(self, ref_model):
        """What `GRPOTrainer.__init__` does to the reference it builds: no dropout, the fused LM head that returns
        log-probs, and placement by accelerate (or DeepSpeed / FSDP)."""
        ref_model.eval().requires_grad_(False)
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    @property
    def images_encoded(self) -> int:
        return sum(memo.images_encoded for memo in [*self.tower_memos, *self.row_memos])

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Each group's prompt prefilled once and its answers decoded from copies of its KV cache
        (`align.sampling.generate_groups`), where TRL's own path would prefill every copy of the prompt: a suite
        VLM, plain `generate` (no vLLM, no continuous batching, no tools), and the batch made of whole groups (runs
        of `num_generations` identical prompts with identical images, as TRL's sampler deals them). Anything else
        goes TRL's way."""
        groups = self._whole_groups(prompt_ids, multimodal_fields, num_generations)
        if groups is None or self.use_vllm or self.use_transformers_continuous_batching or self.tools or has_tool_images:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        firsts, image_rows = groups
        device = self.accelerator.device
        prompts = [torch.tensor(prompt_ids[i]) for i in firsts]
        inputs = {
            "input_ids": pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
            "attention_mask": pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left").to(device),
        }
        if image_rows is not None:
            inputs["pixel_values"] = multimodal_fields["pixel_values"][image_rows].to(device)
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
        ):
            output = generate_groups(unwrapped_model, inputs, num_generations, generation_config=self.generation_config)
        completion_ids = output[:, inputs["input_ids"].shape[1] :]
        # As TRL: everything after the first EOS is dropped.
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=completion_ids.device))
        ends = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], is_eos.shape[1], dtype=torch.long))
        return [row[: end + 1].tolist() for row, end in zip(completion_ids.cpu(), ends.cpu().tolist(), strict=True)], None

    def _whole_groups(self, prompt_ids, multimodal_fields, group: int):
        """(index of each group's first prompt, the pixel rows of those prompts' images or None) when the batch is
        whole groups of `group` identical prompts with identical images, for a suite VLM; else None."""
        if not self.tower_memos or len(prompt_ids) % group or set(multimodal_fields) - {"pixel_values"}:
            return None
        firsts = list(range(0, len(prompt_ids), group))
        if any(prompt_ids[i + j] != prompt_ids[i] for i in firsts for j in range(group)):
            return None
        pixels = multimodal_fields.get("pixel_values")
        if pixels is None:
            return firsts, None
        if pixels.shape[0] % len(prompt_ids):
            return None  # a varying number of images per prompt: leave it to TRL
        per_prompt = pixels.shape[0] // len(prompt_ids)
        rows = pixels.reshape(len(prompt_ids), per_prompt, -1)
        if any(not torch.equal(rows[i + j], rows[i]) for i in firsts for j in range(1, group)):
            return None
        return firsts, [i * per_prompt + k for i in firsts for k in range(per_prompt)]

    def _generate_and_score_completions(self, inputs):
        # A new generation batch: the features of the previous one are not needed again.
        for memo in self.tower_memos:
            memo.clear()
        return super()._generate_and_score_completions(inputs)


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GRPOScriptArguments(PromptArguments, RunArguments):
    """Prompts (`PromptArguments`) and rewards of the GRPO recipe (the policy is `VLMModelConfig.model_name_or_path`)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["verifier", "format"],
        metadata={"help": f"Rewards, summed with GRPOConfig.reward_weights: any of {list(REWARDS)}."},
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The reward model (recipes/reward.py output) of the reward_model reward."}
    )
    format_max_words: int = field(default=12, metadata={"help": "`format` reward: the longest well-formed answer."})
    verify_reasons: bool = field(
        default=False,
        metadata={"help": "`verifier` reward: an answer that states its reason first (\"The red circle is further left, "
                  "so yes.\") scores 1 only when the reason is true too (`align.world.verify(reasons=True)`)."},
    )
    filter_samples: int = field(
        default=0,
        metadata={"help": "Before training, sample this many answers to each prompt with the starting policy and keep "
                  "the prompts whose verifier pass rate lies strictly inside filter_pass_rate (`filter_by_pass_rate`; "
                  "0: keep every prompt). A group whose answers are all right or all wrong has no advantage to learn from."},
    )
    filter_pass_rate: list[float] = field(
        default_factory=lambda: [0.0, 1.0],
        metadata={"help": "The open interval of pass rates a prompt is kept in by filter_samples.", "nargs": 2},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.filter_samples < 0 or self.filter_samples == 1:
            raise ValueError(f"filter_samples must be 0 (off) or >= 2, got {self.filter_samples}")
        low, high = self.filter_pass_rate
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"filter_pass_rate must be two rates 0 <= low < high <= 1, got {self.filter_pass_rate}")
        unknown = [n for n in self.reward_funcs if n not in REWARDS]
        if unknown or not self.reward_funcs:
            raise ValueError(f"reward_funcs must name one or more of {list(REWARDS)}, got {self.reward_funcs}")
        if "reward_model" in self.reward_funcs and not self.reward_model_name_or_path:
            raise ValueError("reward_funcs has reward_model: set reward_model_name_or_path (a recipes/reward.py output)")
        if self.format_max_words < 1:
            raise ValueError(f"format_max_words must be >= 1, got {self.format_max_words}")

    def prompts(self, rejects_path=None) -> Dataset:
        """The prompt rows; question records are required when a reward reads them."""
        return self.load_prompts(needs_records="verifier" in self.reward_funcs, rejects_path=rejects_path)


def filter_by_pass_rate(
    model, processor, prompts: Dataset, samples: int, low: float = 0.0, high: float = 1.0, batch_size: int = 16,
    max_new_tokens: int = 16, temperature: float = 1.0, seed: int = 0, reasons: bool = False,
) -> tuple[Dataset, dict]:
    """The prompts on which `model` is neither always right nor always wrong: `samples` answers to each (shared-prefill
    sampling, `align.evaluation.sample_batch`), scored by the world's verifier; a prompt is kept when its pass rate is
    strictly between `low` and `high`.

    GRPO learns from the spread of rewards within a group; a group whose answers all score the same has zero
    advantage and spends its generation and backward passes on nothing (DAPO's dynamic sampling drops such groups
    online, arXiv:2503.14476; this is the offline form, measured once with the starting policy, as difficulty
    filtering of RL prompt sets is commonly done). TRL's `GRPOTrainer` has neither.

    Returns:
        `(kept prompts, report)`: `report` has `candidates`, `kept`, `samples`, the bounds, and the number of prompts
        at each pass rate (`pass_rates`, keyed by the rate's numerator over `samples`).
    """
    from align.evaluation import sample_batch
    from align.scoring import VerifierScorer

    if "record" not in prompts.column_names:
        raise ValueError("filtering prompts by pass rate needs question records (world prompts) for the verifier")
    verifier, rates = VerifierScorer(reasons=reasons), []  # reasons: as the `verifier` reward checks them
    for start in range(0, len(prompts), batch_size):
        rows = [prompts[i] for i in range(start, min(start + batch_size, len(prompts)))]
        answers = sample_batch(model, processor, rows, samples, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed + start)
        rates += [sum(scores) / samples for scores in verifier(rows, answers)]
    kept = [i for i, rate in enumerate(rates) if low < rate < high]
    counts = {}
    for rate in rates:
        key = f"{round(rate * samples)}/{samples}"
        counts[key] = counts.get(key, 0) + 1
    report = {"candidates": len(prompts), "kept": len(kept), "samples": samples, "pass_rate_bounds": [low, high],
              "pass_rates": dict(sorted(counts.items()))}
    return prompts.select(kept), report


__all__ = [
    "REWARDS",
    "GRPOScriptArguments",
    "RewardModelReward",
    "VisionGRPOTrainer",
    "completion_text",
    "filter_by_pass_rate",
    "format_reward",
    "reward_functions",
    "verifier_reward",
]
