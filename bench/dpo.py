"""DPO with LoRA two ways, in one run, at two shapes: stock TRL's `DPOTrainer` (the reference forward on every
batch, as TRL refuses precomputed reference log-probs for vision data; each pair's image encoded for chosen and for
rejected, by the policy and by the reference) and the suite's `align.dpo.dpo_trainer` (the reference log-probs
computed once before training, chosen and rejected in one forward per pair), and the latter on the feature cache
(each image encoded once into it, in the timed run, then no tower at all).

    python bench/dpo.py                      # both shapes
    python bench/dpo.py --shape tiny --steps 20

Both ways train the same VLM (reloaded for every run) with LoRA r=16 on the same world preference pairs, batch and
seed, one epoch over `steps x batch` pairs; the suite's time includes its reference precompute. Shapes as in
`bench/grpo.py`. Runs alternate; medians of pairs/s, their ratio, the images the towers encoded per pair and the
peak resident memory of each way (one run in a fresh process) are printed. Writes `runs/bench/dpo.json`. Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    alternating_runs,
    quiet_libraries,
    shape_paths,
    training_bench_args,
    write_report,
    zoo_root,
    zoo_world_split,
)
from pretrain_cache import EncoderCounter  # noqa: E402

from align.data import world_preference_rows  # noqa: E402
from align.dpo import dpo_trainer  # noqa: E402
from align.training import VLMModelConfig, load_vlm, prepare_for_training  # noqa: E402


class PeakMemory:
    """The process's peak resident memory above its level at start, sampled every 5 ms in a thread (MB)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mb = (self.peak - self.start) / 2**20


def _child(way, path, pairs, args, output_dir, send) -> None:
    quiet_libraries()
    torch.set_num_threads(args.threads)
    send.send(run_once(way, path, pairs, args, output_dir)["peak_mb"])


def peak_memory_in_child(way: str, path: str, pairs, args, output_dir: str) -> float:
    """`run_once`'s peak resident memory above its start, in a fresh process (MB): no way reuses memory another
    one freed."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(way, path, pairs, argparse.Namespace(**vars(args)), output_dir, send))
    child.start()
    peak = receive.recv()
    child.join()
    return peak


def run_once(way: str, path: str, pairs, args, output_dir: str) -> dict:
    model_args = VLMModelConfig(model_name_or_path=path, use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    model, processor = load_vlm(path, model_args)
    peft_config = prepare_for_training(model, model_args)
    config = DPOConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size, beta=0.1,
        learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=args.steps, bf16=False, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, max_length=None, activation_checkpointing=False,
        precompute_ref_log_probs=way != "stock",
    )
    counter = EncoderCounter(model.model.vision_towers)
    t0 = time.perf_counter()
    with PeakMemory() as memory:
        if way in ("ours", "cached"):
            cache = str(Path(output_dir) / "features") if way == "cached" else None
            trainer = dpo_trainer(model, config, pairs, processor, peft_config=peft_config, feature_cache_dir=cache)
        else:
            trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=processor,
                                 peft_config=peft_config)
        trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pairs": len(pairs), "images": counter.images, "peak_mb": memory.mb}


def main(argv=None):
    args = training_bench_args(__doc__.splitlines()[0], argv)
    args.threads = torch.get_num_threads()

    root = zoo_root()
    world = zoo_world_split(root, args.steps * args.batch_size)
    pairs = world_preference_rows(world, per_image=1)
    report = {}
    names = {
        "stock": "stock TRL DPOTrainer", "ours": "dpo_trainer (precomputed reference, one forward per pair)",
        "cached": "dpo_trainer on the feature cache (filled in the timed run)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for shape, path in shape_paths(args, root, tmp):
            # Peak memory, each way in a fresh process.
            peaks = {way: peak_memory_in_child(way, path, pairs, args, str(Path(tmp) / f"mem-{shape}-{way}")) for way in names}

            results = alternating_runs(
                names, args.repeats,
                lambda way, repeat, shape=shape, path=path: run_once(way, path, pairs, args, str(Path(tmp) / f"run-{shape}-{way}-{repeat}")),
                shape, lambda r: f"{r['pairs'] / r['seconds']:6.2f} pairs/s ({r['seconds']:.1f} s, {r['images']} images encoded)",
            )
            speed = {way: statistics.median(r["pairs"] / r["seconds"] for r in runs) for way, runs in results.items()}
            report[shape] = {
                "ratio": speed["ours"] / speed["stock"], "baseline": speed["stock"], "ours": speed["ours"],
                "unit": "pairs/s (one epoch, the reference precompute included)",
                "shape": f"{shape}: {len(pairs)} pairs, batch {args.batch_size}, LoRA r=16",
                "images_per_pair": {way: runs[-1]["images"] / runs[-1]["pairs"] for way, runs in results.items()},
                "feature_cache": {"ratio": speed["cached"] / speed["stock"], "baseline": speed["stock"],
                                  "ours": speed["cached"], "unit": "pairs/s"},
                "peak_memory_mb": peaks,
            }
    print(f"\nDPO with LoRA, {torch.get_num_threads()} torch thread(s), median of {args.repeats} alternating runs:\n")
    print("| shape | stock TRL pairs/s | ours | ratio | ours on the feature cache | ratio | images encoded per pair "
          "(stock / ours / cached) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for shape, r in report.items():
        images, cached = r["images_per_pair"], r["feature_cache"]
        print(f"| {shape} | {r['baseline']:.2f} | {r['ours']:.2f} | {r['ratio']:.2f}x | {cached['ours']:.2f} | "
              f"{cached['ratio']:.2f}x | {images['stock']:.0f} / {images['ours']:.0f} / {images['cached']:.0f} |")
    print("\n| shape | peak resident memory above the start of a fresh process, stock / ours / cached (MB) |\n|---|---|")
    for shape, r in report.items():
        peak = r["peak_memory_mb"]
        print(f"| {shape} | {peak['stock']:.0f} / {peak['ours']:.0f} / {peak['cached']:.0f} |")
    write_report("dpo", report)


if __name__ == "__main__":
    main()
