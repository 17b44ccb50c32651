"""GRPO steps with stock TRL's `GRPOTrainer` and with the suite's `VisionGRPOTrainer`, in one run, at two shapes.

    python bench/grpo.py                      # both shapes
    python bench/grpo.py --shape tiny --steps 10 --repeats 3

Both ways train the same VLM (reloaded from the same folder for every run) with LoRA on the same world prompts,
the same batch (`prompts` prompts x `generations` answers per step), seed and generation settings; the baseline
generates with the KV cache too (`generation_kwargs={"use_cache": True}`), so the difference measured is the
vision work: TRL hands the pixels of every copy of a prompt to generation, to the reference pass and to the loss;
`VisionGRPOTrainer` encodes each distinct image once per generation batch (`align.grpo.TowerMemo`). Shapes:

- `tiny`: the embedded default's base VLM (64 px images, 64 visual tokens, a 1.7M-parameter LLM);
- `realistic`: random weights built from config, a SigLIP-base-like tower at 224 px (196 patches; 5 layers of width
  384) and a Llama of width 512 and depth 8, so that one image costs the tower about 0.3x what the LLM spends on
  the prompt it sits in, as SigLIP-so400m at 384 px does in front of Llama-3.2-1B (shrunk to run on a CPU).

Runs alternate (the order flips every repetition); medians of answers/s and their ratio are printed with the images
the towers encoded per prompt (forward hooks on the towers). Writes `runs/bench/grpo.json`. Asserts nothing.
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
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.grpo import VisionGRPOTrainer, reward_functions  # noqa: E402
from align.prompts import load_prompts  # noqa: E402
from align.training import VLMModelConfig, load_vlm, prepare_for_training  # noqa: E402
from model.build import build_vlm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, quiet_libraries, write_report, zoo_root  # noqa: E402
from pretrain_cache import EncoderCounter  # noqa: E402


def realistic_vlm(folder: Path, tokenizer_path: Path) -> str:
    """A VLM of the realistic shape with random weights, saved to `folder`."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    vision = SiglipVisionConfig(
        image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=5, num_attention_heads=6,
    )
    SiglipVisionModel(vision).save_pretrained(folder / "siglip")
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder / "siglip")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(text).save_pretrained(folder / "llama")
    tokenizer.save_pretrained(folder / "llama")
    model, processor = build_vlm(str(folder / "siglip"), str(folder / "llama"))
    model.save_pretrained(folder / "vlm")
    processor.save_pretrained(folder / "vlm")
    return str(folder / "vlm")


def run_once(trainer_class, path: str, prompts, args, output_dir: str) -> dict:
    model_args = VLMModelConfig(model_name_or_path=path, use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    model, processor = load_vlm(path, model_args)
    peft_config = prepare_for_training(model, model_args)
    config = GRPOConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_completion_length, beta=0.04,
        learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=args.steps, bf16=False, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, generation_kwargs={"use_cache": True},
    )
    trainer = trainer_class(
        model=model, reward_funcs=reward_functions(["verifier", "format"]), args=config, train_dataset=prompts,
        processing_class=processor, peft_config=peft_config,
    )
    counter = EncoderCounter(model.model.vision_towers)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    answers = args.steps * args.prompts * args.generations
    return {"seconds": seconds, "answers": answers, "images": counter.images, "prompts": args.steps * args.prompts}


def bench_shape(shape: str, path: str, prompts, args, tmp: str) -> dict:
    ways = {"stock TRL GRPOTrainer": GRPOTrainer, "VisionGRPOTrainer": VisionGRPOTrainer}
    results = {name: [] for name in ways}
    run_once(VisionGRPOTrainer, path, prompts, argparse.Namespace(**{**vars(args), "steps": 1}), tmp)  # warm-up
    for repeat in range(args.repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
        for name in order:
            result = run_once(ways[name], path, prompts, args, tmp)
            results[name].append(result)
            print(f"  {shape} repeat {repeat + 1} {name:>22}: {result['answers'] / result['seconds']:6.2f} answers/s "
                  f"({result['seconds']:.1f} s, {result['images']} images encoded)", flush=True)
    speed = {name: statistics.median(r["answers"] / r["seconds"] for r in runs) for name, runs in results.items()}
    images = {name: runs[-1]["images"] / runs[-1]["prompts"] for name, runs in results.items()}
    baseline, ours = speed["stock TRL GRPOTrainer"], speed["VisionGRPOTrainer"]
    return {
        "ratio": ours / baseline, "baseline": baseline, "ours": ours, "unit": "answers/s",
        "shape": f"{shape}: {args.prompts} prompts x {args.generations} answers per step, {args.steps} steps, "
                 f"up to {args.max_completion_length} new tokens, LoRA r=16, beta 0.04",
        "images_per_prompt": images,
    }


def main(argv=None):
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed run")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="answers per prompt (the group)")
    parser.add_argument("--max_completion_length", type=int, default=8)
    args = parser.parse_args(argv)
    quiet_libraries()
    logging.disable(logging.WARNING)

    root = zoo_root()
    prompts = load_prompts(root / "world", num_prompts=args.steps * args.prompts * 4)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = ["tiny", "realistic"] if args.shape == "both" else [args.shape]
        for shape in shapes:
            path = str(root / "base") if shape == "tiny" else realistic_vlm(Path(tmp) / "realistic", root / "tokenizer")
            report[shape] = bench_shape(shape, path, prompts, args, str(Path(tmp) / "run"))

    print(f"\nGRPO with LoRA, {torch.get_num_threads()} torch thread(s), median of {args.repeats} alternating runs:\n")
    print("| shape | stock TRL answers/s | ours answers/s | ratio | images encoded per prompt (stock -> ours) |")
    print("|---|---:|---:|---:|---|")
    for shape, r in report.items():
        images = r["images_per_prompt"]
        print(f"| {shape} | {r['baseline']:.2f} | {r['ours']:.2f} | {r['ratio']:.2f}x | "
              f"{images['stock TRL GRPOTrainer']:.1f} -> {images['VisionGRPOTrainer']:.2f} |")
    write_report("grpo", report)


if __name__ == "__main__":
    main()
