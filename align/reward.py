"""Reward modelling of a VLM: the Bradley-Terry loss on preference pairs, a thin trainer, and scoring.

A reward model is the VLM's backbone with a scalar head (`model.VLMForRewardModeling`; for a stock VLM,
`model.ImageTextForRewardModeling` on its base model). It reads the whole
conversation (images, prompt, answer) rendered with the processor's chat template exactly as the policy sees it in
training, so `reward_scores` scores what a policy generates, and is trained on pairs (`images`, `prompt`, `chosen`,
`rejected`) so that the chosen answer scores higher.

Why not TRL's `RewardTrainer`: it is text-only. It tokenizes `chosen`/`rejected` with the tokenizer's chat template
in `_prepare_dataset` (no image placeholders expanded, no `pixel_values`), keeps only `chosen_ids`/`rejected_ids`
columns for its collator (which pads ids and nothing else), and runs both sides as one batch, which would send
every image through the vision tower twice. `VisionRewardTrainer` is a `transformers.Trainer` with a collator that
renders both sides with the processor and preprocesses each pair's images once, and a `compute_loss` that encodes
them once; it keeps TRL's `RewardConfig` (extended by `VLMRewardConfig` with the head's learning rate), loss (with
`margin` and `center_rewards_coefficient`) and logged metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import EvalPrediction, Trainer
from trl import ModelConfig, RewardConfig
from trl.trainer.utils import disable_dropout_in_model

from align.data import load_dataset_local, validate_rows, world_preference_rows
from align.data.mixture import WorldDataArguments, WorldPairArguments
from align.data.world import open_world
from align.families import FAMILIES, family_of, freeze_components
from align.loading import is_adapter_dir, load_pretrained, load_processor, load_run
from align.runs import RunArguments
from align.training import (
    load_model,
    lora_config,
)
from model import (
    ImageTextForRewardModeling,
    VLMConfig,
    VLMForRewardModeling,
    VLMProcessor,
    freeze_for_stage,
    pack_image_features,
)
from model.reward_model import answer_tokens, last_token_indices

logger = logging.getLogger(__name__)

# Columns the collator reads; `margin` (optional) is a per-pair float.
PAIR_COLUMNS = ("images", "prompt", "chosen", "rejected", "margin")

# ---------------------------------------------------------------------------------------------------------------
# Loss and accuracy
# ---------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean of `-log sigmoid(r_chosen - r_rejected - margin)` over the pairs.

    The Bradley-Terry model of pairwise preference (Bradley & Terry 1952) as reward-model loss, InstructGPT
    (arXiv:2203.02155, eq. 1); the optional margin (how much better chosen is) is Llama 2's (arXiv:2307.09288,
    sec. 3.2.2) and TRL's `RewardTrainer` convention.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Share of pairs whose chosen answer scores higher than the rejected one; a tie counts as half.

    Half, not wrong (TRL's `RewardTrainer` counts ties as wrong): a model that cannot tell the answers apart, e.g.
    an untrained reward model whose head is zero, then measures at chance (0.5) instead of 0, which is what a coin
    flip between the two answers would get.
    """
    chosen = torch.as_tensor(chosen_scores, dtype=torch.float64).flatten()
    rejected = torch.as_tensor(rejected_scores, dtype=torch.float64).flatten()
    if chosen.shape != rejected.shape:
        raise ValueError(f"{chosen.numel()} chosen scores for {rejected.numel()} rejected scores")
    if chosen.numel() == 0:
        raise ValueError("no pairs to score")
    wins = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return wins.mean().item()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RewardScriptArguments(WorldPairArguments, WorldDataArguments, RunArguments):
    """Data of the reward recipe: training pairs (the world's, or a `datasets:` mixture of local preference sets) and
    held-out pairs for the pairwise accuracy before and after training."""

    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out pairs: the split of the world (or of the saved dataset at --eval_path) to draw them "
            "from. Default: the world's `validation` split if it has one, else `test`."
        },
    )
    eval_images: int | None = field(
        default=200,
        metadata={
            "help": "Held-out world pairs: use only the first N images of the eval split (None: all; 0: no held-out "
            "evaluation)."
        },
    )
    eval_path: str | None = field(
        default=None,
        metadata={
            "help": "Held-out pairs from a local preference set instead of the world: a JSON/JSONL file or a "
            "`save_to_disk` folder, in any format of `align.data.FORMATS` (e.g. rlaif_v)."
        },
    )
    eval_format: str | None = field(
        default=None, metadata={"help": "Format of --eval_path (detected when omitted)."}
    )
    eval_image_root: str | None = field(
        default=None, metadata={"help": "Folder the image paths of --eval_path are relative to."}
    )
    likelihood_baseline: bool = field(
        default=False,
        metadata={
            "help": "Also report the held-out pairwise accuracy of the starting policy's own preference (the answer "
            "it finds likelier; `likelihood_scores`): what the reward model has to beat. Loads the policy once more "
            "before training, and frees it."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.eval_images is not None and self.eval_images < 0:
            raise ValueError(f"eval_images must be >= 0 (0: no held-out evaluation) or unset, got {self.eval_images}")
        if self.eval_path is None and not self.datasets and self.eval_split == self.world_split:
            raise ValueError(
                f"eval_split {self.eval_split!r} is the training split (world_split): held-out pairs must come from "
                "another split"
            )


@dataclass
class VLMRewardConfig(RewardConfig):
    """TRL's `RewardConfig` plus the score head's own learning rate and the one-forward-per-pair switch."""

    score_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the score head (new and zero-initialised); default: --learning_rate. A higher "
            "one lets the head fit the backbone's features before the backbone's adaptation moves them, the idea "
            "of LP-FT (linear probing, then fine-tuning; arXiv:2202.10054) in a single run."
        },
    )

    likelihood_feature: bool = field(
        default=False,
        metadata={
            "help": "Add the conversation's log-likelihood under the VLM's LM head (kept) to the reward, with a "
            "learned scale starting at 1, so that training starts from the starting policy's own preference "
            "instead of a zero head at chance (`VLMForRewardModeling`, `ImageTextForRewardModeling`)."
        },
    )

    pack_pairs: bool = field(
        default=True,
        metadata={
            "help": "One forward per preference pair, the image and prompt shared by both answers (exact; "
            "`pack_reward_pairs`); false runs the chosen and rejected rows apart, as transformers' Trainer would."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.score_learning_rate is not None and not self.score_learning_rate > 0:
            raise ValueError(f"score_learning_rate must be > 0 or unset, got {self.score_learning_rate}")


def _world(args: WorldDataArguments) -> datasets.DatasetDict:
    world = open_world(args.world_path, hint="set --world_path, --eval_path, or --eval_images 0 (held-out pairs)")
    if not isinstance(world, datasets.DatasetDict):
        raise ValueError(f"the world at {args.world_path} has no splits, so no held-out split: set --eval_path or "
                         "--eval_images 0")
    return world


def held_out_pairs(args: RewardScriptArguments, seed: int) -> Dataset | None:
    """Held-out preference pairs (`images`, `prompt`, `chosen`, `rejected`, and `category` for world pairs), bad
    rows skipped; None when `eval_images` is 0.

    From `eval_path` when given, else from the world's `eval_split` (default `validation`, else `test`): pairs drawn
    as for training (`world_preference_rows`, `pairs_per_image`) from its first `eval_images` images.
    """
    if args.eval_images == 0:
        return None
    if args.eval_path is not None:
        pairs, _ = load_dataset_local(
            args.eval_path, format=args.eval_format, kind="preference", image_root=args.eval_image_root,
            split=args.eval_split,
        )
        source = args.eval_path
    else:
        world = _world(args)
        split = args.eval_split or next((s for s in ("validation", "test") if s in world), None)
        if split is None or split not in world:
            raise ValueError(
                f"the world has no split {args.eval_split or 'validation or test'!r} for held-out pairs; splits: "
                f"{list(world)} (set --eval_split)"
            )
        if split == args.world_split and not args.datasets:
            raise ValueError(f"the held-out split {split!r} is the training split; set --eval_split to another one")
        rows = world[split]
        if args.eval_images is not None:
            rows = rows.select(range(min(args.eval_images, len(rows))))
        pairs = world_preference_rows(rows, seed=seed, per_image=args.pairs_per_image, reasoned=args.spatial_reasoning)
        source = f"shapes world {split}"
        pairs, report = validate_rows(pairs, "preference", source=source)
        if report.rejects:
            logger.warning("held-out pairs: skipped %s", report.summary())
    if len(pairs) == 0:
        raise ValueError(f"{source}: no held-out preference pairs")
    logger.info("held-out: %d preference pairs from %s", len(pairs), source)
    return pairs


def render_conversation(processor, prompt: list[dict], completion: list[dict] | str) -> str:
    """The prompt and answer as the policy sees them: `processor.apply_chat_template(prompt + completion)`.

    Args:
        prompt: TRL conversational messages (the user turns, optionally a system turn).
        completion: assistant messages, or the plain answer text (as a policy's decoded generation).
    """
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": [{"type": "text", "text": completion}]}]
    return processor.apply_chat_template(list(prompt) + list(completion), tokenize=False)


def _image_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


REWARD_MODEL_CLASSES = (VLMForRewardModeling, ImageTextForRewardModeling)


def _encode(processor, texts: list[str], images: list[list], return_pixel_values: bool = True, **kwargs):
    # The chat template writes the BOS itself; the tokenizer must not add a second one (as TRL's collators).
    options = dict(padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt", **kwargs)
    if isinstance(processor, VLMProcessor):
        return processor(images=images, text=texts, return_pixel_values=return_pixel_values, **options)
    # A stock processor: its own image inputs (`pixel_values` and `image_grid_thw`, `pixel_attention_mask`,
    # `cross_attention_mask`, ...) for every row. The suite's once-per-pair encoding needs its own VLM's features.
    return processor(images=images if any(images) else None, text=texts, **options)


@dataclass
class RewardCollator:
    """Preference pairs to one batch of `2 * pairs` rows: the chosen conversations, then the rejected ones.

    Each pair's images are preprocessed once: `pixel_values` holds the images of the pairs (in pair order) a single
    time, and both halves of the batch use them (`VisionRewardTrainer.compute_loss` encodes them once). `margin`
    (`[pairs]`) is passed on when the rows have one.
    """

    processor: VLMProcessor
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        images = [_image_list(e.get("images")) for e in examples]
        texts = [render_conversation(self.processor, e["prompt"], e[side]) for side in ("chosen", "rejected") for e in examples]
        options = {"pad_to_multiple_of": self.pad_to_multiple_of} if self.pad_to_multiple_of else {}
        if not isinstance(self.processor, VLMProcessor):  # a stock VLM: every row carries its image inputs
            batch = dict(_encode(self.processor, texts, images + images, **options))
        else:
            batch = dict(_encode(self.processor, texts, images + images, return_pixel_values=False, **options))
        if any(images) and isinstance(self.processor, VLMProcessor):
            batch["pixel_values"] = self.processor(images=[i for i in images if i], return_tensors="pt")["pixel_values"]
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)
        return batch


def drop_long_pairs(dataset: Dataset, processor, max_length: int | None) -> Dataset:
    """The pairs whose chosen and rejected conversations both fit in `max_length` tokens (TRL's `RewardTrainer`
    rule). Long pairs are dropped rather than truncated: truncation would cut the answer, whose last token is where
    the reward is read."""
    if max_length is None:
        return dataset

    # The suite's processor counts image tokens from the images' number only: read the text columns and the image
    # count of each row. A stock processor's count can depend on the image (Qwen2-VL's grid): it gets the images.
    view = dataset.select_columns(["images", "prompt", "chosen", "rejected"])
    suite = isinstance(processor, VLMProcessor)
    if suite and isinstance(view.features["images"], (datasets.List, datasets.Sequence)):
        view = view.cast_column("images", datasets.List(datasets.Image(decode=False)))
    keep = []
    for start in range(0, len(view), 256):
        batch = view[start : start + 256]
        keys = [[object()] * len(_image_list(images)) if suite else _image_list(images) for images in batch["images"]]
        lengths = [
            _encode(
                processor,
                [render_conversation(processor, p, c) for p, c in zip(batch["prompt"], batch[side])],
                keys,
                return_pixel_values=False,
            )["attention_mask"].sum(-1)
            for side in ("chosen", "rejected")
        ]
        fits = (torch.maximum(*lengths) <= max_length).tolist()
        keep += [start + i for i, ok in enumerate(fits) if ok]
    kept = dataset.select(keep) if len(keep) < len(dataset) else dataset
    if len(kept) < len(dataset):
        logger.warning(
            "skipped %d of %d preference pairs longer than max_length=%d tokens", len(dataset) - len(kept), len(dataset),
            max_length,
        )
    if len(kept) == 0:
        raise ValueError(f"no preference pair fits in max_length={max_length}; raise it or set it to None")
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def answer_start_ids(processor) -> list[int]:
    """The token ids between a user's words and the assistant's answer in the processor's chat template (the end of
    the user turn and what `add_generation_prompt` appends: `<|im_end|>\\n<|im_start|>assistant\\n`, ` [/INST]`, ...):
    after their last occurrence in a rendered conversation comes the answer the likelihood feature scores.

    Raises:
        ValueError: the template renders no tokens between the user's words and the answer.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    words = "Is it red?"
    turn = [{"role": "user", "content": [{"type": "text", "text": words}]}]
    opened = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    words_end = opened.rindex(words) + len(words)
    encoded = tokenizer(opened, add_special_tokens=False, return_offsets_mapping=True)
    # The tokens that start after the words (a token that merges the words' end with the template's is left out).
    start = [token for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if begin >= words_end]
    if not start:
        raise ValueError(
            f"the chat template renders nothing between the user's words and the answer ({opened!r}): the likelihood "
            "feature cannot find where an answer starts"
        )
    return start


def reward_model_from_folder(path: str | os.PathLike, likelihood: bool = False, **kwargs) -> torch.nn.Module:
    """A reward model from a folder: a saved reward model as it is, or a VLM (the suite's or a stock one) with a new
    head at zero on its backbone; `likelihood`: with the likelihood feature (the LM head kept, see
    `VLMForRewardModeling`). `kwargs`: `from_pretrained` options (`dtype`, ...)."""
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    # Through `load_pretrained`: weights that do not fit are an error naming them, never a random start (the LM head
    # of a VLM folder and the new head are the classes' declared exceptions).
    if config.get("model_type") == "vlm_align":
        if likelihood and not config.get("likelihood_feature"):
            vlm_config = VLMConfig.from_pretrained(path)
            vlm_config.likelihood_feature = True
            vlm_config.answer_start_ids = answer_start_ids(load_processor(path))
            kwargs["config"] = vlm_config
        return load_pretrained(path, model_class=VLMForRewardModeling, **kwargs)
    if ImageTextForRewardModeling.__name__ in (config.get("architectures") or []):
        if likelihood and not config.get("likelihood_feature"):
            raise ValueError(f"{path} holds a reward model without the likelihood feature; start from its VLM instead")
        return load_pretrained(path, model_class=ImageTextForRewardModeling, **kwargs)
    start = answer_start_ids(load_processor(path)) if likelihood else None
    return ImageTextForRewardModeling.from_vlm(load_pretrained(path, **kwargs), likelihood=likelihood, answer_start_ids=start)


def load_reward_model_for_training(
    path: str, model_args: ModelConfig, likelihood: bool = False
) -> tuple[torch.nn.Module, object]:
    """A reward model to train, and its processor, on the VLM at `path` (a VLM folder, the suite's or a stock one;
    the LoRA output of a VLM run merged on load as `align.training.load_model` does; or a full reward model to
    train further), in full precision or with its LLM in 4 bit (`--load_in_4bit`; the split is logged);
    `likelihood`: with the likelihood feature (`VLMRewardConfig.likelihood_feature`)."""
    model = load_model(path, model_args, from_pretrained=partial(reward_model_from_folder, likelihood=likelihood))
    if is_adapter_dir(path):
        path = str(Path(path) / "merged")
    return model, load_processor(path)


# What a reward model adds to its backbone, trained in full: the score head, and the likelihood feature's scale.
HEADS = ("score", "likelihood_scale")


def prepare_reward_model(model: VLMForRewardModeling, model_args: ModelConfig) -> LoraConfig | None:
    """What trains: the score head (and the likelihood feature's scale) always, in full; besides it, LoRA on the LLM plus the stage's parts in full
    (`--use_peft`, `align.training.lora_config` with `score` added to `modules_to_save` and PEFT's sequence
    classification task type), or the stage's components (`freeze_for_stage`). Returns the LoRA config or None."""
    peft_config = lora_config(model_args, model)
    if peft_config is None:
        stage = getattr(model_args, "stage", "finetune")
        if family_of(model) is FAMILIES["vlm"]:
            freeze_for_stage(model, stage)
        else:
            freeze_components(model, stage)
        for head in HEADS:
            if hasattr(model, head):
                getattr(model, head).requires_grad_(True)
        logger.info("score head trainable (%d parameters)", model.score.weight.numel())
        return None
    if peft_config.task_type not in (None, "SEQ_CLS"):
        logger.info("LoRA task type %s -> SEQ_CLS for the reward model", peft_config.task_type)
    peft_config.task_type = "SEQ_CLS"
    model_args.lora_task_type = "SEQ_CLS"
    peft_config.modules_to_save = sorted({*(peft_config.modules_to_save or []), *(h for h in HEADS if hasattr(model, h))})
    model_args.lora_modules_to_save = list(peft_config.modules_to_save)
    targets = peft_config.target_modules
    logger.info(
        "LoRA r=%d alpha=%d on %s; trained in full: %s", peft_config.r, peft_config.lora_alpha,
        targets if isinstance(targets, str) else sorted(targets), ", ".join(peft_config.modules_to_save),
    )
    return peft_config


def _reward_model_of(model) -> VLMForRewardModeling | ImageTextForRewardModeling:
    """The reward model inside a PEFT (and/or DDP) wrapper."""
    model = getattr(model, "module", model)
    if is_peft_model(model):
        model = model.get_base_model()
    if not isinstance(model, REWARD_MODEL_CLASSES):
        raise TypeError(f"expected a VLMForRewardModeling or ImageTextForRewardModeling (or a PEFT model around one), "
                        f"got {type(model).__name__}")
    return model


def load_reward_model(
    path: str | os.PathLike, quantization_config=None, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, VLMProcessor]:
    """Load a trained reward model for scoring: a full reward-model folder, or a LoRA adapter folder over its base
    (the VLM the reward model was trained on; the adapter carries the score head).

    Args:
        path: the reward recipe's output folder.
        quantization_config: e.g. a 4-bit `BitsAndBytesConfig` to load the (base) LLM in 4 bit.
        device: where the model goes (ignored for quantized models, which bitsandbytes places itself).

    Returns:
        `(model, processor)`: the `VLMForRewardModeling` (a `PeftModel` around it for an adapter), in eval mode, and
        the processor saved with it (else its base's).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"reward model path {path} is not a directory")
    if not is_adapter_dir(path):
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if not {c.__name__ for c in REWARD_MODEL_CLASSES} & set(config.get("architectures") or []):
            raise ValueError(
                f"{path} holds no reward model (architectures: {config.get('architectures')}); train one with "
                "recipes/reward.py, or wrap a VLM with VLMForRewardModeling.from_vlm"
            )
    # An adapter's base is the VLM the reward model was trained on: a new head there, the adapter carries the score
    # (and the likelihood feature's scale, whose presence says that the base keeps its LM head).
    builder = reward_model_from_folder
    if is_adapter_dir(path):
        saved = json.loads((path / "adapter_config.json").read_text()).get("modules_to_save") or []
        builder = partial(reward_model_from_folder, likelihood="likelihood_scale" in saved)
    return load_run(path, builder=builder, quantization_config=quantization_config, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


def _is_score(parameter_name: str) -> bool:
    """Whether a parameter belongs to the score head (`score.weight`, or PEFT's `...score.modules_to_save...`)."""
    return "score" in parameter_name.split(".")


def pair_image_inputs(model, pixel_values: torch.Tensor, repeat: bool = True) -> dict[str, torch.Tensor]:
    """The visual inputs of a `2 * pairs` batch from the pairs' images, which both halves share (`repeat=False`:
    of a batch of packed pairs, one row per pair).

    With frozen vision towers (LoRA, and every stage but `prealign`/`full`), the towers run once per image (no
    gradient needed) and their features are repeated for the two halves: the projectors and the LLM still run
    inside the model's forward, with gradients. With trainable towers, the pixels are repeated instead, so that the
    towers stay inside the (DDP-wrapped) forward.
    """
    reward_model = _reward_model_of(model)
    towers = reward_model.model.vision_towers
    copies = 2 if repeat else 1
    if any(p.requires_grad for p in towers.parameters()):
        return {"pixel_values": torch.cat([pixel_values] * copies)}
    with torch.no_grad():
        features = pack_image_features(reward_model.model.get_vision_features(pixel_values))
    return {"image_features": torch.cat([features] * copies)}


def pack_reward_pairs(
    batch: dict, dtype: torch.dtype = torch.float32, image_token_id: int | None = None,
    answer_start: list[int] | None = None,
) -> dict | None:
    """One sequence per preference pair from `RewardCollator`'s batch (`[chosen rows; rejected rows]`, right-padded,
    a pair's rows starting with the same image and prompt): with P the leading columns every pair shares (real
    tokens, equal in both rows), `[the P shared columns | chosen's columns P.. | rejected's columns P..]`.

    The rejected tokens see the shared prompt and each other, never the chosen ones; each token keeps the position
    it has unpacked, so every hidden state, and the score at each answer's last real token, is the unpacked one. The
    image and the prompt (most of a row: the visual tokens) go through the LLM once per pair instead of twice.

    Returns:
        `input_ids`, `attention_mask` (4-D, additive, in `dtype`), `position_ids`, `score_positions` (`[pairs, 2]`:
        where the chosen and the rejected answer end), with `answer_start` (`config.answer_start_ids` of a reward
        model with the likelihood feature) `likelihood_tokens` and `predecessors` (what `VLMForRewardModeling`
        sums for each answer, as in its unpacked row), and the pairs' `pixel_values` (once per pair, as collated);
        None when the batch cannot be packed (no shared prompt, an image placeholder after it, or inputs this packing
        does not know, such as a stock processor's `image_grid_thw` or a cross-attention mask).
    """
    ids, attention = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    if rows % 2 or attention.dim() != 2 or set(batch) - {"input_ids", "attention_mask", "pixel_values"}:
        return None
    pairs = rows // 2
    shared = (ids[:pairs] == ids[pairs:]) & (attention[:pairs] == 1) & (attention[pairs:] == 1)
    prompt = int(shared.all(dim=0).long().cumprod(0).sum())
    if prompt < 1 or prompt == width or (image_token_id is not None and (ids[pairs:, prompt:] == image_token_id).any()):
        return None
    device, answer = ids.device, width - prompt
    packed = torch.cat([ids[:pairs], ids[pairs:, prompt:]], dim=1)  # [pairs, 2W - P]
    keys = torch.cat([attention[:pairs], attention[pairs:, prompt:]], dim=1).bool()
    segment = torch.cat([
        torch.zeros(prompt, dtype=torch.long), torch.ones(answer, dtype=torch.long), torch.full((answer,), 2, dtype=torch.long),
    ]).to(device)
    position = torch.arange(packed.shape[1], device=device)
    allowed = position[None, :] <= position[:, None]  # causal in packed order
    allowed &= ~((segment[:, None] == 2) & (segment[None, :] == 1))  # the rejected answer does not see the chosen one
    allowed = allowed[None] & keys[:, None, :]
    allowed |= torch.eye(packed.shape[1], dtype=torch.bool, device=device)[None]  # padding attends to itself
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    counted = (attention.long().cumsum(-1) - 1).clamp(min=0)  # each row's positions, as the model counts them
    positions = torch.cat([counted[:pairs], counted[pairs:, prompt:]], dim=1)
    last = last_token_indices(attention)
    rejected_last = torch.where(last[pairs:] >= prompt, last[pairs:] + answer, last[pairs:])

    packed_batch = {
        "input_ids": packed, "attention_mask": additive[:, None], "position_ids": positions,
        "score_positions": torch.stack([last[:pairs], rejected_last], dim=1),
    }
    if answer_start is not None:
        # The likelihood feature's tokens (`VLMForRewardModeling.log_likelihood`): each answer's tokens as in its
        # unpacked row (a first answer token both share lies in the shared columns), each predicted from the column
        # before it in its own row: the rejected answer's first packed column from the shared columns' last.
        answers = answer_tokens(ids, attention, answer_start)
        tokens = torch.zeros(pairs, packed.shape[1], 2, dtype=torch.bool, device=device)
        tokens[:, :width, 0] = answers[:pairs]
        tokens[:, :prompt, 1] = answers[pairs:, :prompt]
        tokens[:, width:, 1] = answers[pairs:, prompt:]
        predecessors = (position - 1).clamp(min=0)
        predecessors[width] = prompt - 1
        packed_batch.update(likelihood_tokens=tokens, predecessors=predecessors.expand(pairs, -1))
    if batch.get("pixel_values") is not None:
        packed_batch["pixel_values"] = batch["pixel_values"]
    return packed_batch


def pairwise_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` of `VisionRewardTrainer`: pairwise accuracy (ties half) and mean margin of the eval pairs."""
    chosen, rejected = (torch.as_tensor(p).flatten() for p in prediction.predictions)
    return {"accuracy": pairwise_accuracy(chosen, rejected), "margin": (chosen - rejected).mean().item()}


class VisionRewardTrainer(Trainer):
    """`transformers.Trainer` for a VLM reward model on preference pairs (see the module docstring for why not TRL's
    `RewardTrainer`).

    Overridden: `compute_loss` (the Bradley-Terry loss on both sides of the pairs, images encoded once, TRL's reward
    metrics recorded), `log` (adds those metrics, as TRL's trainers do), `_set_signature_columns_if_needed` (the
    raw pair columns reach the collator instead of being dropped as unknown to the model's forward) and
    `create_optimizer` (the head's own learning rate, `VLMRewardConfig.score_learning_rate`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # At evaluation the Trainer calls compute_loss only when it can return a loss without labels.
        self.can_return_loss = True
        self.label_names = []
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS)

    def create_optimizer(self, model=None):
        # The Trainer's optimizer, with the score head's parameters moved to a group of their own learning rate.
        optimizer = super().create_optimizer(model)
        head_lr = getattr(self.args, "score_learning_rate", None)
        if head_lr is None or getattr(self, "_head_group_added", False):
            return optimizer
        head = {id(p) for name, p in (model or self.model).named_parameters() if p.requires_grad and _is_score(name)}
        for group in list(optimizer.param_groups):
            params = [p for p in group["params"] if id(p) in head]
            if params:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": params, "lr": head_lr})
        self._head_group_added = True
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        margin = inputs.pop("margin", None)
        reward_model = _reward_model_of(model)
        # One forward per pair, the image and prompt shared by both answers (`pack_reward_pairs`); transformers'
        # Trainer and TRL's RewardTrainer run the two rows apart, so the prompt (mostly visual tokens) costs twice.
        packable = isinstance(reward_model, VLMForRewardModeling) and getattr(self.args, "pack_pairs", True)
        answer_start = reward_model.config.answer_start_ids if getattr(reward_model, "likelihood_feature", False) else None
        packed = pack_reward_pairs(inputs, reward_model.dtype, reward_model.config.image_token_id, answer_start) if packable else None
        if packed is not None:
            pixel_values = packed.pop("pixel_values", None)
            if pixel_values is not None:
                packed.update(pair_image_inputs(model, pixel_values, repeat=False))
            chosen, rejected = model(**packed, use_cache=False).logits.float().unbind(-1)
        else:
            if isinstance(reward_model, VLMForRewardModeling) and inputs.get("pixel_values") is not None:
                inputs.update(pair_image_inputs(model, inputs.pop("pixel_values")))
            rewards = model(**inputs, use_cache=False).logits.squeeze(-1).float()
            chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, margin)
        if self.args.center_rewards_coefficient is not None:
            # Mean-zero rewards, arXiv:2312.09244 eq. 2 (TRL's `center_rewards_coefficient`).
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)

        mode = "train" if model.training else "eval"
        with torch.no_grad():
            gathered_chosen = self.accelerator.gather_for_metrics(chosen.detach())
            gathered_rejected = self.accelerator.gather_for_metrics(rejected.detach())
            self._metrics[mode]["accuracy"].append(pairwise_accuracy(gathered_chosen.cpu(), gathered_rejected.cpu()))
            self._metrics[mode]["margin"].append((gathered_chosen - gathered_rejected).mean().item())
            self._metrics[mode]["mean_reward"].append(torch.cat([gathered_chosen, gathered_rejected]).mean().item())
        if return_outputs:
            return loss, {"chosen": chosen.detach(), "rejected": rejected.detach()}
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            # The eval loop's own `eval_accuracy` (all pairs at once, from `pairwise_metrics`) is kept.
            metrics = {f"eval_{key}": value for key, value in metrics.items() if f"eval_{key}" not in logs}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()


def _check_reward_config(args: RewardConfig) -> None:
    # The reward model must read conversations exactly as the policy does: same chat template, tokens and padding.
    for name in ("chat_template_path", "eos_token", "pad_token"):
        if getattr(args, name) is not None:
            raise ValueError(
                f"{name} is not supported for a VLM reward model: it renders conversations with the processor's own "
                "chat template and tokens, as the policy does; leave it unset"
            )
    if args.model_init_kwargs:
        raise ValueError("model_init_kwargs is not used: the recipe loads the model (set dtype etc. in the model args)")
    if args.activation_offloading:
        raise ValueError("activation_offloading is not supported by the VLM reward trainer")


def reward_trainer(
    model: VLMForRewardModeling,
    args: RewardConfig | VLMRewardConfig,
    train_dataset: Dataset,
    processing_class: VLMProcessor,
    peft_config: LoraConfig | None = None,
    eval_dataset: Dataset | None = None,
    callbacks: list | None = None,
) -> VisionRewardTrainer:
    """The `VisionRewardTrainer` for `model` on preference rows, set up as TRL's `RewardTrainer` would be.

    Args:
        model: the bare reward model (wrapped in LoRA here when `peft_config` is given).
        args: a `VLMRewardConfig` (or TRL's `RewardConfig`); `max_length` drops longer pairs, `disable_dropout`, `center_rewards_coefficient`
            and `pad_to_multiple_of` apply; options that would change how conversations are tokenized are refused.
        train_dataset: rows with `images`, `prompt`, `chosen`, `rejected` (and optionally `margin`).
        processing_class: the VLM's processor.
        peft_config: the LoRA config (`prepare_reward_model`), or None for full fine-tuning.
        eval_dataset: pairs for the Trainer's own evaluation (`eval_strategy`), reported as `eval_accuracy`.
        callbacks: extra `TrainerCallback`s.
    """
    _check_reward_config(args)
    if not isinstance(model, REWARD_MODEL_CLASSES):
        raise TypeError(f"reward_trainer takes a VLMForRewardModeling or ImageTextForRewardModeling, got {type(model).__name__}")
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
        if args.activation_checkpointing:
            model.enable_input_require_grads()
        if quantized:
            # QLoRA keeps its trained weights in bf16 (arXiv:2305.14314 sec. 3), as TRL's trainers do.
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and "lora_magnitude_vector" not in name:
                    parameter.data = parameter.data.to(torch.bfloat16)
    if args.disable_dropout:
        disable_dropout_in_model(model)
    train_dataset = drop_long_pairs(train_dataset, processing_class, args.max_length)
    if eval_dataset is not None:
        eval_dataset = drop_long_pairs(eval_dataset, processing_class, args.max_length)
    return VisionRewardTrainer(
        model=model,
        args=args,
        data_collator=RewardCollator(processing_class, pad_to_multiple_of=args.pad_to_multiple_of),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        compute_metrics=pairwise_metrics,
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batched_scores(model, processor, rows, batch_size: int, score_batch) -> list[float]:
    """Score `rows` (`images`, `prompt`, `completion`) in length-sorted, right-padded batches without gradients, in
    eval mode (the model's mode restored afterwards), and return one float per row in the rows' order.
    `score_batch(inputs, prompts, images)` gets a batch's processor outputs, its rows' prompts and image lists."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows) if not isinstance(rows, Dataset) else rows
    texts = [render_conversation(processor, row["prompt"], row["completion"]) for row in rows]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = _device(model)
    was_training = model.training
    model.eval()
    scores: list[float | None] = [None] * len(texts)
    try:
        with torch.no_grad():
            for first in range(0, len(order), batch_size):
                indices = order[first : first + batch_size]
                images = [_image_list(rows[i]["images"] if "images" in rows[i] else None) for i in indices]
                inputs = _encode(processor, [texts[i] for i in indices], images).to(device)
                prompts = [rows[i]["prompt"] for i in indices]
                for index, score in zip(indices, score_batch(inputs, prompts, images)):
                    scores[index] = score
    finally:
        model.train(was_training)
    return scores


def reward_scores(model, processor, rows, batch_size: int = 16) -> list[float]:
    """The reward of each row's answer, in the rows' order.

    Conversations are rendered with the processor's chat template (`render_conversation`, as in training and as the
    policy sees them), batched by length, right-padded, scored without gradients in eval mode (the model's mode is
    restored afterwards). A row's score does not depend on the batch it lands in.

    Args:
        model: a `VLMForRewardModeling` (or a `PeftModel` around one), e.g. from `load_reward_model`.
        processor: its `VLMProcessor`.
        rows: a `Dataset` or a list of dicts with `images` (a list of PIL images, or one image), `prompt` (TRL
            conversational messages: the user turns) and `completion` (assistant messages, or the answer text).
        batch_size: conversations per forward.

    Returns:
        One float per row.
    """

    def score_batch(inputs, prompts, images):
        return model(**inputs, use_cache=False).logits.squeeze(-1).float().cpu().tolist()

    return _batched_scores(model, processor, rows, batch_size, score_batch)


def likelihood_scores(model, processor, rows, batch_size: int = 16) -> list[float]:
    """Each row's answer log-likelihood under a VLM (the policy), in the rows' order: the summed log-probabilities of
    the tokens after the prompt (the answer, its end-of-turn marker and what the chat template writes after a turn).

    Ordering a pair's answers by it is the policy's own preference, no reward model involved: the baseline a reward
    model trained from that policy has to beat (the policy may already rank answers it would not generate greedily).
    Rendered and batched as `reward_scores`; the prompt is the conversation up to the assistant's turn
    (`add_generation_prompt`), and each rendered row must begin with its prompt's tokens.

    Args:
        model: a VLM with an LM head (`VLMForConditionalGeneration`, a stock `*ForConditionalGeneration`, or a
            `PeftModel` around one, e.g. from `align.loading.load_run`).
        processor: its processor.
        rows: as for `reward_scores`.
        batch_size: conversations per forward.

    Returns:
        One float (nats, <= 0) per row.
    """

    def score_batch(inputs, prompts, images):
        prompt_texts = [processor.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]
        prompt_ids = _encode(processor, prompt_texts, images, return_pixel_values=False)
        lengths = prompt_ids["attention_mask"].sum(dim=1).tolist()
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        for row, length in enumerate(lengths):
            if not torch.equal(ids[row, :length].cpu(), prompt_ids["input_ids"][row, :length]):
                raise ValueError(f"the answer of {prompt_texts[row]!r} does not tokenize as a continuation of its prompt")
        # Logits only from the shortest prompt's last token on, and log-probabilities only at answer tokens: the
        # full [batch, length, vocabulary] in float32 would not fit at real sizes.
        start = min(lengths) - 1
        logits = model(**inputs, use_cache=False, logits_to_keep=ids.shape[1] - start).logits[:, :-1]
        targets = ids[:, start + 1 :]
        positions = torch.arange(start + 1, ids.shape[1], device=ids.device)[None]
        answer = (positions >= torch.tensor(lengths, device=ids.device)[:, None]) & attention[:, start + 1 :].bool()
        token_logps = torch.log_softmax(logits[answer].float(), dim=-1).gather(-1, targets[answer][:, None])[:, 0]
        rows = answer.nonzero()[:, 0]
        sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add_(0, rows, token_logps)
        return sums.cpu().tolist()

    return _batched_scores(model, processor, rows, batch_size, score_batch)


def evaluate_pairs(model, processor, pairs_dataset, batch_size: int = 16, scorer=reward_scores) -> dict:
    """Pairwise accuracy of a reward model on preference pairs (`images`, `prompt`, `chosen`, `rejected`); with
    `scorer=likelihood_scores` and a policy for `model`, of the policy's own preference.

    Returns:
        `accuracy` (ties count half, see `pairwise_accuracy`), `pairs`, `mean_margin` (mean of r_chosen -
        r_rejected), `ties`, and, when the pairs have a `category` column, `accuracy_<category>` and
        `pairs_<category>` for each category.
    """
    pairs = list(pairs_dataset) if not isinstance(pairs_dataset, Dataset) else pairs_dataset
    if len(pairs) == 0:
        raise ValueError("no preference pairs to evaluate")
    rows = [
        {"images": pair["images"], "prompt": pair["prompt"], "completion": pair[side]}
        for side in ("chosen", "rejected")
        for pair in pairs
    ]
    scores = torch.tensor(scorer(model, processor, rows, batch_size=batch_size), dtype=torch.float64)
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    result = {
        "accuracy": pairwise_accuracy(chosen, rejected),
        "pairs": len(pairs),
        "mean_margin": (chosen - rejected).mean().item(),
        "ties": int((chosen == rejected).sum()),
    }
    if isinstance(pairs, Dataset):
        categories = pairs["category"] if "category" in pairs.column_names else None
    else:
        categories = [pair.get("category") for pair in pairs]
    if categories is not None and all(c is not None for c in categories):
        by_category = defaultdict(list)
        for index, category in enumerate(categories):
            by_category[category].append(index)
        for category in sorted(by_category):
            indices = torch.tensor(by_category[category])
            result[f"accuracy_{category}"] = pairwise_accuracy(chosen[indices], rejected[indices])
            result[f"pairs_{category}"] = len(indices)
    return result


def held_out_accuracy(trainer, processor, pairs: Dataset | None, when: str) -> dict:
    """`evaluate_pairs` of the trainer's model on the held-out `pairs`, run and logged on the main process only
    (the other processes wait and get `{}`, as they do when `pairs` is None)."""
    result = {}
    if pairs is not None and trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = evaluate_pairs(model, processor, pairs, batch_size=trainer.args.per_device_eval_batch_size)
        logger.info("held-out pairwise accuracy %s training: %.1f%% of %d pairs", when, 100 * result["accuracy"], result["pairs"])
    trainer.accelerator.wait_for_everyone()
    return result


def policy_likelihood_accuracy(
    model_name_or_path: str, pairs: Dataset | None, batch_size: int = 16, dtype: str | None = None
) -> dict:
    """`evaluate_pairs` of the policy at `model_name_or_path` (a VLM folder or a LoRA run over one, `load_run`) with
    `likelihood_scores`: how often the policy itself finds the chosen answer likelier. `{}` without pairs.

    The random state is left as it was: loading a LoRA run initialises its layers (PEFT draws from torch's generator
    before loading the weights), and the reward model trained next must not depend on whether this ran."""
    if pairs is None:
        return {}
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        policy, processor = load_run(model_name_or_path, dtype=dtype)
        result = evaluate_pairs(policy, processor, pairs, batch_size=batch_size, scorer=likelihood_scores)
    logger.info("held-out pairwise accuracy of the policy's likelihood: %.1f%% of %d pairs", 100 * result["accuracy"], result["pairs"])
    return result


def accuracy_table(before: dict, after: dict, likelihood: dict | None = None) -> str:
    """A Markdown table of held-out pairwise accuracy before and after training, overall and per category, with a
    column for the policy's own likelihood (`policy_likelihood_accuracy`) when given."""
    categories = [key.removeprefix("pairs_") for key in after if key.startswith("pairs_")]
    lines = ["| pairs | n | before | after |", "|---|---:|---:|---:|"]
    if likelihood:
        lines = ["| pairs | n | before | after | the policy's likelihood |", "|---|---:|---:|---:|---:|"]
    for name, accuracy_key, count_key in [("all", "accuracy", "pairs")] + [
        (c, f"accuracy_{c}", f"pairs_{c}") for c in categories
    ]:
        b, a = before.get(accuracy_key, math.nan), after.get(accuracy_key, math.nan)
        line = f"| {name} | {after[count_key]} | {100 * b:.1f}% | {100 * a:.1f}% |"
        if likelihood:
            line += f" {100 * likelihood.get(accuracy_key, math.nan):.1f}% |"
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "PAIR_COLUMNS",
    "RewardCollator",
    "RewardScriptArguments",
    "VLMRewardConfig",
    "VisionRewardTrainer",
    "accuracy_table",
    "bradley_terry_loss",
    "drop_long_pairs",
    "evaluate_pairs",
    "held_out_accuracy",
    "held_out_pairs",
    "likelihood_scores",
    "load_reward_model_for_training",
    "load_reward_model",
    "pair_image_inputs",
    "pairwise_accuracy",
    "pairwise_metrics",
    "policy_likelihood_accuracy",
    "prepare_reward_model",
    "render_conversation",
    "reward_scores",
    "reward_trainer",
]
