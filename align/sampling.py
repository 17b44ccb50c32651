"""Best-of-N decoding with a shared prefill: each prompt's images encoded once and its prompt run through the model
once, its N candidates decoded from copies of that one KV cache.

`generate(num_return_sequences=N)` copies every prompt N times before the first forward, so the vision towers
encode each image N times and the prefill (for a VLM mostly the image's visual tokens) runs N times. Here the prompts
(all but their last token) go through the model once, with the images' tower outputs computed once per image; the
cache is repeated N times along the batch (`Cache.batch_repeat_interleave`, what transformers' own beam search
uses), and `generate` continues from it with the full prompts, so it only runs the last prompt token and the new
ones. The positions are those `generate` gives a left-padded batch (from the attention mask). For cross-attention
fusion the visual states of the prefill and the prompt's cross-attention mask go to `generate` too, repeated alike.
Row `i * N + j` of the output is candidate `j` of prompt `i`, as with `num_return_sequences`.
"""

from __future__ import annotations

import copy

import torch

from align.families import FAMILIES, family_of
from model import pack_image_features


def without_peft(model):
    """The model itself, or the model a PEFT wrapper holds."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The towers' output for each image, once (packed as the VLM's `image_features` takes it)."""
    return pack_image_features(without_peft(model).model.get_vision_features(pixel_values))


@torch.no_grad()
def generate_groups(model, inputs: dict, num_candidates: int, **generate_kwargs) -> torch.Tensor:
    """`num_candidates` continuations of each prompt of a processor batch, from one shared prefill.

    Args:
        model: a suite VLM or a PEFT model around one.
        inputs: the processor's batch, left-padded: `input_ids`, `attention_mask`, and `pixel_values` or
            `image_features` (precomputed tower outputs), `cross_attention_mask` for cross-attention fusion.
        num_candidates: N.
        generate_kwargs: passed to `generate` (sampling settings, `max_new_tokens`, `eos_token_id`, ...).

    Returns:
        `[batch * N, prompt_len + new]` token ids: the prompts and their continuations, prompt `i`'s candidates at
        rows `i * N` to `i * N + N - 1`.

    A stock VLM (LLaVA, Qwen2-VL, ...: `align.families`) takes the ordinary way, `generate(num_return_sequences=N)`,
    in the same row order: its image features and cache cannot be handed to `generate` as the suite's can.
    """
    if family_of(model) is not FAMILIES["vlm"]:
        return model.generate(**inputs, num_return_sequences=num_candidates, **generate_kwargs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] < 2:
        raise ValueError("a shared prefill needs prompts of at least 2 tokens")
    features = inputs.get("image_features")
    if inputs.get("pixel_values") is not None:
        features = encode_images(model, inputs["pixel_values"])
    # The positions generate gives a left-padded batch: counted over the real tokens.
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    cross_mask = inputs.get("cross_attention_mask")
    extra = {} if cross_mask is None else {"cross_attention_mask": cross_mask[:, :-1]}
    prefill = model(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], image_features=features,
        use_cache=True, logits_to_keep=1, **extra,
    )
    cache = prefill.cache
    cache.batch_repeat_interleave(num_candidates)
    states = getattr(prefill, "cross_attention_states", None)
    if states is not None:
        if cross_mask is None:
            # Derived from the placeholders in the prefill; the last prompt token sees the images its predecessor
            # sees (as generate grows the mask).
            derived = prefill.cross_attention_mask
            cross_mask = torch.cat([derived, derived[:, -1:]], dim=1)
        extra = {
            "cross_attention_states": states.repeat_interleave(num_candidates, dim=0),
            "cross_attention_mask": cross_mask.repeat_interleave(num_candidates, dim=0),
        }
    config = generate_kwargs.pop("generation_config", None)
    if config is not None:
        config = copy.deepcopy(config)
        config.use_cache = True
    else:
        generate_kwargs["use_cache"] = True
    return model.generate(
        input_ids=ids.repeat_interleave(num_candidates, dim=0),
        attention_mask=mask.repeat_interleave(num_candidates, dim=0),
        cache=cache, generation_config=config, **extra, **generate_kwargs,
    )


__all__ = ["encode_images", "generate_groups", "without_peft"]
