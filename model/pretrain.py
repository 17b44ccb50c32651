"""Adapter pretraining (stage 1): the data path on cached vision features and the helpers the recipe composes.

With the vision encoders frozen (stages `align`, `finetune`), their output for an image never changes, so the images
are decoded, checked and encoded once (`prepare_image_rows` into a `FeatureCache`) and training reads the features
by content hash: `CachedFeatureCollator` builds the text side with TRL's own vision collator (placeholders expanded,
assistant-only labels) and adds `image_features`, so no image is decoded or preprocessed per batch and the towers
never run. A stage that trains the towers (`prealign`) trains on pixels with TRL's collator unchanged.

    model, processor = load_or_build_vlm(vision=["parts/siglip"], text="parts/llama", fusion="prepend")
    freeze_for_stage(model, "align")
    data = prepare_stage_data(dataset, model, processor, stage="align", cache_dir="cache/features")
    trainer = SFTTrainer(model, args, train_dataset=data.train_dataset, data_collator=data.data_collator,
                         processing_class=processor)

Nothing here imports `align/`: the world's caption data and the caption evaluation live in `align.captioning`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetInfo, Features, Image, List, Value, concatenate_datasets
from datasets.table import InMemoryTable
from PIL import Image as PILImage
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from .build import _as_dtype, build_vlm
from .feature_cache import FeatureCache, encoder_fingerprint, image_hash
from .modeling_vlm import VLMForConditionalGeneration, pack_image_features, unpack_image_features
from .processing_vlm import VLMProcessor, load_rgb_image
from .stages import STAGES

logger = logging.getLogger(__name__)

# `use_feature_cache`: "auto" uses the cache whenever the stage freezes the towers and trains on pixels otherwise;
# "true" requires it (an error for a stage that trains the towers); "false" always trains on pixels.
FEATURE_CACHE_MODES = ("auto", "true", "false")

# Reasons a row is set aside, as written to rejects.jsonl (the same words as `align.data`'s loaders, whose
# `RejectReport` writes the file).
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
IMAGE_COUNT = "image count mismatch"

# Bumped when the stored feature layout changes, so old caches are not read as new ones.
_FEATURE_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def load_or_build_vlm(
    model_name_or_path: str | None = None,
    vision: Sequence[str] | None = None,
    text: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    **build_kwargs,
) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """A built VLM loaded from `model_name_or_path`, or a new one built from parts (`vision` + `text`).

    Args:
        model_name_or_path: folder of a saved VLM (e.g. the output of an earlier stage).
        vision: path(s) of the vision tower(s), for a new VLM.
        text: path of the causal LLM, for a new VLM.
        dtype: load dtype ("float32", "bfloat16", ...; "auto" or None keeps the saved one).
        attn_implementation: attention implementation of a loaded VLM ("sdpa", "eager", ...).
        **build_kwargs: `build_vlm` options for a new VLM (fusion, projector, pool, ...).

    Returns:
        `(model, processor)`.
    """
    building = bool(vision) or text is not None
    if (model_name_or_path is None) == (not building):
        raise ValueError(
            "give either model_name_or_path (a built VLM) or vision + text (parts to build one from), not "
            f"{'both' if building else 'neither'}"
        )
    dtype = None if dtype == "auto" else _as_dtype(dtype)
    if building:
        if not vision or text is None:
            raise ValueError(f"building a VLM needs both vision and text paths, got vision={vision!r}, text={text!r}")
        return build_vlm(list(vision), text, dtype=dtype, **build_kwargs)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)
    if not isinstance(model, VLMForConditionalGeneration):
        raise ValueError(
            f"{model_name_or_path!r} holds a {type(model).__name__}, not a VLMForConditionalGeneration built by "
            "model.build (adapter pretraining needs its projectors and towers)"
        )
    return model, AutoProcessor.from_pretrained(model_name_or_path)


def towers_frozen(stage: str) -> bool:
    """Whether `stage` keeps the vision towers frozen, so their features can come from a cache."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; supported: {sorted(STAGES)}")
    return "vision_towers" not in STAGES[stage]


