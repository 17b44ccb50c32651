"""One tower pass per distinct image: a VLM's `get_vision_features` wrapped so that copies of an image (a GRPO group's
prompt repeated for each answer, a DPO pair's image repeated for chosen and rejected) are encoded once."""

from __future__ import annotations

import hashlib

import torch


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


__all__ = ["TowerMemo", "same_frozen_towers", "vlm_models"]
