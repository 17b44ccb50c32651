"""`VLMForConditionalGeneration`: any ViT-style vision tower(s) + any transformers causal LLM, LLaVA-shaped.

Layout (mirrors `LlavaForConditionalGeneration`): `model` is a `VLMModel` holding `vision_towers` (the whole
`*VisionModel`s), `projectors` (one per tower), `language_model` (the LLM's base model, e.g. `LlamaModel`) and, for
cross-attention fusion, `cross_attention` (adapters keyed by decoder layer); `lm_head` is the LLM's head.

Images are flattened over the batch in sample order; sample b's images are the placeholder groups of its `input_ids`,
in order. With several towers, `pixel_values` and `image_features` are packed per image into one flat row (see
`pack_pixel_values` / `pack_image_features`), which keeps them one tensor for collators and caches.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, BitsAndBytesConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_vlm import VLMConfig, _grid_side
from .cross_attention import (
    CROSS_ATTENTION_KWARG,
    CrossAttentionAdapters,
    GatedCrossAttentionBlock,
    attach_cross_attention,
    derive_cross_attention_mask,
    prepare_cross_attention_inputs,
)
from .projectors import ResamplerProjector, VisionProjectors, build_projector
from .ternary import ternarize_

# ---------------------------------------------------------------------------------------------------------------
# Packing several towers' inputs into one tensor (shared with the processor and the feature cache)
# ---------------------------------------------------------------------------------------------------------------


def _image_shape(vision_config) -> tuple[int, int, int]:
    size = vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return getattr(vision_config, "num_channels", 3), height, width


def pack_pixel_values(pixel_values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack each tower's preprocessed images into the model's `pixel_values`.

    Args:
        pixel_values: one `[num_images, C, H_k, W_k]` tensor per tower, in tower order.

    Returns:
        The single tensor itself for one tower; for several, `[num_images, sum_k C*H_k*W_k]` (each image flattened,
        concatenated in tower order).
    """
    if len(pixel_values) == 1:
        return pixel_values[0]
    return torch.cat([p.flatten(1) for p in pixel_values], dim=1)


