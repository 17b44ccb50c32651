import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.feature_cache import FeatureCache, encoder_fingerprint, image_hash


def _images(n, offset=0):
    return [Image.new("RGB", (8, 8), (10 * (i + offset), 0, 0)) for i in range(n)]


class CountingEncoder:
    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, images):
        self.calls += 1
        self.images += len(images)
        return torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).mean(-1) for im in images])


def test_features_are_computed_once_and_read_back(tmp_path):
    encode = CountingEncoder()
    cache = FeatureCache(tmp_path, "fp")
    images = _images(5) + _images(2)  # two duplicates by content
    assert cache.add(images, encode, batch_size=2) == 5
    assert encode.images == 5
    assert cache.add(images, encode) == 0 and encode.images == 5

    reopened = FeatureCache(tmp_path, "fp")
    keys = [image_hash(im) for im in images]
    got = reopened.get(keys)
    expected = torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).mean(-1) for im in images])
    torch.testing.assert_close(got, expected)
    assert isinstance(reopened._arrays[0], np.memmap)  # read from disk, not loaded into RAM


def test_new_images_go_to_a_new_shard(tmp_path):
    encode = CountingEncoder()
    cache = FeatureCache(tmp_path, "fp")
    cache.add(_images(3), encode)
    assert cache.add(_images(4), encode) == 1  # only the one new image
    assert len(FeatureCache(tmp_path, "fp")) == 4
    assert len(list((tmp_path / "fp").glob("shard-*.json"))) == 2


def test_changed_image_misses_the_cache(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    cache.add(_images(2), CountingEncoder())
    changed = _images(2)[1].copy()
    changed.putpixel((0, 0), (255, 255, 255))
    assert image_hash(changed) not in cache
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.get([image_hash(changed)])
    # Mode conversion is not a change: the encoders see RGB.
    assert image_hash(_images(1)[0].convert("RGBA")) in cache


def test_fingerprint_tracks_weights_and_preprocessing():
    from transformers import SiglipImageProcessor

    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 4)
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    base = encoder_fingerprint([encoder], [proc])
    assert encoder_fingerprint([encoder], [proc]) == base
    assert encoder_fingerprint([encoder], [SiglipImageProcessor(size={"height": 64, "width": 64})]) != base
    with torch.no_grad():
        encoder.weight[0, 0] += 1e-3
    assert encoder_fingerprint([encoder], [proc]) != base


def test_interrupted_shard_is_ignored(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    cache.add(_images(2), CountingEncoder())
    # A shard whose index was never written (killed mid-write) does not count.
    np.save(tmp_path / "fp" / "shard-00001.npy", np.zeros((3, 8, 8), dtype=np.float32))
    reopened = FeatureCache(tmp_path, "fp")
    assert len(reopened) == 2
    assert reopened.add(_images(3), CountingEncoder()) == 1
    assert len(json.loads((tmp_path / "fp" / "shard-00002.json").read_text())) == 1


def test_two_writers_filling_one_cache_at_once_keep_their_own_shards(tmp_path):
    """Two runs adding to the same cache at the same moment (the demo's two stage-1 runs share one): each writes under
    its own temporary name and claims a free shard number, so neither overwrites the other's array."""
    import threading

    barrier = threading.Barrier(2)

    class WaitingEncoder(CountingEncoder):
        def __call__(self, images):
            barrier.wait(timeout=30)  # both writers have opened their arrays and counted the shards
            return super().__call__(images)

    caches = [FeatureCache(tmp_path, "fp"), FeatureCache(tmp_path, "fp")]
    batches = [_images(3), _images(4, offset=3)]
    threads = [threading.Thread(target=c.add, args=(b, WaitingEncoder())) for c, b in zip(caches, batches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    directory = tmp_path / "fp"
    assert sorted(p.name for p in directory.iterdir()) == [
        "shard-00000.json", "shard-00000.npy", "shard-00001.json", "shard-00001.npy"]
    reopened = FeatureCache(tmp_path, "fp")
    images = batches[0] + batches[1]
    expected = torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).mean(-1) for im in images])
    torch.testing.assert_close(reopened.get([image_hash(im) for im in images]), expected)


def test_a_dead_writers_temporary_files_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from model.feature_cache import _host

    directory = tmp_path / "fp"
    directory.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getpid()
    for pid in (dead, alive):
        (directory / f".writing-{_host()}-{pid}-0123.npy").write_bytes(b"partial")
    (directory / f".writing-otherhost-{dead}-0123.npy").write_bytes(b"partial")  # another machine's: not ours to judge
    FeatureCache(tmp_path, "fp")
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [f".writing-{_host()}-{alive}-0123.npy", f".writing-otherhost-{dead}-0123.npy"])
