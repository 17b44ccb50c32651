"""The VLM's processor: tokenizer, image processor(s) and chat template behind transformers' `ProcessorMixin`.

It speaks the protocol TRL's vision collators use (`processor(images=..., text=..., padding=True,
padding_side=..., truncation=..., max_length=..., add_special_tokens=False, return_tensors="pt")`,
`processor.apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=...)`,
`processor.tokenizer`) and returns exactly the forward's inputs:

- prepend fusion: each `<image>` placeholder is expanded to `num_image_tokens` copies, so the visual
  tokens own positions in `input_ids` and logits, labels and attention masks line up position by position;
- cross-attention fusion: one placeholder per image stays in the text; `cross_attention_mask`
  (token t sees image i iff i's placeholder is at or before t) is returned on request;
- `pixel_values`: the images of the batch flattened in sample order, `[num_images, 3, H, W]` for one
  encoder, packed `[num_images, sum_k 3*H_k*W_k]` (`modeling_vlm.pack_pixel_values`) for several.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import load_image
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .configuration_vlm import FUSIONS
from .modeling_vlm import pack_pixel_values


class VLMProcessorKwargs(ProcessingKwargs, total=False):
    return_cross_attention_mask: bool
    return_pixel_values: bool


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; transparent areas become white rather than whatever colour hides under alpha 0."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Channels-last 3-channel view of a grayscale, RGB or RGBA array (channels first or last)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected an image array of 2 or 3 dimensions, got shape {tuple(array.shape)}")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        return array[..., :3]
    if channels == 3:
        return array
    raise ValueError(f"expected 1, 3 or 4 channels, got an image array of shape {tuple(array.shape)}")


def load_rgb_image(image) -> Image.Image | np.ndarray:
    """Decode one image input to RGB: a PIL image, a numpy array / torch tensor, a path or URL, raw bytes,
    or a `datasets` image dict (`{"bytes": ..., "path": ...}`)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
        image.load()
    elif isinstance(image, (str, os.PathLike)):
        image = load_image(str(image))
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def _is_image_like(value) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, torch.Tensor, str, bytes, bytearray, dict, os.PathLike))


def _image_processor_from_dict(config: dict) -> BaseImageProcessor:
    return get_image_processor_class_from_name(config["image_processor_type"]).from_dict(config)