def resolve_feature_cache(mode: str | bool, stage: str) -> bool:
    """Whether `stage` trains on cached features under `use_feature_cache=mode` (see `FEATURE_CACHE_MODES`)."""
    mode = str(mode).lower()
    if mode not in FEATURE_CACHE_MODES:
        raise ValueError(f"use_feature_cache must be one of {list(FEATURE_CACHE_MODES)}, got {mode!r}")
    frozen = towers_frozen(stage)
    if mode == "true" and not frozen:
        raise ValueError(
            f"use_feature_cache=true cannot be used with stage {stage!r}: it trains the vision towers, so their "
            "features change every step. Use use_feature_cache=auto (trains on pixels) or a stage that freezes the "
            f"towers ({sorted(s for s in STAGES if towers_frozen(s))})"
        )
    if mode == "auto" and not frozen:
        logger.info("stage %s trains the vision towers: training on pixels, not on cached features", stage)
    return mode != "false" and frozen


# ---------------------------------------------------------------------------------------------------------------
# Vision features and their cache
# ---------------------------------------------------------------------------------------------------------------


def feature_fingerprint(model: VLMForConditionalGeneration, processor: VLMProcessor) -> str:
    """Fingerprint of what the cached features depend on: the towers' weights, the image processors' settings,
    the hidden layer taken (`vision_feature_layer`), and the towers' types and dtypes (bf16 towers give other
    features than fp32 ones)."""
    extra = {
        "vision_feature_layer": model.config.vision_feature_layer,
        "towers": [(c.model_type, str(t.dtype)) for c, t in zip(model.config.vision_configs, model.model.vision_towers)],
        "format": _FEATURE_FORMAT,
    }
    return encoder_fingerprint(list(model.model.vision_towers), processor.image_processors, extra=extra)


def open_feature_cache(model: VLMForConditionalGeneration, processor: VLMProcessor, cache_dir: str | os.PathLike) -> FeatureCache:
    """The cache folder of this model's encoders under `cache_dir` (a new, empty one when they changed)."""
    return FeatureCache(cache_dir, feature_fingerprint(model, processor))


@torch.no_grad()
def encode_images(model: VLMForConditionalGeneration, processor: VLMProcessor, images: Sequence) -> torch.Tensor:
    """The towers' patch features of `images`, packed as the forward's `image_features` (float32, on the CPU)."""
    towers = model.model.vision_towers
    was_training = towers.training
    towers.eval()
    try:
        pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
        features = model.model.get_vision_features(pixel_values.to(model.device))
    finally:
        towers.train(was_training)
    return pack_image_features(features).float().cpu()


def _placeholder_count(messages) -> int | None:
    """Image items in a TRL conversation; None when its contents are plain strings (TRL then inserts them)."""
    count, structured = 0, False
    for message in messages or []:
        content = message.get("content")
        if isinstance(content, list):
            structured = True
            count += sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image")
    return count if structured else None


def _missing(image) -> str | None:
    """Why an undecoded image has nothing to decode (no data, or a file that is not there), else None."""
    if image is None:
        return "no image data"
    if isinstance(image, dict) and not image.get("bytes"):
        image = image.get("path")
        if not image:
            return "no image data"
    if isinstance(image, (str, os.PathLike)) and not os.path.exists(image):
        return f"{os.fspath(image)} does not exist"
    return None


def _decode(image) -> PILImage.Image:
    decoded = load_rgb_image(image)
    return decoded if isinstance(decoded, PILImage.Image) else PILImage.fromarray(np.asarray(decoded, dtype=np.uint8))


