"""`VLMConfig`: one or more vision towers, a causal LLM, a projector and a fusion, in one transformers config.

The vision towers' and the LLM's own configs are nested (`vision_configs`, `text_config`), so a saved VLM is a
plain `config.json` that `AutoConfig` rebuilds once `import model` has registered `model_type="vlm_align"`.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .cross_attention import cross_attention_layer_indices
from .projectors import PROJECTORS

# How many placeholder tokens one image takes in `input_ids`, per fusion. Prepend fusion replaces the placeholders
# one-for-one with the visual tokens; cross-attention keeps a single marker per image, which only anchors the
# cross-attention mask (text after the marker may attend to that image).
FUSIONS = {
    "prepend": lambda config: config.num_vision_tokens,
    "cross_attention": lambda config: 1,
}

DEFAULT_VISION_MODEL_TYPE = "siglip_vision_model"


def _as_config(config: dict | PreTrainedConfig, default_model_type: str = DEFAULT_VISION_MODEL_TYPE) -> PreTrainedConfig:
    if isinstance(config, PreTrainedConfig):
        return config
    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type", default_model_type), **config)


def _grid_side(vision_config: PreTrainedConfig) -> int:
    """Patches per side of a ViT-style tower (`image_size // patch_size`)."""
    image_size, patch_size = getattr(vision_config, "image_size", None), getattr(vision_config, "patch_size", None)
    if image_size is None or patch_size is None:
        raise ValueError(
            f"vision tower {vision_config.model_type!r} has no image_size/patch_size; only ViT-style towers "
            "(SigLIP, CLIP, ViT, ...) are supported"
        )
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    patch_size = patch_size if isinstance(patch_size, int) else patch_size[0]
    return image_size // patch_size


@strict
class VLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VLMForConditionalGeneration`].

    Args:
        vision_configs (`list[dict | PreTrainedConfig]`, *optional*):
            Configs of the vision towers, in encoder order (dicts carry their `model_type`). Defaults to one SigLIP.
        text_config (`dict | PreTrainedConfig`, *optional*):
            Config of the causal LLM (Llama, Qwen2, ...). Defaults to Llama.
        fusion (`str`, defaults to `"prepend"`):
            `"prepend"`: visual tokens replace the image placeholders in the LLM input (LLaVA).
            `"cross_attention"`: gated cross-attention adapters before every `cross_attention_every`-th decoder
            layer (Flamingo / Llama 3.2 Vision).
        projector (`str`, defaults to `"mlp"`): `"mlp"`, `"attention"` or `"resampler"`, see
            `model.projectors.PROJECTORS`.
        projector_depth (`int`, defaults to 2): blocks of the `"attention"` and `"resampler"` projectors.
        projector_queries (`int`, defaults to 16): visual tokens per image and tower of the `"resampler"` projector.
        pool (`int`, defaults to 1): average-pool the patch grid by this factor per side before projecting.
        cross_attention_every (`int`, defaults to 4): one adapter before decoder layers k-1, 2k-1, ... (at least one).
        image_token_id (`int`, *optional*): the image placeholder token.
        vision_feature_layer (`int`, defaults to -1): -1 takes each tower's `last_hidden_state` (SigLIP's includes
            its post-layernorm); any other index takes `hidden_states[vision_feature_layer]`.
        ternary (`bool`, defaults to `False`): build the LLM's decoder linears as BitNet b1.58 `BitLinear`.
        tie_word_embeddings (`bool`, defaults to `False`): read from `text_config` when that ties.
    """

    model_type = "vlm_align"
    # The Trainer gathers every other output field at evaluation; these are per-forward internals, not predictions.
    keys_to_ignore_at_inference = ["cache", "image_hidden_states", "cross_attention_states", "cross_attention_mask"]
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision_configs: list | None = None
    text_config: dict | PreTrainedConfig | None = None
    fusion: str = "prepend"
    projector: str = "mlp"
    projector_depth: int = 2
    projector_queries: int = 16
    pool: int = 1
    cross_attention_every: int = 4
    image_token_id: int | None = None
    vision_feature_layer: int = -1
    ternary: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # A LLaVA-style single `vision_config=` is accepted as a one-tower list.
        single = kwargs.pop("vision_config", None)
        if self.vision_configs is None:
            self.vision_configs = [single] if single is not None else [{"model_type": DEFAULT_VISION_MODEL_TYPE}]
        # Converted before the parent's post-init, whose `_attn_implementation` setter reaches the towers too.
        self.vision_configs = [_as_config(c) for c in self.vision_configs]
        super().__post_init__(**kwargs)
        # Same workaround as LlavaConfig: tying is saved in the text config of the LLMs this wraps.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_vlm()

    def validate_vlm(self) -> None:
        """Check the names and sizes; called at init and again by the model, as `vision_configs` may be swapped."""
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; supported: {sorted(FUSIONS)}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; supported: {sorted(PROJECTORS)}")
        if not self.vision_configs:
            raise ValueError("vision_configs must hold at least one vision tower config")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if self.cross_attention_every < 1:
            raise ValueError(f"cross_attention_every must be >= 1, got {self.cross_attention_every}")
        if self.projector in ("attention", "resampler") and self.projector_depth < 1:
            raise ValueError(
                f"projector_depth must be >= 1 for the {self.projector} projector, got {self.projector_depth}"
            )
        if self.projector == "resampler" and self.projector_queries < 1:
            raise ValueError(f"projector_queries must be >= 1 for the resampler projector, got {self.projector_queries}")
        for index, vision_config in enumerate(self.vision_configs):
            grid = _grid_side(vision_config)
            if grid % self.pool:
                raise ValueError(
                    f"pool={self.pool} does not divide the {grid}x{grid} patch grid of vision tower {index} "
                    f"({vision_config.model_type})"
                )

    @property
    def vision_config(self) -> PreTrainedConfig:
        """The first vision tower's config (LLaVA-style single-tower access)."""
        return self.vision_configs[0]

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None):
        # The parent sets it on `text_config` (a registered sub-config); the towers live in a list it cannot see.
        PreTrainedConfig._attn_implementation.fset(self, value)
        for vision_config in getattr(self, "vision_configs", None) or []:
            if isinstance(vision_config, PreTrainedConfig):
                if isinstance(value, dict):
                    vision_config._attn_implementation = value.get("vision_configs", vision_config._attn_implementation)
                else:
                    vision_config._attn_implementation = value

    def vision_patches_per_image(self, index: int) -> int:
        """Patch features of tower `index` per image, CLS dropped, before pooling."""
        return _grid_side(self.vision_configs[index]) ** 2

    def vision_patches_after_pool(self, index: int) -> int:
        """Patch features of tower `index` per image that reach its projector (CLS dropped, pooled)."""
        return (_grid_side(self.vision_configs[index]) // self.pool) ** 2

    def vision_tokens_per_image(self, index: int) -> int:
        """Visual tokens of tower `index` per image: its pooled patches, or the resampler's queries."""
        if self.projector == "resampler":
            return self.projector_queries
        return self.vision_patches_after_pool(index)

    @property
    def num_vision_tokens(self) -> int:
        """Visual tokens per image over all towers."""
        return sum(self.vision_tokens_per_image(i) for i in range(len(self.vision_configs)))

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image in `input_ids`: `num_vision_tokens` for prepend, 1 for cross-attention."""
        return FUSIONS[self.fusion](self)

    def cross_attention_layers(self) -> list[int]:
        """Decoder layers that get an adapter in front of them: k-1, 2k-1, ..., or the last one if k > depth."""
        return cross_attention_layer_indices(self.text_config.num_hidden_layers, self.cross_attention_every)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        vision_dicts = []
        for vision_config in self.vision_configs:
            vision_dict = vision_config.to_diff_dict()
            vision_dict.pop("transformers_version", None)
            vision_dicts.append(vision_dict)
        output["vision_configs"] = vision_dicts
        return output


__all__ = ["FUSIONS", "VLMConfig"]
