"""DPO on vision preference pairs: the data (the world's verified-vs-wrong answers, or a mixture of local
preference sets) and TRL's `DPOTrainer` with reference log-probs precomputed once for vision data.

TRL refuses `precompute_ref_log_probs=True` for vision datasets: its vision collator turns images into pixels on
the fly, so TRL never runs a whole pass over them, and its vision column list would drop the precomputed columns.
For a small LoRA run that is the wrong trade: the reference forward (adapters disabled, or a separate model) costs
as much as the policy's forward at every step, for values that never change. `dpo_trainer` builds the trainer with
the flag off, runs one reference pass over the data with TRL's own collator and `compute_ref_log_probs`, adds the
`ref_chosen_logps`/`ref_rejected_logps` columns TRL's loss reads, and switches the trainer to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset, Value
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from align.data import build_mixture
from align.data.mixture import WorldPairArguments
from align.families import family_of
from align.runs import RunArguments
from align.sft import CachedFeatureDataArguments, checked
from align.towers import TowerMemo, memoize_stock_towers, vlm_models

logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class DPOScriptArguments(WorldPairArguments, CachedFeatureDataArguments, RunArguments):
    """Data and reference model of the DPO recipe."""

    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model (a VLM directory). Default: with --use_peft, the policy with its adapters "
            "disabled; without, a frozen copy of --model_name_or_path."
        },
    )


def preference_dataset(args: DPOScriptArguments, output_dir: str, seed: int, main_process: bool = True) -> Dataset:
    """Preference rows (`images`, `prompt`, `chosen`, `rejected`, ...), bad rows skipped and listed in
    `output_dir/rejects.jsonl` (written by the main process only).

    By default, pairs from the shapes world (`world_preference_rows`): chosen is the verified answer, rejected a
    plausible wrong answer of the same category.

    Raises:
        ValueError: when the data is missing, empty, or has no usable row.
    """
    if args.datasets:
        return build_mixture(args, rejects_dir=output_dir if main_process else None, kind="preference")
    return checked(args.world_pairs(seed), "preference", "shapes world preference pairs", output_dir, main_process)


# ---------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs for vision data
# ---------------------------------------------------------------------------------------------------------------


class VisionDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer`, keeping the precomputed reference columns of a vision dataset, and encoding each pair's
    image once (`align.towers.TowerMemo`; TRL's collator hands it over twice, for chosen and rejected).

    `_set_signature_columns_if_needed` is overridden: for vision data TRL keeps just the raw columns its
    collator reads (`prompt`, `chosen`, `rejected`, `images`, ...) and drops the rest before batching, which would
    drop `ref_chosen_logps`/`ref_rejected_logps` too.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "cross_attention_mask" in family_of(self.model).image_inputs and self._is_vision_dataset:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self.data_collator = MllamaPreferenceCollator(self.data_collator, tokenizer.bos_token_id)
        # TRL's vision collator repeats each pair's images for chosen and rejected: encode each copy once.
        self.tower_memos = [TowerMemo(vlm, keep=False) for vlm in vlm_models(self.model, self.ref_model)]
        self.shared_prefix = bool(self.tower_memos)  # packing needs the suite's VLM (4-D masks, shift_labels)
        # A stock VLM: TRL's two rows per pair, each image encoded once within the call.
        self.row_memos = [] if self.shared_prefix else memoize_stock_towers(self.model, self.ref_model)

    @property
    def images_encoded(self) -> int:
        return sum(memo.images_encoded for memo in [*self.tower_memos, *self.row_memos])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Chosen and rejected share their image and prompt: one forward per pair (SharedPrefixModel).
        if self.shared_prefix:
            model = SharedPrefixModel(model, inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        if self.shared_prefix:
            model = SharedPrefixModel(model, inputs)
        return super().compute_ref_log_probs(model, inputs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._is_vision_dataset:
            self._signature_columns = [*self._signature_columns, *(c for c in REF_COLUMNS if c not in self._signature_columns)]


@dataclass
class MllamaPreferenceCollator:
    """TRL's vision preference collator, fixed for Mllama (Llama 3.2 Vision) by composition, in two ways.

    - `MllamaProcessor` puts `<|begin_of_text|>` before any text that lacks one, `add_special_tokens=False`
      notwithstanding, so TRL's separately processed completions each start with a stray BOS, which the policy
      would be trained (and the reference scored) on. It is dropped here.
    - The processor builds `cross_attention_mask` (`[batch, tokens, images, tiles]`: which image tiles each text
      token reads) for the left-padded prompts only; TRL appends the completions and flushes every row left
      (`token_type_ids` and `mm_token_type_ids` are kept in step, this key is not), so the mask no longer lines up
      with `input_ids` and the model fails on the length. Here each row's prompt part is shifted as TRL shifted its
      tokens, and every completion token reads what the prompt's last token reads (the processor's own rule: a
      token sees the images before it); padding reads nothing.
    """

    collator: Callable
    bos_token_id: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        mask = batch.get("cross_attention_mask")
        if mask is None:
            return batch
        if self.bos_token_id is not None:
            _drop_completion_bos(batch, self.bos_token_id)
        attention, completion = batch["attention_mask"], batch["completion_mask"].bool()
        rows, length = attention.shape
        width = mask.shape[1]  # the padded prompt length
        extended = mask.new_zeros((rows, length, *mask.shape[2:]))
        for row in range(rows):
            starts = completion[row].nonzero()
            prompt = int(starts[0]) if len(starts) else int(attention[row].sum())  # tokens before the completion
            kept = min(prompt, length)
            extended[row, :kept] = mask[row, width - prompt:width - prompt + kept]
            rest = attention[row, kept:].bool()
            extended[row, kept:][rest] = mask[row, width - 1]
        batch["cross_attention_mask"] = extended
        return batch


def _drop_completion_bos(batch: dict, bos_token_id: int) -> None:
    """Remove, in place, a BOS token at the start of each row's completion (rows flushed left, right-padded)."""
    input_ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    for row in range(input_ids.shape[0]):
        starts = completion[row].nonzero()
        if not len(starts) or input_ids[row, int(starts[0])] != bos_token_id:
            continue
        at = int(starts[0])
        for tensor in (input_ids, attention, completion):
            tensor[row, at:-1] = tensor[row, at + 1:].clone()
            tensor[row, -1] = 0  # a padding position (masked out: its id is never read)
    used = int(attention.sum(-1).max())  # drop the columns now padding in every row
    for key in ("input_ids", "attention_mask", "completion_mask"):
        batch[key] = batch[key][:, :used]