def unpack_pixel_values(config: VLMConfig, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `pack_pixel_values`: one `[num_images, C, H_k, W_k]` tensor per tower."""
    shapes = [_image_shape(c) for c in config.vision_configs]
    if pixel_values.dim() == 4:
        if len(shapes) != 1:
            raise ValueError(
                f"the model has {len(shapes)} vision towers: pass pixel_values packed with pack_pixel_values, "
                f"[num_images, {sum(c * h * w for c, h, w in shapes)}], not a 4D tensor"
            )
        return [pixel_values]
    sizes = [c * h * w for c, h, w in shapes]
    if pixel_values.dim() != 2 or pixel_values.shape[1] != sum(sizes):
        raise ValueError(
            f"packed pixel_values must be [num_images, {sum(sizes)}] (towers' C*H*W: {sizes}), "
            f"got {list(pixel_values.shape)}"
        )
    return [p.reshape(-1, *shape) for p, shape in zip(pixel_values.split(sizes, dim=1), shapes)]


def pack_image_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack each tower's patch features (CLS dropped, not pooled, not projected) into the model's `image_features`.

    Args:
        features: one `[num_images, T_k, D_k]` tensor per tower, in tower order.

    Returns:
        The single tensor itself for one tower; for several, `[num_images, sum_k T_k*D_k]`.
    """
    if len(features) == 1:
        return features[0]
    return torch.cat([f.flatten(1) for f in features], dim=1)


def unpack_image_features(config: VLMConfig, features: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `pack_image_features`: one `[num_images, T_k, D_k]` tensor per tower."""
    shapes = [(config.vision_patches_per_image(i), c.hidden_size) for i, c in enumerate(config.vision_configs)]
    if features.dim() == 3:
        if len(shapes) != 1:
            raise ValueError(
                f"the model has {len(shapes)} vision towers: pass image_features packed with pack_image_features"
            )
        return [features]
    sizes = [t * d for t, d in shapes]
    if features.dim() != 2 or features.shape[1] != sum(sizes):
        raise ValueError(
            f"packed image_features must be [num_images, {sum(sizes)}] (towers' tokens*width: {shapes}), "
            f"got {list(features.shape)}"
        )
    return [f.reshape(-1, *shape) for f, shape in zip(features.split(sizes, dim=1), shapes)]


# ---------------------------------------------------------------------------------------------------------------
# Small pieces of the forward
# ---------------------------------------------------------------------------------------------------------------


def count_images_per_sample(image_token_mask: torch.Tensor, tokens_per_image: int, num_images: int) -> list[int]:
    """Images per sample from the placeholders, checked against the images given.

    Args:
        image_token_mask: `[batch, text_len]` bool, True at image placeholders.
        tokens_per_image: placeholders per image (`config.num_image_tokens`).
        num_images: images passed to the model (flattened over the batch).

    Returns:
        The number of images of each sample.
    """
    counts = image_token_mask.sum(dim=-1).tolist()
    if tokens_per_image > 1:
        # Each run of placeholders must hold whole images; a cut run is a truncated or mis-expanded prompt.
        edges = F.pad(image_token_mask.int(), (1, 1)).diff(dim=-1)
        starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
        broken = starts[(ends[:, 1] - starts[:, 1]) % tokens_per_image != 0, 0]
        if broken.numel():
            sample = int(broken[0])
            raise ValueError(
                f"sample {sample} has a run of image placeholder tokens that is not a whole number of images "
                f"({tokens_per_image} placeholders per image; {counts[sample]} in the sample): was the prompt "
                "truncated, or `<image>` not expanded by the processor?"
            )
    for sample, count in enumerate(counts):
        if count % tokens_per_image:
            raise ValueError(
                f"sample {sample} has {count} image placeholder tokens, not a multiple of the {tokens_per_image} "
                "per image"
            )
    per_sample = [count // tokens_per_image for count in counts]
    if sum(per_sample) != num_images:
        raise ValueError(
            f"input_ids hold placeholders for {sum(per_sample)} images (per sample: {per_sample}) but "
            f"{num_images} images were given"
        )
    return per_sample


def _drop_cls(hidden: torch.Tensor, grid: int) -> torch.Tensor:
    # LLaVA's "default" feature selection: a tower that outputs grid**2 + 1 tokens (CLIP) leads with a CLS token.
    if hidden.shape[1] == grid * grid + 1:
        return hidden[:, 1:]
    if hidden.shape[1] != grid * grid:
        raise ValueError(f"vision tower returned {hidden.shape[1]} tokens, expected {grid * grid} (+1 CLS)")
    return hidden


def _drop_pooling_head(tower: nn.Module) -> None:
    # SigLIP's attention-pooling head is never used here (the patch tokens are); dropping it saves its compute and
    # leaves no parameter without gradient (which DDP rejects) when the tower trains.
    if getattr(tower.config, "vision_use_head", False) and hasattr(tower, "head"):
        del tower.head
        tower.use_head = False
        tower.config.vision_use_head = False


def _decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(language_model).__name__} keeps no decoder layers at `.layers`; cross-attention fusion and "
            "ternary layers support decoders that do (Llama, Qwen2, Mistral, Gemma, ...)"
        )
    return layers


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VLMModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the visual side.

    image_hidden_states: `[num_images, num_vision_tokens, hidden]` projected visual tokens, when images were given.
    cross_attention_states: `[batch, images * num_vision_tokens, hidden]` (cross-attention fusion): the visual tokens
        per sample, kept by `generate` so the images are encoded once.
    cross_attention_mask: `[batch, text_len, images]` the mask used for this forward's tokens (cross-attention).
    """

    image_hidden_states: torch.Tensor | None = None
    cross_attention_states: torch.Tensor | None = None
    cross_attention_mask: torch.Tensor | None = None


@dataclass
class VLMCausalLMOutputWithPast(ModelOutput):
    """`CausalLMOutputWithPast` plus the fields of `VLMModelOutputWithPast`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor] | None = None
    image_hidden_states: torch.Tensor | None = None
    cross_attention_states: torch.Tensor | None = None
    cross_attention_mask: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class VLMPreTrainedModel(PreTrainedModel):
    config: VLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GatedCrossAttentionBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Left out of bitsandbytes quantisation (see `VLMForConditionalGeneration.from_pretrained`): only the LLM's
    # decoder linears are quantised, the small trainable parts and the head stay full precision.
    modules_not_to_quantize = ("model.vision_towers", "model.projectors", "model.cross_attention", "lm_head")

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GatedCrossAttentionBlock):
            # Zero gates: the model starts as exactly the base LLM (Flamingo, mllama).
            init.zeros_(module.attn_gate)
            init.zeros_(module.mlp_gate)
        if isinstance(module, VisionProjectors):
            # Identity until fitted; a checkpoint saved before the standardisation existed loads as the identity.
            module.reset_feature_statistics()
        if isinstance(module, ResamplerProjector):
            init.normal_(module.position, std=0.02)
            init.normal_(module.queries, std=0.02)


class VLMModel(VLMPreTrainedModel):
    """Vision towers + projectors + the LLM's base model (+ cross-attention adapters), without the LM head."""

    def __init__(
        self,
        config: VLMConfig,
        vision_towers: Sequence[PreTrainedModel] | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        config.validate_vlm()
        if vision_towers is None:
            # transformers hands a requested dtype to the registered sub-configs only (`text_config`); without
            # this the towers would keep the dtype saved in their own configs.
            dtype = {"dtype": config.dtype} if isinstance(config.dtype, torch.dtype) else {}
            vision_towers = [AutoModel.from_config(c, **dtype) for c in config.vision_configs]
        for tower in vision_towers:
            _drop_pooling_head(tower)
        self.vision_towers = nn.ModuleList(vision_towers)
        self.projectors = VisionProjectors(
            [
                build_projector(
                    config.projector, vision_config, config.text_config, depth=config.projector_depth,
                    num_patches=config.vision_patches_after_pool(index), num_queries=config.projector_queries,
                )
                for index, vision_config in enumerate(config.vision_configs)
            ],
            feature_sizes=[vision_config.hidden_size for vision_config in config.vision_configs],
        )
        self.language_model = language_model if language_model is not None else AutoModel.from_config(config.text_config)
        if config.ternary:
            ternarize_(_decoder_layers(self.language_model))
        if config.fusion == "cross_attention":
            self.cross_attention = CrossAttentionAdapters(config.text_config, config.cross_attention_layers())
            attach_cross_attention(_decoder_layers(self.language_model))
        else:
            self.cross_attention = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.language_model = decoder

    def get_vision_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Run the towers: one `[num_images, T_k, D_k]` patch-feature tensor per tower (CLS dropped, not pooled).

        These are what `image_features` takes (packed with `pack_image_features`), e.g. from a feature cache.
        """
        features = []
        for index, (tower, images) in enumerate(zip(self.vision_towers, unpack_pixel_values(self.config, pixel_values))):
            vision_config = self.config.vision_configs[index]
            layer = self.config.vision_feature_layer
            outputs = tower(images.to(tower.dtype), output_hidden_states=layer != -1, return_dict=True)
            hidden = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
            features.append(_drop_cls(hidden, _grid_side(vision_config)))
        return features

    def project_vision_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pool and project each tower's features and concatenate them in tower order.

        Returns:
            `[num_images, num_vision_tokens, text_hidden]` visual tokens.
        """
        return self.projectors(list(features), pool=self.config.pool)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Visual tokens `[num_images, num_vision_tokens, text_hidden]` from pixels or from precomputed features."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        if pixel_values is not None:
            features = self.get_vision_features(pixel_values)
        else:
            features = unpack_image_features(self.config, image_features)
        return self.project_vision_features(features)

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[batch, text_len]` bool, True at image placeholder tokens (found by embedding when only embeds are given)."""
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is not set: the model cannot find the image placeholders")
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(dim=-1)

    def _cross_attention_inputs(
        self,
        image_hidden_states: torch.Tensor | None,
        image_token_mask: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
        cross_attention_states: torch.Tensor | None,
        cache: Cache | None,
        text_len: int,
    ):
        tokens_per_image = self.config.num_vision_tokens
        dtype = next(self.cross_attention.parameters()).dtype
        if image_hidden_states is not None:
            per_sample = count_images_per_sample(image_token_mask, 1, image_hidden_states.shape[0])
            slots = cross_attention_mask.shape[-1] if cross_attention_mask is not None else max(per_sample)
            if slots < max(per_sample):
                raise ValueError(f"cross_attention_mask has {slots} image slots but a sample has {max(per_sample)} images")
            batch = len(per_sample)
            sample_index = torch.repeat_interleave(
                torch.arange(batch, device=image_hidden_states.device),
                torch.tensor(per_sample, device=image_hidden_states.device),
            )
            slot_index = torch.cat([torch.arange(n, device=image_hidden_states.device) for n in per_sample])
            padded = image_hidden_states.new_zeros(batch, slots, *image_hidden_states.shape[1:])
            padded[sample_index, slot_index] = image_hidden_states
            cross_attention_states = padded.flatten(1, 2)
            if cross_attention_mask is None:
                cross_attention_mask = derive_cross_attention_mask(image_token_mask, slots)
        if cross_attention_states is None:
            return None, None, None
        if cross_attention_mask is None:
            raise ValueError(
                "cross_attention_states need a cross_attention_mask ([batch, text_len, images]); generate keeps one"
            )
        slots = cross_attention_states.shape[1] // tokens_per_image
        if cross_attention_mask.shape[-1] != slots:
            raise ValueError(
                f"cross_attention_mask has {cross_attention_mask.shape[-1]} image slots, the visual states {slots}"
            )
        if cross_attention_mask.shape[1] != text_len:
            # A full-length mask with a cache: keep the rows of the tokens being processed (as mllama does).
            past = int(cache.get_seq_length()) if cache is not None else 0
            cross_attention_mask = cross_attention_mask[:, past : past + text_len]
            if cross_attention_mask.shape[1] != text_len:
                raise ValueError(f"cross_attention_mask does not cover the {text_len} input tokens")
        inputs = prepare_cross_attention_inputs(
            cross_attention_states,
            cross_attention_mask,
            tokens_per_image,
            dtype,
            adapters=self.cross_attention,
            layers=frozenset(str(i) for i in self.config.cross_attention_layers()),
        )
        return inputs, cross_attention_states, cross_attention_mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        **kwargs,
    ) -> VLMModelOutputWithPast:
        r"""
        pixel_values: `[num_images, 3, H, W]` (one tower) or packed `[num_images, sum_k 3*H_k*W_k]` (several).
        image_features: precomputed tower outputs instead of pixels: `[num_images, T, D]` or packed.
        cross_attention_mask: `[batch, text_len, max_images]`, 1 where text token t may attend to image i; derived
            from the placeholder positions when omitted.
        cross_attention_states: visual tokens kept from an earlier step (`generate` passes them while decoding).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_hidden_states = None
        if pixel_values is not None or image_features is not None:
            image_hidden_states = self.get_image_features(pixel_values=pixel_values, image_features=image_features)
            image_hidden_states = image_hidden_states.to(inputs_embeds.device)

        cross_inputs = None
        if self.config.fusion == "prepend":
            if image_hidden_states is not None:
                image_token_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
                count_images_per_sample(image_token_mask, self.config.num_image_tokens, image_hidden_states.shape[0])
                inputs_embeds = inputs_embeds.masked_scatter(
                    image_token_mask[..., None], image_hidden_states.to(inputs_embeds.dtype)
                )
        else:
            image_token_mask = None
            if image_hidden_states is not None:
                image_token_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            cross_inputs, cross_attention_states, cross_attention_mask = self._cross_attention_inputs(
                image_hidden_states,
                image_token_mask,
                cross_attention_mask,
                cross_attention_states,
                cache,
                inputs_embeds.shape[1],
            )
            if cross_inputs is not None:
                kwargs[CROSS_ATTENTION_KWARG] = cross_inputs

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if cross_inputs is not None and cross_inputs.applied < len(cross_inputs.layers):
            raise RuntimeError(
                f"{type(self.language_model).__name__} did not pass keyword arguments on to its decoder layers, so "
                f"only {cross_inputs.applied} of {len(cross_inputs.layers)} cross-attention adapters ran"
            )

        return VLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_hidden_states,
            cross_attention_states=cross_attention_states,
            cross_attention_mask=cross_attention_mask if cross_inputs is not None else None,
        )


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    """The VLM with its LM head: `model` (a `VLMModel`) + `lm_head`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(
        self,
        config: VLMConfig,
        vision_towers: Sequence[PreTrainedModel] | None = None,
        language_model: PreTrainedModel | None = None,
        lm_head: nn.Module | None = None,
    ):
        super().__init__(config)
        self.model = VLMModel(config, vision_towers=vision_towers, language_model=language_model)
        text_config = config.text_config
        self.lm_head = lm_head if lm_head is not None else nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        # Tie to wherever this LLM keeps its input embeddings (`embed_tokens` for Llama/Qwen2, `wte` for GPT-2, ...).
        embeddings = self.model.language_model.get_input_embeddings()
        embed_name = next(name for name, module in self.model.language_model.named_modules() if module is embeddings)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embed_name}.weight"}
        self.post_init()

    @classmethod
    def from_parts(
        cls, config: VLMConfig, vision_models: Sequence[PreTrainedModel], causal_lm: PreTrainedModel
    ) -> "VLMForConditionalGeneration":
        """Assemble a VLM around pretrained parts, reusing their modules (no copy); projectors/adapters are new.

        Args:
            config: the VLM's settings (fusion, projector, pool, image_token_id, ...); its `vision_configs` and
                `text_config` are replaced by the parts' own configs (on a copy).
            vision_models: the vision towers, in tower order: whole `*VisionModel`s (SigLIP, CLIP, ...) whose
                output's `last_hidden_state` holds the patch tokens. SigLIP's unused pooling head is removed.
            causal_lm: a `*ForCausalLM`; its base model (`base_model_prefix`) and head are taken over.

        Returns:
            The `VLMForConditionalGeneration`, on the LLM's device.
        """
        vision_models = list(vision_models)
        if not vision_models:
            raise ValueError("from_parts needs at least one vision model")
        lm_head = causal_lm.get_output_embeddings()
        if lm_head is None:
            raise ValueError(f"{type(causal_lm).__name__} has no output embeddings (LM head)")
        config = copy.deepcopy(config)
        config.vision_configs = [tower.config for tower in vision_models]
        config.text_config = causal_lm.config
        config.tie_word_embeddings = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
        model = cls(
            config,
            vision_towers=vision_models,
            language_model=getattr(causal_lm, causal_lm.base_model_prefix),
            lm_head=lm_head,
        )
        device = model.get_input_embeddings().weight.device
        model.model.projectors.to(device)
        if model.model.cross_attention is not None:
            model.model.cross_attention.to(device)
        return model

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`; a bitsandbytes config without `llm_int8_skip_modules` gets
        `modules_not_to_quantize`, so only the LLM is quantised (transformers' default skips just the head)."""
        if isinstance(quantization_config, BitsAndBytesConfig) and quantization_config.llm_int8_skip_modules is None:
            quantization_config = copy.deepcopy(quantization_config)
            quantization_config.llm_int8_skip_modules = list(cls.modules_not_to_quantize)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return super().from_pretrained(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def set_decoder(self, decoder: nn.Module) -> None:
        self.model.set_decoder(decoder)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values, image_features=image_features)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> VLMCausalLMOutputWithPast:
        r"""
        See `VLMModel.forward` for the visual inputs. `labels`: `[batch, text_len]`, -100 ignored, shifted inside.
        `cache_position` is accepted for callers of older transformers and unused (positions come from the cache).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_features=image_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cross_attention_mask=cross_attention_mask,
            cross_attention_states=cross_attention_states,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return VLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            cross_attention_states=outputs.cross_attention_states,
            cross_attention_mask=outputs.cross_attention_mask,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        image_features=None,
        cross_attention_mask=None,
        cross_attention_states=None,
        **kwargs,
    ):
        # Overwritten: the images are encoded once. `pixel_values` is dropped after prefill by the parent; the
        # cached features and, for cross-attention, the visual states and mask kept between steps are handled here.
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["image_features"] = image_features
        encoding_images = model_inputs.get("pixel_values") is not None or model_inputs.get("image_features") is not None
        if cross_attention_states is not None and not encoding_images:
            model_inputs["cross_attention_states"] = cross_attention_states
        if cross_attention_mask is not None:
            inputs = model_inputs.get("input_ids")
            text_len = (inputs if inputs is not None else model_inputs["inputs_embeds"]).shape[1]
            model_inputs["cross_attention_mask"] = cross_attention_mask[:, -text_len:]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if self.config.fusion != "cross_attention":
            return model_kwargs
        # Keep the visual states of the prefill for the decoding steps, and grow the mask by repeating its last row:
        # a new token sees the images the previous one saw (mllama does the same with its explicit mask).
        if getattr(outputs, "cross_attention_states", None) is not None:
            model_kwargs["cross_attention_states"] = outputs.cross_attention_states
        mask = model_kwargs.get("cross_attention_mask")
        if mask is None:
            mask = getattr(outputs, "cross_attention_mask", None)
        if mask is not None:
            model_kwargs["cross_attention_mask"] = torch.cat(
                [mask, mask[:, -1:].expand(-1, num_new_tokens, -1)], dim=1
            )
        return model_kwargs


__all__ = [
    "VLMCausalLMOutputWithPast",
    "VLMForConditionalGeneration",
    "VLMModel",
    "VLMModelOutputWithPast",
    "VLMPreTrainedModel",
    "count_images_per_sample",
    "pack_image_features",
    "pack_pixel_values",
    "unpack_image_features",
    "unpack_pixel_values",
]
