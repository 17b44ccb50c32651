"""Stage-1 training (adapter pretraining, `align` stage) with and without the vision-feature cache, in one run.

    python bench/pretrain_cache.py                      # the zoo parts in .cache/zoo, else a small zoo built here
    python bench/pretrain_cache.py --fusion cross_attention --steps 30 --repeats 5

Both ways train the same VLM from the same start on the same world captions with TRL's `SFTTrainer`: "pixels" is
TRL's vision collator (images decoded and preprocessed every batch, the frozen towers run every step), "cached"
reads the towers' output from the `FeatureCache` (filled once before; its cost is printed apart). The runs
alternate (the order flips every repetition); the medians of samples/s and their ratio are printed with the work
done: samples, tokens, and vision-tower forward calls and images encoded per sample (forward hooks on the towers).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import quiet_libraries  # noqa: E402

from align.captioning import caption_training_rows  # noqa: E402
from align.data.world import open_world  # noqa: E402
from align.paths import default_cache_dir  # noqa: E402
from align.zoo import ZooConfig, build_zoo, read_manifest  # noqa: E402
from model import freeze_for_stage  # noqa: E402
from model.pretrain import load_or_build_vlm, prepare_stage_data  # noqa: E402

# A zoo small enough to build in a minute when the default one is not there.
SMALL_ZOO = dict(
    train_images=640, validation_images=8, test_images=100, vocab_size=512,
    siglip_steps=20, llama_steps=20, llama_layers=4, llama_hidden_size=64,
)


class EncoderCounter:
    """Forward calls of the vision towers and the images they encoded."""

    def __init__(self, towers):
        self.calls = self.images = 0
        self.handles = [tower.register_forward_hook(self._hook) for tower in towers]

    def _hook(self, module, args, output):
        self.calls += 1
        self.images += output.last_hidden_state.shape[0]

    def reset(self):
        self.calls = self.images = 0


def zoo_root(tmp: str) -> Path:
    root = default_cache_dir()
    if all(read_manifest(root / part) for part in ("world", "siglip", "llama")):
        return root
    print(f"no built zoo in {root}: building a small one in {tmp}", flush=True)
    build_zoo(ZooConfig(cache_dir=tmp, **SMALL_ZOO))
    return Path(tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="prepend", choices=["prepend", "cross_attention"])
    parser.add_argument("--pool", type=int, default=1, help="as in recipes/configs/tiny/pretrain.yaml")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way")
    args = parser.parse_args(argv)
    quiet_libraries()
    logging.getLogger("model").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = zoo_root(str(Path(tmp) / "zoo"))
        model, processor = load_or_build_vlm(
            vision=[str(root / "siglip")], text=str(root / "llama"), fusion=args.fusion, pool=args.pool
        )
        freeze_for_stage(model, "align")
        start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        samples = args.steps * args.batch_size
        rows = caption_training_rows(open_world(root / "world", "train"), limit=samples)
        counter = EncoderCounter(model.model.vision_towers)

        t0 = time.perf_counter()
        cached = prepare_stage_data(rows, model, processor, "align", cache_dir=Path(tmp) / "features", assistant_only_loss=True)
        build_seconds, build_calls, build_images = time.perf_counter() - t0, counter.calls, counter.images
        pixels = prepare_stage_data(rows, model, processor, "align", use_feature_cache="false", assistant_only_loss=True)
        ways = {"pixels": pixels, "cached": cached}

        results = {name: [] for name in ways}
        for repeat in range(args.repeats):
            order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
            for name in order:
                with torch.no_grad():
                    for pname, p in model.named_parameters():
                        if pname in start:
                            p.copy_(start[pname])
                config = SFTConfig(
                    output_dir=str(Path(tmp) / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=2e-3, report_to="none", save_strategy="no", logging_steps=args.steps, bf16=False,
                    max_length=None, assistant_only_loss=True, activation_checkpointing=False, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0,
                )
                trainer = SFTTrainer(
                    model=model, args=config, train_dataset=ways[name].train_dataset,
                    data_collator=ways[name].data_collator, processing_class=processor,
                )
                counter.reset()
                t0 = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - t0
                tokens = next(log["num_tokens"] for log in reversed(trainer.state.log_history) if "num_tokens" in log)
                results[name].append(
                    {"seconds": seconds, "samples": samples, "tokens": tokens, "calls": counter.calls, "images": counter.images}
                )
                print(f"  repeat {repeat + 1} {name:>6}: {samples / seconds:7.1f} samples/s ({seconds:.2f} s)", flush=True)

    speed = {name: statistics.median(r["samples"] / r["seconds"] for r in runs) for name, runs in results.items()}
    print(f"\nStage-1 training, {args.fusion} fusion (pool {args.pool}), {args.steps} steps x {args.batch_size} samples, "
          f"median of {args.repeats} alternating runs each, {torch.get_num_threads()} torch thread(s), parts in {root}:\n")
    print("| way | samples/s (median) | samples | tokens | tower calls / sample | images encoded / sample |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        run = runs[-1]
        print(f"| {name} | {speed[name]:.1f} | {run['samples']} | {int(run['tokens'])} | "
              f"{run['calls'] / run['samples']:.4f} | {run['images'] / run['samples']:.2f} |")
    print(f"\ncached / pixels speed: {speed['cached'] / speed['pixels']:.2f}x")
    print(f"one-off cache build: {build_seconds:.1f} s, {build_calls} tower calls for {build_images} images "
          f"({cached.prepared.encoded} new; {build_images / samples:.2f} images per training sample, once)")


if __name__ == "__main__":
    main()
