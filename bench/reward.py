"""Reward-model training with LoRA two ways, in one run, at two shapes: each preference pair's chosen and rejected
conversations run as two rows (what transformers' Trainer does with a pairwise batch; TRL's `RewardTrainer` is
text-only and drops the images, so it cannot be the baseline) and as one sequence per pair, the image and prompt
shared (`align.reward.pack_reward_pairs`, `VLMRewardConfig.pack_pairs`). Both ways encode each pair's image once.

    python bench/reward.py                      # both shapes
    python bench/reward.py --shape tiny --steps 20

Both ways train the same reward model (built from the same VLM for every run, its head at zero) with LoRA r=16 on
the same world preference pairs, batch and seed, one epoch over `steps x batch` pairs. Shapes as in
`bench/grpo.py`. Runs alternate; medians of pairs/s and their ratio are printed. Writes `runs/bench/reward.json`.
Asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternating_runs, shape_paths, training_bench_args, write_report, zoo_root, zoo_world_split  # noqa: E402

from align.data import world_preference_rows  # noqa: E402
from align.reward import VLMRewardConfig, prepare_reward_model, reward_trainer  # noqa: E402
from align.training import VLMModelConfig  # noqa: E402
from model import VLMForRewardModeling, VLMProcessor  # noqa: E402

WAYS = {"rows": "chosen and rejected as two rows", "packed": "one sequence per pair (pack_pairs)"}


def run_once(way: str, path: str, pairs, args, output_dir: str) -> dict:
    torch.manual_seed(0)
    model = VLMForRewardModeling.from_vlm(path)
    processor = VLMProcessor.from_pretrained(path)
    model_args = VLMModelConfig(model_name_or_path=path, use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    peft_config = prepare_reward_model(model, model_args)
    config = VLMRewardConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
        report_to="none", save_strategy="no", logging_steps=args.steps, bf16=False, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_length=None, activation_checkpointing=False, pack_pairs=way == "packed",
    )
    trainer = reward_trainer(model, config, pairs, processor, peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t0, "pairs": len(pairs)}


def main(argv=None):
    args = training_bench_args(__doc__.splitlines()[0], argv)
    root = zoo_root()
    pairs = world_preference_rows(zoo_world_split(root, args.steps * args.batch_size), per_image=1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, path in shape_paths(args, root, tmp):

            results = alternating_runs(
                WAYS, args.repeats,
                lambda way, repeat, shape=shape, path=path: run_once(way, path, pairs, args, str(Path(tmp) / f"run-{shape}-{way}-{repeat}")),
                shape, lambda r: f"{r['pairs'] / r['seconds']:6.2f} pairs/s ({r['seconds']:.1f} s)",
            )
            speed = {way: statistics.median(r["pairs"] / r["seconds"] for r in runs) for way, runs in results.items()}
            report[shape] = {
                "ratio": speed["packed"] / speed["rows"], "baseline": speed["rows"], "ours": speed["packed"],
                "unit": "pairs/s (one epoch)", "shape": f"{shape}: {len(pairs)} pairs, batch {args.batch_size}, LoRA r=16",
            }
    print(f"\nReward model with LoRA, {torch.get_num_threads()} torch thread(s), median of {args.repeats} alternating runs:\n")
    print(f"| shape | {WAYS['rows']}, pairs/s | {WAYS['packed']} | ratio |\n|---|---:|---:|---:|")
    for shape, r in report.items():
        print(f"| {shape} | {r['baseline']:.2f} | {r['ours']:.2f} | {r['ratio']:.2f}x |")
    write_report("reward", report)


if __name__ == "__main__":
    main()
