"""SFT with LoRA three ways, in one run, at two shapes: padded batches on pixels (TRL's vision collator), on cached
vision features, and padding-free (one row per batch, positions restarting per sample) on pixels.

    python bench/sft.py                      # both shapes
    python bench/sft.py --shape realistic --steps 10

Both ways train the same VLM (reloaded for every run) with LoRA r=16 on the same world conversations, batch and seed
through TRL's `SFTTrainer`: "pixels" is TRL's vision collator (images preprocessed and the frozen towers run every
step), "cached" reads the towers' output from the feature cache (`recipes/sft.py --use_feature_cache true`; filled once
before, its cost printed apart). Shapes as in `bench/grpo.py`. Runs alternate; medians of samples/s and their ratio
are printed with the images encoded per sample and the tokens the model ran per useful token. Writes
`runs/bench/sft.json`. Asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_runs, shape_paths, training_bench_args, write_report, zoo_root, zoo_world_split  # noqa: E402
from pretrain_cache import EncoderCounter  # noqa: E402

from align.data import world_sft_rows  # noqa: E402
from align.sft import padding_free_collator  # noqa: E402
from align.training import VLMModelConfig, load_vlm, prepare_for_training  # noqa: E402
from model.pretrain import prepare_stage_data  # noqa: E402


def run_once(way: str, path: str, rows, args, tmp: str) -> dict:
    model_args = VLMModelConfig(model_name_or_path=path, use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    model, processor = load_vlm(path, model_args)
    peft_config = prepare_for_training(model, model_args)
    counter = EncoderCounter(model.model.vision_towers)
    t0 = time.perf_counter()
    data = prepare_stage_data(rows, model, processor, "finetune", use_feature_cache="true" if way == "cached" else "false",
                              cache_dir=Path(tmp) / "features", assistant_only_loss=True)
    build = time.perf_counter() - t0
    config = SFTConfig(
        output_dir=str(Path(tmp) / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=args.steps, bf16=False, use_cpu=True,
        max_length=None, assistant_only_loss=True, activation_checkpointing=False, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data.train_dataset, data_collator=data.data_collator,
                         processing_class=processor, peft_config=peft_config)
    if way == "padding-free":
        trainer.data_collator = padding_free_collator(trainer, model)
    tokens = {"ran": 0, "useful": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens["ran"] += batch["input_ids"].numel()
        tokens["useful"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    counter.reset()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    samples = args.steps * args.batch_size
    return {"seconds": seconds, "samples": samples, "images": counter.images, "build_seconds": build,
            "useful_tokens": tokens["useful"], "ran_tokens": tokens["ran"]}


def main(argv=None):
    args = training_bench_args(__doc__.splitlines()[0], argv)
    root = zoo_root()
    world = zoo_world_split(root, args.steps * args.batch_size)
    rows = world_sft_rows(world)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, path in shape_paths(args, root, tmp):

            results = alternating_runs(
                ["pixels", "cached", "padding-free"], args.repeats,
                lambda way, repeat, shape=shape, path=path: run_once(way, path, rows, args, str(Path(tmp) / f"{shape}-{way}-{repeat}")),
                shape, lambda r: f"{r['samples'] / r['seconds']:6.2f} samples/s ({r['seconds']:.1f} s, {r['images']} "
                f"images encoded in training; cache build {r['build_seconds']:.1f} s)",
            )
            speed = {way: statistics.median(r["samples"] / r["seconds"] for r in runs) for way, runs in results.items()}
            report[shape] = {
                "ratio": speed["cached"] / speed["pixels"], "baseline": speed["pixels"], "ours": speed["cached"],
                "unit": "samples/s (training, the one-off cache build apart)",
                "shape": f"{shape}: {args.steps} steps x {args.batch_size} conversations, LoRA r=16",
                "images_per_sample": {w: runs[-1]["images"] / runs[-1]["samples"] for w, runs in results.items()},
                "padding_free": {
                    "ratio": speed["padding-free"] / speed["pixels"], "baseline": speed["pixels"],
                    "ours": speed["padding-free"], "unit": "samples/s (same useful tokens)",
                    "tokens_run_per_useful_token": {
                        w: runs[-1]["ran_tokens"] / runs[-1]["useful_tokens"] for w, runs in results.items()
                    },
                },
                "cache_build_seconds": statistics.median(r["build_seconds"] for r in results["cached"]),
            }
    print(f"\nSFT with LoRA, {torch.get_num_threads()} torch thread(s), median of {args.repeats} alternating runs:\n")
    print("| shape | padded, pixels samples/s | cached samples/s | ratio | tower images per sample | one-off cache build |")
    print("|---|---:|---:|---:|---|---:|")
    for shape, r in report.items():
        images = r["images_per_sample"]
        print(f"| {shape} | {r['baseline']:.2f} | {r['ours']:.2f} | {r['ratio']:.2f}x | "
              f"{images['pixels']:.0f} -> {images['cached']:.0f} | {r['cache_build_seconds']:.1f} s |")
    print("\n| shape | padded samples/s | padding-free samples/s | ratio | tokens run per useful token (padded -> padding-free) |")
    print("|---|---:|---:|---:|---|")
    for shape, r in report.items():
        free = r["padding_free"]
        ran = free["tokens_run_per_useful_token"]
        print(f"| {shape} | {free['baseline']:.2f} | {free['ours']:.2f} | {free['ratio']:.2f}x | "
              f"{ran['pixels']:.2f} -> {ran['padding-free']:.2f} |")
    write_report("sft", report)


if __name__ == "__main__":
    main()
