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


@torch.no_grad()
def generate_sharing_images(model, inputs: dict, groups: torch.Tensor, **generate_kwargs) -> torch.Tensor:
    """Continuations of a left-padded processor batch whose rows come in groups that share one image and the prompt
    up to it (several questions about one image): each group's image encoded once and its prefix (the prompt up to
    the image's last visual token, for a VLM most of the prompt) run through the model once.

    The prefixes are prefilled as a batch of their own, the cache copied to each row of its group
    (`Cache.batch_select_indices`), and `generate` continues from it with the rows' prompts: each group's prefix
    followed by the row's own rest (its question and the generation prompt), left-padded there, so the positions
    `generate` counts from the attention mask are those of the unshared prompt.

    Args:
        model: a suite VLM with prepend fusion (or a PEFT model around one).
        inputs: the processor's batch, left-padded, one image per row: `input_ids`, `attention_mask`,
            `pixel_values`.
        groups: `[batch]` a group id per row; the rows of a group must have the same image and prefix.
        generate_kwargs: passed to `generate` (`max_new_tokens`, `eos_token_id`, sampling settings, ...).

    Returns:
        `[batch, new]` the new tokens of each row (the prompts are not returned: the rows' prompts here are laid out
        differently from the processor's).

    Raises:
        ValueError: a row without a visual token, more than one image per row, or rows of a group whose images or
            prefixes differ.
    """
    vlm = without_peft(model)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    if pixels.shape[0] != ids.shape[0]:
        raise ValueError(f"one image per row is needed, got {pixels.shape[0]} images for {ids.shape[0]} rows")
    columns = torch.arange(ids.shape[1], device=ids.device)
    visual = ids == vlm.config.image_token_id
    if not visual.any(-1).all():
        raise ValueError("every row needs a visual token to share the prompt up to it")
    first = (mask == 0).sum(-1)  # left padding: the first real column
    end = (columns * visual).argmax(-1) + 1  # after the last visual token
    _, row_group = torch.unique(groups.to(ids.device), return_inverse=True)
    order = row_group.tolist()
    representative = torch.tensor([order.index(g) for g in range(max(order) + 1)], device=ids.device)  # first rows
    prefixes = [ids[r, first[r] : end[r]] for r in representative.tolist()]
    for row, group in enumerate(order):
        if not torch.equal(pixels[row], pixels[representative[group]]):
            raise ValueError(f"row {row} does not share its group's image (its pixels differ)")
        if not torch.equal(ids[row, first[row] : end[row]], prefixes[group]):
            raise ValueError(f"row {row} does not share its group's image prompt (its tokens up to the image differ)")
    pad = generate_kwargs.get("pad_token_id")
    pad = 0 if pad is None else pad

    def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        padded = torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device)
        real = torch.zeros((len(rows), width), dtype=mask.dtype, device=ids.device)
        for i, r in enumerate(rows):
            padded[i, width - len(r) :] = r
            real[i, width - len(r) :] = 1
        return padded, real

    prefix_ids, prefix_mask = left_padded(prefixes)
    positions = (prefix_mask.long().cumsum(-1) - 1).clamp(min=0)
    prefill = model(
        input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions,
        image_features=encode_images(model, pixels[representative]), use_cache=True, logits_to_keep=1,
    )
    cache = prefill.cache
    cache.batch_select_indices(row_group)
    rest_ids, rest_mask = left_padded([ids[r, end[r] :] for r in range(ids.shape[0])])
    full_ids = torch.cat([prefix_ids[row_group], rest_ids], dim=1)
    full_mask = torch.cat([prefix_mask[row_group], rest_mask], dim=1)
    generate_kwargs["use_cache"] = True
    output = model.generate(input_ids=full_ids, attention_mask=full_mask, cache=cache, **generate_kwargs)
    return output[:, full_ids.shape[1] :]


__all__ = ["encode_images", "generate_groups", "generate_sharing_images", "without_peft"]