@dataclass
class WithReferenceLogps:
    """A collator that builds the batch with `collator` (TRL's vision preference collator) and adds the rows'
    precomputed reference log-probs as `[batch]` tensors, as TRL's text collator does."""

    collator: Callable

    def __call__(self, examples: list[dict]) -> dict:
        references = {c: torch.tensor([e[c] for e in examples], dtype=torch.float32) for c in REF_COLUMNS if c in examples[0]}
        batch = self.collator([{k: v for k, v in e.items() if k not in REF_COLUMNS} for e in examples])
        batch.update(references)
        return batch


def reference_logps(trainer: DPOTrainer, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair of `dataset`, in row order, with the trainer's collator and reference
    (`compute_ref_log_probs`: the separate reference model, or the policy with its adapters disabled).

    Runs on every process: batches are sharded over the processes and gathered back in order.
    """
    loader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False, num_workers=0)
    )
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for batch in loader:
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
            ref_chosen, ref_rejected = trainer.accelerator.gather_for_metrics((ref_chosen, ref_rejected))
            chosen.append(ref_chosen.float().cpu())
            rejected.append(ref_rejected.float().cpu())
    finally:
        model.train(training)
    return torch.cat(chosen), torch.cat(rejected)


def add_reference_logps(trainer: DPOTrainer, dataset: Dataset, batch_size: int) -> Dataset:
    """`dataset` with `ref_chosen_logps` and `ref_rejected_logps` columns (float32, one value per row)."""
    chosen, rejected = reference_logps(trainer, dataset, batch_size)
    if len(chosen) != len(dataset):
        raise RuntimeError(f"computed {len(chosen)} reference log-probs for {len(dataset)} rows")
    dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist(), feature=Value("float32"))
    return dataset.add_column(REF_COLUMNS[1], rejected.tolist(), feature=Value("float32"))


def precompute_reference(trainer: DPOTrainer, batch_size: int | None = None) -> None:
    """Precompute the reference log-probs of the trainer's datasets once and make its loss read them.

    Afterwards the trainer runs no reference forward during training or evaluation, and a separate reference
    model is released.
    """
    logger.info("precomputing the reference log-probs of %d preference pairs", len(trainer.train_dataset))
    args = trainer.args
    train_batch = batch_size or args.precompute_ref_batch_size or args.per_device_train_batch_size
    eval_batch = batch_size or args.precompute_ref_batch_size or args.per_device_eval_batch_size
    trainer.train_dataset = add_reference_logps(trainer, trainer.train_dataset, train_batch)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {k: add_reference_logps(trainer, v, eval_batch) for k, v in trainer.eval_dataset.items()}
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = add_reference_logps(trainer, trainer.eval_dataset, eval_batch)
    trainer.data_collator = WithReferenceLogps(trainer.data_collator)
    trainer.precompute_ref_logps = True
    trainer.ref_model = None
    logger.info("precomputed the reference log-probs of %d preference pairs", len(trainer.train_dataset))


# ---------------------------------------------------------------------------------------------------------------
# One forward per pair: the image and prompt shared by chosen and rejected
# ---------------------------------------------------------------------------------------------------------------

FUSED_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def pack_pairs(batch: dict) -> dict | None:
    """One sequence per preference pair from TRL's batch (`[chosen rows; rejected rows]` of width W, a pair's two rows
    starting with the same prompt): with P the leading columns where no row has a completion token (the shortest
    prompt), `[the P shared columns | chosen's columns P.. | copy of column P-1 | rejected's columns P..]`; whatever
    follows the shared columns (a longer prompt's tail, the answer, padding) is kept per row.

    The copy of the prompt's last token stands where the rejected answer starts: it has that token's position and
    sees the prompt as the original does (not the chosen answer), so its hidden state is the original's, and it
    scores the rejected answer's first token while the original scores the chosen's. The rejected tokens see the
    prompt without its last token (the copy stands for it), the copy and the rejected tokens before them; the chosen
    tokens never see the rejected ones (they come later). Each row keeps the positions the model gives it unpacked.
    The images go in once per pair.

    Returns:
        `input_ids`, `attention_mask` (4-D, additive), `position_ids`, `shift_labels` (each position's next-token
        label, -100 where none), the model's other inputs halved to the pairs, and `index` (the packed position of
        each log-prob of TRL's `[2B, P + C - 1]` layout); None when the rows do not share their prompts.
    """
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    rows, width = ids.shape
    if rows % 2 or completion.shape != ids.shape:
        return None
    pairs = rows // 2
    in_prompt = (completion == 0).all(dim=0)
    prompt = int(in_prompt.long().cumprod(0).sum())  # P: the leading columns no completion reaches
    if prompt < 1 or prompt == width:
        return None
    if not (torch.equal(ids[:pairs, :prompt], ids[pairs:, :prompt]) and torch.equal(attention[:pairs, :prompt], attention[pairs:, :prompt])):
        return None
    answer = width - prompt  # the columns after the shared ones
    device = ids.device
    chosen, rejected = ids[:pairs], ids[pairs:]
    packed = torch.cat([chosen, chosen[:, prompt - 1 : prompt], rejected[:, prompt:]], dim=1)  # [B, W + 1 + W - P]
    length = packed.shape[1]
    keys = torch.cat([attention[:pairs], attention[:pairs, prompt - 1 : prompt], attention[pairs:, prompt:]], dim=1).bool()

    # Segments: 0 prompt, 1 chosen, 2 the copy, 3 rejected.
    segment = torch.cat([
        torch.zeros(prompt, dtype=torch.long), torch.ones(answer, dtype=torch.long),
        torch.full((1,), 2, dtype=torch.long), torch.full((answer,), 3, dtype=torch.long),
    ]).to(device)
    position = torch.arange(length, device=device)
    q_seg, k_seg = segment[:, None], segment[None, :]
    allowed = position[None, :] <= position[:, None]  # causal in packed order
    allowed &= ~((q_seg >= 2) & (k_seg == 1))  # the copy and the rejected answer do not see the chosen one
    last_prompt = position == prompt - 1
    allowed &= ~((q_seg >= 2) & last_prompt[None, :])  # nor the original last prompt token: the copy stands for it
    allowed = allowed[None] & keys[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]  # padding rows attend to themselves
    dtype = batch.get("pixel_values", torch.zeros((), dtype=torch.float32)).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    counted = (attention.long().cumsum(-1) - 1).clamp(min=0)  # each row's positions, as the model counts them
    positions = torch.cat([counted[:pairs], counted[:pairs, prompt - 1 : prompt], counted[pairs:, prompt:]], dim=1)

    labels = torch.full_like(packed, -100)
    targets_chosen = chosen[:, prompt:].masked_fill(completion[:pairs, prompt:] == 0, -100)
    targets_rejected = rejected[:, prompt:].masked_fill(completion[pairs:, prompt:] == 0, -100)
    labels[:, prompt - 1 : prompt - 1 + answer] = targets_chosen  # the original last prompt token onwards
    labels[:, prompt + answer : prompt + answer + answer] = targets_rejected  # the copy onwards

    # TRL's layout scores token t+1 at position t: [2B, W - 1]. Chosen rows read the same packed positions;
    # rejected rows read position P - 1 + j from the copy onwards, the prompt part (no label) from the prompt.
    base = torch.arange(width - 1, device=device)
    shifted = torch.where(base >= prompt - 1, base + answer + 1, base)
    index = torch.cat([base.expand(pairs, -1), shifted.expand(pairs, -1)], dim=0)

    other = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"):
            continue
        if key in ("pixel_values", "image_features"):
            if value.shape[0] % 2:
                return None
            other[key] = value[: value.shape[0] // 2]  # the collator repeats the images: chosen's copy is enough
        else:
            return None  # an input this packing does not know how to halve (token_type_ids, image_grid_thw, ...)
    return {
        "input_ids": packed, "attention_mask": additive[:, None], "position_ids": positions, "shift_labels": labels,
        "index": index, **other,
    }


def unpack_outputs(outputs, index: torch.Tensor, pairs: int):
    """The fused head's per-token fields of the packed pairs, in TRL's `[chosen rows; rejected rows]` layout."""
    fields = {}
    for name in FUSED_FIELDS:
        value = getattr(outputs, name, None)
        if value is not None:
            doubled = torch.cat([value, value], dim=0)
            fields[name] = doubled.gather(1, index)
    return type(outputs)(**{**{k: v for k, v in outputs.items() if k not in FUSED_FIELDS}, **fields})


class SharedPrefixModel:
    """Stands in for the policy (or its reference) in TRL's DPO loss: called with TRL's `[chosen; rejected]` batch
    and `fused_lm_head=True`, it runs one packed sequence per pair (`pack_pairs`) and returns the fused head's
    per-token fields in TRL's layout. A batch it cannot pack goes to the model as is."""

    def __init__(self, model, batch: dict):
        self.model = model
        self.packed = pack_pairs(batch)

    def __call__(self, fused_lm_head: bool = False, labels=None, **kwargs):
        if self.packed is None or not fused_lm_head:
            return self.model(fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        packed = dict(self.packed)
        index = packed.pop("index")
        extra = {k: v for k, v in kwargs.items() if k in ("output_router_logits",)}
        outputs = self.model(**packed, fused_lm_head=True, use_cache=False, **extra)
        return unpack_outputs(outputs, index, index.shape[0] // 2)

    def __getattr__(self, name):
        return getattr(self.model, name)


# ---------------------------------------------------------------------------------------------------------------
# Cached vision features
# ---------------------------------------------------------------------------------------------------------------


def _images_of(example: dict) -> list:
    images = example.get("images", example.get("image"))
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


@dataclass
class CachedFeaturePreferenceCollator:
    """TRL's vision preference collator with the towers' cached output (`image_features`) in place of the pixels:
    the pair's images are looked up by content in the feature cache, once for chosen and once for rejected as TRL
    lays the batch out, so the model runs no tower."""

    collator: Callable
    cache: object  # model.feature_cache.FeatureCache

    def __call__(self, examples: list[dict]) -> dict:
        from model.feature_cache import image_hash

        keys = [image_hash(image) for example in examples for image in _images_of(example)]
        batch = self.collator(examples)
        pixels = batch.pop("pixel_values", None)
        if pixels is None or pixels.shape[0] != 2 * len(keys):
            got = None if pixels is None else pixels.shape[0]
            raise RuntimeError(f"expected the pixels of {2 * len(keys)} images (chosen and rejected), got {got}")
        features = self.cache.get(keys)
        batch["image_features"] = torch.cat([features, features]).to(pixels.device)
        return batch


def use_cached_features(trainer: DPOTrainer, processor, dataset: Dataset, cache_dir: str) -> int:
    """Encode every image of `dataset` once into the feature cache under `cache_dir` (those not cached yet) and make
    the trainer's collator read them (`CachedFeaturePreferenceCollator`). Returns the images encoded now."""
    from align.sampling import without_peft
    from model.pretrain import encode_images, open_feature_cache

    model = trainer.accelerator.unwrap_model(trainer.model)
    vlm = without_peft(model)
    cache = open_feature_cache(vlm, processor, cache_dir)
    images = [image for example in dataset for image in _images_of(example)]
    encoded = cache.add(images, encode=lambda batch: encode_images(vlm, processor, batch))
    trainer.data_collator = CachedFeaturePreferenceCollator(trainer.data_collator, cache)
    logger.info("feature cache %s: %d images encoded now, %d cached in all; no tower runs in DPO", cache.dir, encoded, len(cache))
    return encoded


def dpo_trainer(
    model,
    args: DPOConfig,
    train_dataset: Dataset,
    processing_class,
    ref_model=None,
    peft_config=None,
    eval_dataset: Dataset | None = None,
    callbacks: list | None = None,
    feature_cache_dir: str | None = None,
) -> VisionDPOTrainer:
    """TRL's DPO trainer on a VLM; with `args.precompute_ref_log_probs` on vision data, the reference log-probs are
    computed once up front (`precompute_reference`) instead of TRL refusing the flag.

    Args:
        model: the policy (a bare VLM; wrapped by the trainer when `peft_config` is given).
        args: the `DPOConfig`.
        train_dataset: preference rows (`images`, `prompt`, `chosen`, `rejected`).
        processing_class: the VLM's processor.
        ref_model: an explicit reference model; None for the adapter-disabled policy (PEFT) or TRL's default.
        peft_config: the LoRA config, or None for full fine-tuning.
        eval_dataset: optional preference rows to evaluate on.
        callbacks: extra `TrainerCallback`s.
        feature_cache_dir: read the towers' cached output from the feature cache there (filled first) instead of
            running the towers (`use_cached_features`); None: run them.

    Returns:
        The `VisionDPOTrainer`, ready to `train()`.
    """
    vision = "images" in train_dataset.column_names or "image" in train_dataset.column_names
    precompute = bool(args.precompute_ref_log_probs and vision)
    if precompute:
        args.precompute_ref_log_probs = False  # TRL's own check refuses it for vision data; done below instead
    try:
        trainer = VisionDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    finally:
        args.precompute_ref_log_probs = args.precompute_ref_log_probs or precompute
    if feature_cache_dir is not None:
        if not vision:
            raise ValueError("feature_cache_dir is for vision preference data (an `images` column)")
        with args.main_process_first(desc="caching the vision features"):
            use_cached_features(trainer, processing_class, train_dataset, feature_cache_dir)
    if precompute:
        precompute_reference(trainer)
    return trainer


__all__ = [
    "REF_COLUMNS",
    "DPOScriptArguments",
    "VisionDPOTrainer",
    "WithReferenceLogps",
    "add_reference_logps",
    "dpo_trainer",
    "precompute_reference",
    "preference_dataset",
    "reference_logps",
]
