"""One tower pass per distinct image: a VLM's `get_vision_features` wrapped so that copies of an image (a GRPO group's
prompt repeated for each answer, a DPO pair's image repeated for chosen and rejected) are encoded once.

`TowerMemo` is for the suite's VLM; `RowMemo` does the same within each call of a stock VLM's vision tower (LLaVA,
Idefics3/SmolVLM, Gemma 3, Mllama), whose input rows are whole images."""

from __future__ import annotations

import hashlib

import torch

from align.families import FAMILIES, family_of


def _digest(image: torch.Tensor) -> bytes:
    """A key for an image's pixels (its bytes, so that bfloat16 pixels hash too)."""
    data = image.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).digest()


class TowerMemo:
    """Wraps a `VLMModel`'s `get_vision_features` so that each distinct image (by pixel content) runs the towers
    once: with frozen towers and `keep`, across every call until `clear()`; otherwise within each call.

    `images_encoded` counts the images that went through the towers (what the group-encode test reads)."""

    def __init__(self, vlm, keep: bool = True):
        self.vlm = vlm
        self.keep = keep
        self.encode = vlm.get_vision_features
        self.features: dict[bytes, list[torch.Tensor]] = {}
        self.images_encoded = 0
        vlm.get_vision_features = self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vlm.vision_towers.parameters())

    def clear(self) -> None:
        self.features.clear()

    def _run(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        self.images_encoded += pixel_values.shape[0]
        return self.encode(pixel_values)

    def __call__(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        keys = [_digest(image) for image in pixel_values]
        first: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        if not self.keep:
            self.features.clear()
        if not self.frozen:
            unique = list(first.values())
            position = {key: i for i, key in enumerate(first)}
            inverse = torch.tensor([position[k] for k in keys], device=pixel_values.device)
            return [out[inverse] for out in self._run(pixel_values[unique])]
        missing = [index for key, index in first.items() if key not in self.features]
        if missing:
            with torch.no_grad():
                encoded = self._run(pixel_values[missing])
            for row, index in enumerate(missing):
                self.features[keys[index]] = [out[row] for out in encoded]
        return [torch.stack([self.features[key][tower] for key in keys]) for tower in range(len(self.features[keys[0]]))]


class RowMemo:
    """Wraps a stock vision tower's `forward` so that rows of its pixel input that repeat an earlier row (by pixel
    content) are not encoded again within a call: the tower runs on the distinct rows, with the other batch-aligned
    inputs (`patch_attention_mask`, `aspect_ratio_ids`, ...) taken along, and every batch-first tensor of its output
    is indexed back to the original rows. Indexing is differentiable, so a trained tower gets the gradient of every
    copy. `images_encoded` counts the rows that went through the tower."""

    def __init__(self, tower: torch.nn.Module):
        self.tower = tower
        self.encode = tower.forward
        self.images_encoded = 0
        tower.forward = self

    def __call__(self, *args, **kwargs):
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() < 2:
            return self.encode(*args, **kwargs)
        rows = pixel_values.shape[0]
        keys = [_digest(row) for row in pixel_values]
        first: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        self.images_encoded += len(first)
        if len(first) == rows:
            return self.encode(*args, **kwargs)
        unique = torch.tensor(list(first.values()), device=pixel_values.device)
        position = {key: i for i, key in enumerate(first)}
        inverse = torch.tensor([position[key] for key in keys], device=pixel_values.device)

        def take(value):
            return value[unique] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows else value

        output = self.encode(*(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
        return _index_rows(output, inverse, len(first))


def _index_rows(value, inverse: torch.Tensor, rows: int):
    """`value` (a tensor, or a model output, dict, tuple or list of them) with each batch-first tensor of `rows`
    rows indexed by `inverse`."""
    if isinstance(value, torch.Tensor):
        return value[inverse] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):  # transformers' ModelOutput is a dict too
        for key in list(value.keys()):
            value[key] = _index_rows(value[key], inverse, rows)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_index_rows(v, inverse, rows) for v in value)
    return value


def memoize_stock_towers(*models) -> list[RowMemo]:
    """A `RowMemo` on the vision tower of each stock VLM among `models` (PEFT-wrapped or not) whose tower takes
    whole images as rows (`Family.image_rows`; Qwen2-VL's takes flattened patches and is left alone)."""
    memos, seen = [], set()
    for model in models:
        if model is None or not hasattr(model, "config"):
            continue
        family = family_of(model)
        if family is FAMILIES["vlm"] or not family.image_rows:
            continue
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for tower in family.modules(base, "vision_towers"):
            if id(tower) not in seen and not isinstance(tower.forward, RowMemo):
                seen.add(id(tower))
                memos.append(RowMemo(tower))
    return memos


def same_frozen_towers(a, b) -> bool:
    """Whether two VLMs' vision towers are frozen and hold the same weights (a policy and its reference copy)."""
    towers = (a.vision_towers, b.vision_towers)
    if any(p.requires_grad for t in towers for p in t.parameters()):
        return False
    sa, sb = (t.state_dict() for t in towers)
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k]) for k in sa
    )


def vlm_models(*models) -> list:
    """The suite's `VLMModel`s inside the given models (PEFT-wrapped or not), each once."""
    from model import VLMModel

    found, seen = [], set()
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, VLMModel) and id(module) not in seen:
                seen.add(id(module))
                found.append(module)
    return found


__all__ = ["RowMemo", "TowerMemo", "memoize_stock_towers", "same_frozen_towers", "vlm_models"]