class VLMProcessor(ProcessorMixin):
    """Tokenizer + image processor(s) + chat template of a `VLMForConditionalGeneration`.

    Args:
        image_processor: the first (or only) vision encoder's image processor.
        tokenizer: the LLM's tokenizer, holding `image_token` as a single token.
        chat_template: a Jinja template in TRL's message format; defaults to the tokenizer's.
        image_token: the per-image placeholder written by the chat template.
        num_image_tokens: placeholder tokens per image in `input_ids` (the config's `num_image_tokens`:
            visual tokens per image for prepend fusion, 1 for cross-attention).
        fusion: "prepend" or "cross_attention".
        extra_vision_processors: image processors of the further encoders, in encoder order (instances,
            or their `to_dict()` configs as stored in `processor_config.json`).
        return_cross_attention_mask: default of the call option of that name (cross-attention fusion).
            Off by default: the model derives the same mask from the placeholder positions, and TRL's
            prompt/completion collators (DPO, SFT prompt-completion) concatenate and re-align `input_ids`
            after calling the processor on the prompt alone, which would leave a returned mask stale.
    """

    valid_processor_kwargs = VLMProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        num_image_tokens: int = 1,
        fusion: str = "prepend",
        extra_vision_processors: Sequence | None = None,
        return_cross_attention_mask: bool = False,
        **kwargs,
    ):
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; supported: {sorted(FUSIONS)}")
        if fusion == "cross_attention" and num_image_tokens != 1:
            raise ValueError(f"cross-attention fusion keeps one placeholder per image, got num_image_tokens={num_image_tokens}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        if tokenizer is None:
            raise ValueError("VLMProcessor needs a tokenizer")
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the image token {image_token!r} is not in the tokenizer's vocabulary; add it first "
                "(model.chat_template.prepare_vlm_tokenizer)"
            )
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.fusion = fusion
        self.return_cross_attention_mask = return_cross_attention_mask
        self.extra_vision_processors = [
            _image_processor_from_dict(p) if isinstance(p, dict) else p for p in (extra_vision_processors or [])
        ]
        if chat_template is None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def image_processors(self) -> list:
        """One image processor per vision encoder, in encoder order."""
        return [self.image_processor, *self.extra_vision_processors]

    @property
    def model_input_names(self) -> list[str]:
        names = [*self.tokenizer.model_input_names, "pixel_values"]
        if self.fusion == "cross_attention":
            names.append("cross_attention_mask")
        return names

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["extra_vision_processors"] = [p.to_dict() for p in self.extra_vision_processors]
        return output

    def _per_sample_images(self, images, placeholders: list[int]) -> list[list]:
        """Images grouped by sample: a nested list (one list per sample) is checked against the placeholder
        counts; a flat list (or one image) is split by them."""
        if images is None:
            images = [[] for _ in placeholders]
        elif _is_image_like(images):
            images = [images]
        images = list(images)
        nested = any(isinstance(item, (list, tuple)) for item in images) or (
            len(images) == len(placeholders) and all(item is None for item in images)
        )
        if nested:
            if len(images) != len(placeholders):
                raise ValueError(
                    f"got image lists for {len(images)} samples but {len(placeholders)} texts; pass one list of "
                    "images per text"
                )
            grouped = [[] if item is None else list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        else:
            if len(images) != sum(placeholders):
                raise ValueError(
                    f"got {len(images)} images for {sum(placeholders)} {self.image_token} placeholders "
                    f"(per sample: {placeholders})"
                )
            grouped, start = [], 0
            for count in placeholders:
                grouped.append(images[start : start + count])
                start += count
        for index, (sample_images, count) in enumerate(zip(grouped, placeholders)):
            if len(sample_images) != count:
                raise ValueError(
                    f"sample {index}: the text has {count} {self.image_token} placeholder(s) but {len(sample_images)} "
                    "image(s) were given"
                )
        return grouped

    def _decode_images(self, grouped: list[list]) -> list:
        decoded = []
        for index, sample_images in enumerate(grouped):
            for image in sample_images:
                try:
                    decoded.append(load_rgb_image(image))
                except Exception as error:
                    raise ValueError(f"sample {index}: cannot decode image ({type(image).__name__}): {error}") from error
        return decoded

    def _pixel_values(self, images: list, images_kwargs: dict) -> torch.Tensor:
        images_kwargs = {**images_kwargs, "return_tensors": "pt"}
        return pack_pixel_values([processor(images, **images_kwargs)["pixel_values"] for processor in self.image_processors])

    def _cross_attention_mask(self, input_ids: list[list[int]], num_images: list[int]) -> np.ndarray:
        length = max(len(ids) for ids in input_ids)
        mask = np.zeros((len(input_ids), length, max(num_images)), dtype=np.int64)
        for row, ids in enumerate(input_ids):
            positions = [t for t, token in enumerate(ids) if token == self.image_token_id]
            for image, position in enumerate(positions):
                mask[row, position:, image] = 1
        return mask

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenize `text` (str or list of str, with one `image_token` per image) and preprocess `images`.

        `images` is one list of images per sample (TRL's layout), a flat list split over the samples by
        their placeholder counts, or None. Text options (`padding`, `padding_side`, `truncation`,
        `max_length`, `pad_to_multiple_of`, `add_special_tokens`, `return_offsets_mapping`, ...) go to the
        tokenizer; image options to the image processor(s).

        `return_pixel_values=False` builds the text side only: the images (any objects, e.g. the keys of a
        vision-feature cache) are counted against the placeholders but never decoded or preprocessed, and no
        `pixel_values` are returned; the model then takes `image_features` instead.

        Returns:
            A `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` (when there are images) and,
            for cross-attention fusion with `return_cross_attention_mask=True`, `cross_attention_mask`
            `[batch, text_len, max_images]`.

        Raises:
            ValueError: naming the sample, when its image count differs from its placeholder count, an
                image cannot be decoded, or truncation would cut into its image tokens.
        """
        if videos is not None or audio is not None:
            raise ValueError("VLMProcessor handles images and text only")
        if images is None and text is None:
            raise ValueError("VLMProcessor needs `text`, `images` or both")
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or merged["images_kwargs"].pop("return_tensors", None)
        merged["images_kwargs"].pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", merged["return_mm_token_type_ids"])
        return_offsets = text_kwargs.pop("return_text_replacement_offsets", merged["return_text_replacement_offsets"])
        return_cross_attention_mask = merged.get("return_cross_attention_mask", self.return_cross_attention_mask)
        return_pixel_values = merged.get("return_pixel_values", True)

        if text is None:
            images = [images] if _is_image_like(images) else images
            grouped = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
            pixel_values = self._pixel_values(self._decode_images(grouped), merged["images_kwargs"])
            return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(sample, str) for sample in text):
            raise ValueError("`text` must be a string or a list of strings")
        text = list(text)
        placeholders = [sample.count(self.image_token) for sample in text]
        grouped = self._per_sample_images(images, placeholders)
        if return_pixel_values:
            decoded = self._decode_images(grouped)
        else:
            decoded = [image for sample_images in grouped for image in sample_images]

        data = {}
        if decoded and return_pixel_values:
            data["pixel_values"] = self._pixel_values(decoded, merged["images_kwargs"])
        per_image_text = self.image_token * (self.num_image_tokens if self.fusion == "prepend" else 1)
        text, replacement_offsets = self.get_text_with_replacements(text, [per_image_text] * len(decoded))

        encoding = self.tokenizer(text, **text_kwargs)
        input_ids = encoding["input_ids"]
        per_image = self.num_image_tokens if self.fusion == "prepend" else 1
        for index, (ids, count) in enumerate(zip(input_ids, placeholders)):
            found = sum(1 for token in ids if token == self.image_token_id)
            if found != count * per_image:
                if text_kwargs.get("truncation") and text_kwargs.get("max_length") is not None:
                    needed = len(self.tokenizer(text[index], **{**text_kwargs, "truncation": False, "padding": False})["input_ids"])
                    raise ValueError(
                        f"sample {index}: {needed} tokens with its {count} image(s) ({count * per_image} image tokens) "
                        f"do not fit in max_length={text_kwargs['max_length']}; truncation would cut image tokens. "
                        "Raise max_length or set it to None."
                    )
                raise ValueError(
                    f"sample {index}: expected {count * per_image} {self.image_token} tokens in input_ids, found {found}; "
                    f"the tokenizer must encode {self.image_token!r} as one token"
                )
        data.update(encoding)
        if return_cross_attention_mask and self.fusion == "cross_attention" and decoded:
            data["cross_attention_mask"] = self._cross_attention_mask(input_ids, [len(g) for g in grouped])
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(input_ids)
        if return_offsets:
            data["text_replacement_offsets"] = replacement_offsets
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)
