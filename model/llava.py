"""The suite's VLM as a native transformers LLaVA checkpoint (`LlavaForConditionalGeneration` + `LlavaProcessor`)
computing the same logits, where its architecture has one (prepend fusion, MLP projector, one encoder, no pooling,
full-precision LLM). `align.export` writes it as the `llava/` format."""

from __future__ import annotations

import copy

import torch

from .configuration_vlm import _grid_side


def llava_refusal(config) -> str | None:
    """Why the suite VLM's config has no native LLaVA equivalent, or None when it has one."""
    reasons = []
    if config.fusion != "prepend":
        reasons.append(f"{config.fusion} fusion (LLaVA prepends the visual tokens)")
    if config.projector != "mlp":
        reasons.append(f"the {config.projector} projector (LLaVA's is Linear-GELU-Linear)")
    if len(config.vision_configs) != 1:
        reasons.append(f"{len(config.vision_configs)} vision encoders (LLaVA has one)")
    if config.pool != 1:
        reasons.append(f"pool={config.pool} (LLaVA does not pool the patch grid)")
    if config.ternary:
        reasons.append("ternary (BitLinear) LLM layers")
    return "; ".join(reasons) or None


def _tower_has_cls(tower, vision_config) -> bool:
    size = vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    probe = torch.zeros(1, getattr(vision_config, "num_channels", 3), height, width, dtype=tower.dtype)
    with torch.no_grad():
        tokens = tower(probe, return_dict=True).last_hidden_state.shape[1]
    grid = _grid_side(vision_config)
    if tokens not in (grid * grid, grid * grid + 1):
        raise ValueError(
            f"cannot export a native LLaVA checkpoint: the {vision_config.model_type} tower returns {tokens} tokens "
            f"for a {grid}x{grid} patch grid (LLaVA keeps all of them or drops one CLS token)"
        )
    return tokens == grid * grid + 1


def to_llava(vlm, processor):
    """The VLM as `(LlavaForConditionalGeneration, LlavaProcessor)` computing the same logits.

    LLaVA reads `hidden_states[vision_feature_layer]` of its tower, and for SigLIP and CLIP `hidden_states[-1]` is
    taken before the final layer norm, while this project's layer -1 is the tower's `last_hidden_state` (SigLIP's
    includes `post_layernorm`). transformers' `tie_last_hidden_states` config flag makes `hidden_states[-1]` the
    `last_hidden_state`, so it is set on the tower config exactly when the VLM uses layer -1.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = vlm.config
    refusal = llava_refusal(config)
    if refusal is not None:
        raise ValueError(f"cannot export a native LLaVA checkpoint: {refusal}")
    tower = vlm.model.vision_towers[0]
    vision_config = copy.deepcopy(tower.config)
    has_cls = _tower_has_cls(tower, vision_config)
    vision_config.tie_last_hidden_states = config.vision_feature_layer == -1
    strategy = "default" if has_cls else "full"
    llava_config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=copy.deepcopy(config.text_config).to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(llava_config).to(vlm.lm_head.weight.dtype)
    renames = {
        "model.vision_towers.0.": "model.vision_tower.",
        "model.projectors.0.": "model.multi_modal_projector.",
    }
    state = {}
    source = vlm.state_dict()
    # LLaVA's projector has no input standardisation: fold ours into its first linear layer, exactly
    # (W((x - m) / s) + b = (W / s) x + (b - W (m / s))); average pooling is refused above, so the order is free.
    stats = vlm.model.projectors.feature_statistics(0)
    for key in [k for k in source if k.startswith("model.projectors.feature_")]:
        del source[key]
    if stats is not None and stats[2] > 0:
        mean, std = stats[0].double(), stats[1].double()
        weight = source["model.projectors.0.linear_1.weight"].double()
        source["model.projectors.0.linear_1.bias"] = (
            source["model.projectors.0.linear_1.bias"].double() - weight @ (mean / std)
        ).to(vlm.lm_head.weight.dtype)
        source["model.projectors.0.linear_1.weight"] = (weight / std).to(vlm.lm_head.weight.dtype)
    for key, value in source.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        state[key] = value.detach().clone()
    missing, unexpected = llava.load_state_dict(state, strict=False)
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    missing = [k for k in missing if k != tied]
    if missing or unexpected:
        raise ValueError(f"the VLM's weights do not map onto LLaVA: missing {missing}, unexpected {unexpected}")
    llava.generation_config = copy.deepcopy(vlm.generation_config)
    llava_processor = LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0],
        vision_feature_select_strategy=strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=1 if has_cls else 0,
    )
    return llava.eval(), llava_processor



__all__ = ["llava_refusal", "to_llava"]