@dataclass
class PreparedImages:
    """The rows kept after checking every image once.

    Attributes:
        dataset: the kept rows, with an `image_hashes` column (one content hash per image, the cache keys).
        total: rows read.
        rejects: one `{"row", "id", "reason", "detail"}` record per row set aside.
        encoded: images newly encoded into the feature cache (0 without one).
        cache: the feature cache, when one was filled.
    """

    dataset: Dataset
    total: int
    rejects: list[dict] = field(default_factory=list)
    encoded: int = 0
    cache: FeatureCache | None = None

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects).most_common())

    def summary(self) -> str:
        """E.g. "skipped 2 of 120 rows with unusable images (1 missing image, 1 corrupt image)"."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.items())
        return f"skipped {len(self.rejects)} of {self.total} rows with unusable images ({reasons})"


def prepare_image_rows(
    dataset: Dataset,
    cache: FeatureCache | None = None,
    encode: Callable[[list], torch.Tensor] | None = None,
    chunk_size: int = 1024,
    encode_batch_size: int = 64,
    id_column: str = "image_id",
) -> PreparedImages:
    """Decode every image of an `images` + `messages` dataset once: set aside rows with a missing or corrupt image
    (or with more or fewer images than image placeholders), add each image's content hash, and encode the images
    the cache lacks.

    Args:
        dataset: rows in TRL's internal format (`images`: a list per row, `messages`: a conversation).
        cache: the feature cache to fill (None: only check and hash).
        encode: images -> packed features, e.g. `partial(encode_images, model, processor)`; needed with `cache`.
        chunk_size: images decoded before they are encoded into one cache shard.
        encode_batch_size: images per encoder forward.
        id_column: column reported as the row's `id` in the rejects, when the dataset has it.

    Returns:
        A `PreparedImages`.

    Raises:
        ValueError: when the dataset has no rows, lacks `images`, or no row is usable.
    """
    if "images" not in dataset.column_names:
        raise ValueError(f"the dataset needs an `images` column (one list of images per row); it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty: no image-caption rows to train on")
    if cache is not None and encode is None:
        raise ValueError("filling a feature cache needs an `encode` function")
    raw = dataset
    feature = dataset.features["images"]
    if isinstance(feature, List) and isinstance(feature.feature, Image):
        # Read the stored bytes/paths ourselves: decoding in `datasets` would raise on the first bad row.
        raw = dataset.cast_column("images", List(Image(decode=False)))
    columns = [c for c in ("images", "messages", id_column) if c in raw.column_names]

    kept, hashes, rejects, pending = [], [], [], []
    encoded = 0

    def flush():
        nonlocal encoded, pending
        if cache is not None and pending:
            encoded += cache.add(pending, encode, batch_size=encode_batch_size)
        pending = []

    row = 0
    for batch in raw.select_columns(columns).iter(batch_size=256):
        for offset, images in enumerate(batch["images"]):
            index = row + offset
            row_id = batch[id_column][offset] if id_column in batch else index
            images = list(images or [])
            expected = _placeholder_count(batch["messages"][offset]) if "messages" in batch else None
            if expected is not None and expected != len(images):
                rejects.append({"row": index, "id": row_id, "reason": IMAGE_COUNT,
                                "detail": f"{expected} image placeholder(s), {len(images)} image(s)"})
                continue
            decoded, problem = [], None
            for position, image in enumerate(images):
                missing = _missing(image)
                if missing is not None:
                    problem = (MISSING_IMAGE, f"image {position}: {missing}")
                    break
                try:
                    decoded.append(_decode(image))
                except Exception as error:  # any decoder failure means the same thing: an unusable file
                    problem = (CORRUPT_IMAGE, f"image {position}: {type(error).__name__}: {error}")
                    break
            if problem is not None:
                rejects.append({"row": index, "id": row_id, "reason": problem[0], "detail": problem[1]})
                continue
            keys = [image_hash(image) for image in decoded]
            kept.append(index)
            hashes.append(keys)
            if cache is not None:
                pending.extend(image for image, key in zip(decoded, keys) if key not in cache)
                if len(pending) >= chunk_size:
                    flush()
        row += len(batch["images"])
    flush()

    if not kept:
        reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(r["reason"] for r in rejects).items())
        raise ValueError(f"no usable rows: all {row} rows were set aside ({reasons})")
    prepared = dataset.select(kept) if len(kept) < len(dataset) else dataset
    if "image_hashes" in prepared.column_names:
        prepared = prepared.remove_columns("image_hashes")
    return PreparedImages(with_hashes(prepared, hashes), total=row, rejects=rejects, encoded=encoded, cache=cache)


def with_hashes(dataset: Dataset, hashes: list[list[str]]) -> Dataset:
    """`dataset` with an `image_hashes` column (one list of hashes per row, in row order).

    `Dataset.add_column` on a shuffled or selected dataset (one with an indices mapping, as every training mixture
    is) first rewrites every row through `flatten_indices`, casting each batch of nested conversations to its features
    in Python: 440 rows/s, six minutes on a base pretraining run's mixture of 152k rows. Here the rows are gathered
    with one Arrow `take` instead (`with_format("arrow")`), the same table in memory, and the column appended to it.
    """
    if dataset._indices is None:  # no mapping to resolve: add_column appends without rewriting
        return dataset.add_column("image_hashes", hashes, feature=List(Value("string")))
    table = InMemoryTable(dataset.with_format("arrow")[:])
    table = table.append_column("image_hashes", pa.array(hashes, type=pa.list_(pa.string())))
    features = Features({**dataset.features, "image_hashes": List(Value("string"))})
    return Dataset(table, info=DatasetInfo(features=features))


# ---------------------------------------------------------------------------------------------------------------
# The collator on cached features
# ---------------------------------------------------------------------------------------------------------------


def vision_collator(
    processor, max_length: int | None = None, pad_to_multiple_of: int | None = None, assistant_only_loss: bool = False
) -> DataCollatorForVisionLanguageModeling:
    """TRL's vision collator as `SFTTrainer` builds its own (with a template that has generation markers when the
    loss is on the assistant's tokens only)."""
    chat_template = None
    if assistant_only_loss and not has_generation_markers(processor.chat_template):
        chat_template = get_training_chat_template(processor)
    return DataCollatorForVisionLanguageModeling(
        processor=processor,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        assistant_only_loss=assistant_only_loss,
        chat_template=chat_template,
    )


