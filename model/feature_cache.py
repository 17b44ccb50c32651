"""Vision-feature cache: run the frozen encoder(s) once over a dataset and keep the features on disk.

Llama3-V's main saving: with the encoders frozen, their output for an image never changes, so stage-1
training reads it from disk instead of running the encoder on every batch (TRL re-encodes each
image on every step). Features live in `.npy` shards that are memory-mapped, so a cache larger than
RAM works; rows are keyed by the image's content hash, and each cache folder by a fingerprint of the
encoders' weights and preprocessing, so a changed encoder or image never reuses stale features.

Layout: `<root>/<fingerprint>/shard-00000.npy` (float array [rows, *feature_shape]) and
`shard-00000.json` (the image hashes of its rows). A shard is written under temporary names of its writer's own,
then claimed: its array linked to the first free shard number (a link fails where the name exists, so two runs
filling one cache at once never write into the same file) and its index renamed into place last. A shard without
its index is an interrupted write and is ignored; a killed writer's temporary files are removed by the next
cache opened on the same machine.

Fill the cache of a built VLM's encoders ahead of training (`model.pretrain.build_feature_cache`):

    python -m model.feature_cache --model runs/vlm --dataset DIR [--split train] --cache_dir .cache/features
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_hash(image: Image.Image) -> str:
    """Content hash of an image as the encoders see it (RGB pixels and size, not the file bytes)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.size}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def encoder_fingerprint(encoders: Sequence[torch.nn.Module], preprocessing: Sequence[object], extra: object = None) -> str:
    """Fingerprint of encoder weights plus preprocessing settings (image processors' JSON) and `extra`."""
    h = hashlib.sha256()
    for encoder in encoders:
        for name, tensor in sorted(encoder.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for proc in preprocessing:
        h.update((proc.to_json_string() if hasattr(proc, "to_json_string") else repr(proc)).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _host() -> str:
    """This machine's name without hyphens: the parts of a writer's temporary file names are split on them."""
    return socket.gethostname().replace("-", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class FeatureCache:
    """Memory-mapped features for one encoder fingerprint under `root`."""

    def __init__(self, root: str | Path, fingerprint: str, dtype: str = "float32"):
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._remove_dead_writers_files()
        self._arrays: list[np.ndarray] = []
        self._index: dict[str, tuple[int, int]] = {}
        for index_file in sorted(self.dir.glob("shard-*.json")):
            array_file = index_file.with_suffix(".npy")
            hashes = json.loads(index_file.read_text())
            array = np.load(array_file, mmap_mode="r")
            if len(array) != len(hashes):
                raise ValueError(f"feature cache shard {array_file} has {len(array)} rows but its index lists {len(hashes)}")
            shard = len(self._arrays)
            self._arrays.append(array)
            for row, key in enumerate(hashes):
                self._index.setdefault(key, (shard, row))

    def _remove_dead_writers_files(self) -> None:
        """Delete the temporary files of writers on this machine that died before claiming their shard."""
        host = _host()
        for path in self.dir.glob(".writing-*"):
            _, writer_host, pid, _ = path.name.split("-", 3)
            if writer_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                path.unlink(missing_ok=True)

    def _claim(self, array_file: Path, index_file: Path) -> int:
        """Move a written shard into place under the first free shard number; returns that number."""
        shard = len(list(self.dir.glob("shard-*.npy")))
        while True:
            target = self.dir / f"shard-{shard:05d}.npy"
            try:
                os.link(array_file, target)
                break
            except FileExistsError:
                shard += 1
        os.replace(index_file, target.with_suffix(".json"))
        array_file.unlink()
        return shard

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def missing(self, keys: Iterable[str]) -> list[str]:
        seen, out = set(), []
        for key in keys:
            if key not in self._index and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def add(
        self,
        images: Sequence[Image.Image],
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int = 64,
        progress: Callable | None = None,
    ) -> int:
        """Encode the images not cached yet (deduplicated by content) into a new shard; return how many."""
        keyed = {}
        for image in images:
            keyed.setdefault(image_hash(image), image)
        todo = self.missing(keyed)
        if not todo:
            return 0
        writer = f".writing-{_host()}-{os.getpid()}-{uuid.uuid4().hex}"
        array_file, index_file = self.dir / f"{writer}.npy", self.dir / f"{writer}.json"
        array = None
        batches = range(0, len(todo), batch_size)
        for start in progress(batches) if progress else batches:
            keys = todo[start : start + batch_size]
            with torch.no_grad():
                feats = encode([keyed[k] for k in keys]).detach().to("cpu", torch.float32).numpy()
            if array is None:
                array = np.lib.format.open_memmap(array_file, mode="w+", dtype=self.dtype, shape=(len(todo), *feats.shape[1:]))
            array[start : start + len(keys)] = feats
        array.flush()
        del array
        index_file.write_text(json.dumps(todo))
        shard = self._claim(array_file, index_file)
        mapped = np.load(self.dir / f"shard-{shard:05d}.npy", mmap_mode="r")
        self._arrays.append(mapped)
        for row, key in enumerate(todo):
            self._index[key] = (len(self._arrays) - 1, row)
        return len(todo)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Stacked features of the given image hashes (KeyError names the first missing one)."""
        rows = []
        for key in keys:
            if key not in self._index:
                raise KeyError(f"image {key[:12]}... is not in the feature cache {self.dir}")
            shard, row = self._index[key]
            rows.append(np.asarray(self._arrays[shard][row]))
        return torch.from_numpy(np.stack(rows)).float()


if __name__ == "__main__":
    # The command lives here, where the cache is; the work is `model.pretrain.build_feature_cache`.
    import logging

    from .pretrain import cache_features_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_features_main()