class _KeysOnlyProcessor:
    """The processor as TRL's collator sees it on the cached path: the `images` are cache keys, counted against the
    placeholders but never decoded or preprocessed (`return_pixel_values=False`); everything else is the processor's."""

    def __init__(self, processor: VLMProcessor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def apply_chat_template(self, conversation, processor_kwargs: dict | None = None, **kwargs):
        processor_kwargs = {**(processor_kwargs or {}), "return_pixel_values": False}
        return self._processor.apply_chat_template(conversation, processor_kwargs=processor_kwargs, **kwargs)


class CachedFeatureCollator:
    """Batches of `messages` + `images` (image hashes) -> the forward's inputs with `image_features` from the cache.

    The text side is TRL's `DataCollatorForVisionLanguageModeling` unchanged (chat template, placeholder expansion,
    padding, truncation, assistant-only labels), so a batch equals TRL's pixel batch with `pixel_values` swapped
    for the towers' cached output.

    Args:
        processor: the VLM's processor.
        cache: the feature cache holding every image of the dataset.
        max_length, pad_to_multiple_of, assistant_only_loss: as in `SFTConfig`.
    """

    def __init__(
        self,
        processor: VLMProcessor,
        cache: FeatureCache,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        assistant_only_loss: bool = False,
    ):
        self.processor = processor
        self.cache = cache
        self.text_collator = vision_collator(
            _KeysOnlyProcessor(processor), max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
            assistant_only_loss=assistant_only_loss,
        )

    def __call__(self, examples: list[dict]) -> dict:
        keys = [key for example in examples for key in example["images"]]
        batch = self.text_collator([dict(example) for example in examples])
        if keys:
            batch["image_features"] = self.cache.get(keys)
        return batch


def feature_view(prepared: Dataset) -> Dataset:
    """The training rows of the cached path: `messages`, and `images` holding the image hashes (the cache keys).

    The column keeps TRL's name `images` so that `SFTTrainer` treats the data as a vision dataset (no text-only
    preparation, the columns kept for the collator), yet no image is stored or decoded.
    """
    return prepared.select_columns(["messages", "image_hashes"]).rename_column("image_hashes", "images")


# ---------------------------------------------------------------------------------------------------------------
# Text-only rows beside the image rows
# ---------------------------------------------------------------------------------------------------------------

# A text-only row is a conversation of one message of this role holding the document, and no image: one schema for
# both kinds of row, and a first row TRL's trainer reads as conversational whichever kind it is.
TEXT_ROLE = "document"


def text_row_document(example: dict) -> str | None:
    """The document of a text-only row (`TEXT_ROLE`), None for an image row."""
    messages = example.get("messages") or []
    if len(messages) == 1 and messages[0]["role"] == TEXT_ROLE:
        return "".join(item["text"] for item in messages[0]["content"] if item.get("text"))
    return None


def encode_documents(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Documents as the LLM parts were pretrained (`align.zoo.parts.pack_documents`): `<bos> text <eos>`, cut to
    `max_length` tokens; those shorter than 2 tokens (nothing to predict) are dropped."""
    eos = tokenizer.eos_token or ""
    ids = tokenizer([t if not eos or t.endswith(eos) else t + eos for t in texts], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [(bos + doc)[:max_length] for doc in ids]
    return [doc for doc in encoded if len(doc) >= 2]


def mix_text_rows(image_rows: Dataset, documents: Sequence[str], fraction: float, seed: int = 0) -> Dataset:
    """`image_rows` with text-only rows added, `fraction` of the result, shuffled with `seed`.

    Each text row is a conversation of one `TEXT_ROLE` message holding one of `documents` (drawn without replacement,
    then again once all are used), with no image (any other column None). `TextMixCollator` batches the two kinds.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the text fraction must be in [0, 1), got {fraction}")
    documents = [doc for doc in documents if doc.strip()]
    n_text = round(len(image_rows) * fraction / (1.0 - fraction))
    if n_text == 0:
        return image_rows
    if not documents:
        raise ValueError("text rows were asked for, but there is no non-empty document to draw them from")
    rng = np.random.default_rng(seed)
    rounds = -(-n_text // len(documents))
    picks = np.concatenate([rng.permutation(len(documents)) for _ in range(rounds)])[:n_text]
    columns = {name: [None] * n_text for name in image_rows.column_names}  # any other column: None
    columns["messages"] = [[{"role": TEXT_ROLE, "content": [{"type": "text", "text": documents[i]}]}] for i in picks]
    columns["images"] = [[] for _ in picks]
    text_rows = Dataset.from_dict(columns, features=image_rows.features)
    return concatenate_datasets([image_rows, text_rows]).shuffle(seed=seed)


class TextMixCollator:
    """Batches of image rows and text-only rows in any mix.

    TRL's vision collator takes one kind per batch (it reads the first example's keys, and its assistant-only loss
    needs `messages`), so this composes it: the image rows go through `image_collator` unchanged (TRL's own, or
    `CachedFeatureCollator`), the text rows (`TEXT_ROLE`) are plain language modelling, `<bos> text <eos>` cut
    to `max_length` with every token a label, as the LLM was pretrained. Both are right-padded to one length and
    stacked, image rows first, so the images keep their order and each row's placeholders still match its images.
    Text rows keep the LLM's text while grounded data trains it (a text-only row has no image: cross-attention
    adapters see nothing there, prepend rows no visual tokens).
    """

    # Fill of each per-token key on padding and on the text rows where the image collator returns one they lack.
    _PAD = {"labels": -100}
    # Keys with a row per image, never per token, whatever their shape happens to be.
    _PER_IMAGE = frozenset({"pixel_values", "image_features"})

    def __init__(self, image_collator: Callable[[list[dict]], dict], tokenizer, max_length: int = 256):
        if max_length < 2:
            raise ValueError(f"text rows need max_length >= 2 tokens, got {max_length}")
        self.image_collator = image_collator
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, examples: list[dict]) -> dict:
        documents = [text_row_document(example) for example in examples]
        texts = [doc for doc in documents if doc is not None]
        image_examples = [example for example, doc in zip(examples, documents) if doc is None]
        batch = self.image_collator(image_examples) if image_examples else None
        if not texts:
            return batch
        docs = encode_documents(self.tokenizer, texts, self.max_length)
        if not docs:
            raise ValueError(f"none of this batch's {len(texts)} text rows holds 2 tokens or more")
        text = {
            "input_ids": [doc for doc in docs],
            "attention_mask": [[1] * len(doc) for doc in docs],
            "labels": [list(doc) for doc in docs],
        }
        if batch is None:
            length = max(len(doc) for doc in docs)
            return {key: self._padded(key, rows, length) for key, rows in text.items()}
        rows = batch["input_ids"].shape[0]
        length = max(batch["input_ids"].shape[1], max(len(doc) for doc in docs))
        merged = dict(batch)
        for key, value in batch.items():
            if key in self._PER_IMAGE or not (torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == rows
                                              and value.shape[1] == batch["input_ids"].shape[1]):
                continue  # per image, or not per token: kept as the image rows made it
            if key not in text and key != "cross_attention_mask" and key not in ("token_type_ids", "mm_token_type_ids"):
                raise ValueError(f"the image collator returned a per-token {key!r} that text rows cannot fill")
            image_part = F.pad(value, (0, 0) * (value.dim() - 2) + (0, length - value.shape[1]), value=self._fill(key))
            if key in text:
                text_part = self._padded(key, text[key], length).to(value.dtype)
            else:
                text_part = value.new_zeros((len(docs), length, *value.shape[2:]))
            merged[key] = torch.cat([image_part, text_part])
        return merged

    def _fill(self, key: str) -> int:
        return self.pad_token_id if key == "input_ids" else self._PAD.get(key, 0)

    def _padded(self, key: str, rows: list[list[int]], length: int) -> torch.Tensor:
        fill = self._fill(key)
        return torch.tensor([row + [fill] * (length - len(row)) for row in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# One stage's data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StageData:
    """What a stage trains on.

    Attributes:
        train_dataset: `feature_view` rows on the cached path; `images` + `messages` on the pixel path.
        data_collator: a `CachedFeatureCollator`, or None to let `SFTTrainer` use TRL's vision collator on pixels.
        prepared: the checked rows (counts, rejects).
        use_feature_cache: whether training reads cached features.
    """

    train_dataset: Dataset
    data_collator: CachedFeatureCollator | None
    prepared: PreparedImages
    use_feature_cache: bool

    def report(self) -> dict:
        """The figures worth keeping in metrics.json."""
        report = {
            "rows": self.prepared.total,
            "kept": len(self.prepared.dataset),
            "rejected": len(self.prepared.rejects),
            "rejected_by_reason": self.prepared.counts,
            "feature_cache": self.use_feature_cache,
        }
        cache = self.prepared.cache
        if cache is not None:
            report.update(feature_cache_dir=str(cache.dir), cached_images=len(cache), encoded_images=self.prepared.encoded)
        return report


def prepare_stage_data(
    dataset: Dataset,
    model: VLMForConditionalGeneration,
    processor: VLMProcessor,
    stage: str,
    use_feature_cache: str | bool = "auto",
    cache_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    assistant_only_loss: bool = False,
) -> StageData:
    """Check the images of `dataset` once and, when the stage freezes the towers, fill the feature cache and return
    the cached-feature rows and collator; otherwise the checked pixel rows for TRL's own collator.

    Args:
        dataset: `images` + `messages` rows.
        model, processor: the VLM being trained (its towers' weights key the cache).
        stage: a key of `model.stages.STAGES`.
        use_feature_cache: "auto", "true" or "false" (see `FEATURE_CACHE_MODES`).
        cache_dir: root folder of the feature cache (needed when the cache is used).
        max_length, pad_to_multiple_of, assistant_only_loss: the `SFTConfig` values, for the collator.

    Returns:
        A `StageData`.
    """
    use_cache = resolve_feature_cache(use_feature_cache, stage)
    if not use_cache:
        prepared = prepare_image_rows(dataset)
        rows = prepared.dataset.select_columns(["images", "messages"])
        return StageData(rows, None, prepared, use_feature_cache=False)
    if cache_dir is None:
        raise ValueError("training on cached features needs a feature_cache_dir")
    cache = open_feature_cache(model, processor, cache_dir)
    prepared = prepare_image_rows(dataset, cache=cache, encode=lambda images: encode_images(model, processor, images))
    logger.info(
        "feature cache %s: %d images encoded now, %d cached in all", cache.dir, prepared.encoded, len(cache)
    )
    collator = CachedFeatureCollator(
        processor, cache, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
        assistant_only_loss=assistant_only_loss,
    )
    return StageData(feature_view(prepared.dataset), collator, prepared, use_feature_cache=True)


@torch.no_grad()
def fit_feature_statistics(
    model: VLMForConditionalGeneration, processor: VLMProcessor, data: StageData, max_images: int = 2048,
    batch_size: int = 64,
) -> dict:
    """Fit the projectors' input standardisation (`VisionProjectors`) on the towers' features of the training images.

    Reads the feature cache on the cached path and encodes the images otherwise; at most `max_images` distinct
    images, in dataset order. Per tower and channel, the mean and standard deviation over every patch vector.

    Returns:
        `{"images": n, "towers": [{"patches", "mean_norm", "std_min", "std_max"}]}` for metrics.json.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be positive, got {max_images}")
    projectors = model.model.projectors
    cached = data.use_feature_cache
    # The cached rows hold their images' hashes in `images`; the pixel rows keep them in `image_hashes`.
    rows = data.train_dataset if cached else data.prepared.dataset
    seen, picked = set(), []
    for index, keys in enumerate(rows["images" if cached else "image_hashes"]):
        for position, key in enumerate(keys):
            if key not in seen and len(picked) < max_images:
                seen.add(key)
                picked.append((key, index, position))
        if len(picked) == max_images:
            break
    if not picked:
        raise ValueError("no training image to fit the feature standardisation on")
    sums = squares = None
    for start in range(0, len(picked), batch_size):
        chunk = picked[start : start + batch_size]
        if cached:
            packed = data.prepared.cache.get([key for key, _, _ in chunk])
        else:
            packed = encode_images(model, processor, [load_rgb_image(rows[i]["images"][p]) for _, i, p in chunk])
        towers = [f.double().reshape(-1, f.shape[-1]) for f in unpack_image_features(model.config, packed)]
        if sums is None:
            sums, squares = [torch.zeros_like(t[0]) for t in towers], [torch.zeros_like(t[0]) for t in towers]
        for tower, total, total_sq in zip(towers, sums, squares):
            total += tower.sum(0)
            total_sq += (tower * tower).sum(0)
    count = len(picked)
    report = {"images": count, "towers": []}
    for index, (total, total_sq) in enumerate(zip(sums, squares)):
        patches = count * model.config.vision_patches_per_image(index)
        mean = total / patches
        std = (total_sq / patches - mean * mean).clamp_min(0).add(1e-6).sqrt()
        projectors.set_feature_statistics(index, mean.float(), std.float(), patches)
        report["towers"].append({
            "patches": patches, "mean_norm": round(mean.norm().item(), 4),
            "std_min": round(std.min().item(), 4), "std_max": round(std.max().item(), 4),
        })
    return report


def build_feature_cache(
    model: VLMForConditionalGeneration, processor: VLMProcessor, dataset: Dataset, cache_dir: str | os.PathLike
) -> PreparedImages:
    """Run the frozen encoder(s) once over `dataset` and store the features under `cache_dir` (only the images
    the cache lacks are encoded)."""
    cache = open_feature_cache(model, processor, cache_dir)
    return prepare_image_rows(dataset, cache=cache, encode=lambda images: encode_images(model, processor, images))


@dataclass
class CacheFeaturesArguments:
    """Command-line arguments of `python -m model.feature_cache`."""

    model: str = field(metadata={"help": "Folder of a built VLM whose (frozen) vision towers encode the images."})
    dataset: str = field(metadata={"help": "A save_to_disk dataset with an `images` column (TRL's internal format)."})
    cache_dir: str = field(metadata={"help": "Root folder of the feature cache (one subfolder per encoder fingerprint)."})
    split: str = field(default="train", metadata={"help": "Split to encode when the dataset is a DatasetDict."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype of the VLM (default: as saved)."})


def cache_features_main(argv: Sequence[str] | None = None) -> PreparedImages:
    """`python -m model.feature_cache`: encode a dataset's images into the cache of a built VLM's encoders."""
    import datasets
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(CacheFeaturesArguments).parse_args_into_dataclasses(args=argv)
    dataset = datasets.load_from_disk(args.dataset)
    if isinstance(dataset, datasets.DatasetDict):
        if args.split not in dataset:
            raise ValueError(f"the dataset at {args.dataset!r} has no split {args.split!r}; it has {list(dataset)}")
        dataset = dataset[args.split]
    model, processor = load_or_build_vlm(args.model, dtype=args.dtype)
    prepared = build_feature_cache(model, processor, dataset, args.cache_dir)
    if prepared.rejects:
        logger.warning("%s", prepared.summary())
    logger.info(
        "encoded %d new images into %s (%d cached in all, %d rows usable)",
        prepared.encoded, prepared.cache.dir, len(prepared.cache), len(prepared.dataset),
    )
    return prepared


__all__ = [
    "CORRUPT_IMAGE",
    "FEATURE_CACHE_MODES",
    "IMAGE_COUNT",
    "MISSING_IMAGE",
    "CachedFeatureCollator",
    "PreparedImages",
    "StageData",
    "build_feature_cache",
    "cache_features_main",
    "encode_images",
    "feature_fingerprint",
    "feature_view",
    "fit_feature_statistics",
    "load_or_build_vlm",
    "open_feature_cache",
    "prepare_image_rows",
    "prepare_stage_data",
    "resolve_feature_cache",
    "towers_frozen",
]
