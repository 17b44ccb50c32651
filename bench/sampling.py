"""Best-of-8 sampling two ways, in one run, at two shapes: `generate(num_return_sequences=8)` (every prompt copied 8
times before the first forward: its images encoded and its prompt prefilled 8 times) and the shared prefill of
`align.sampling.generate_groups` (each image encoded once, each prompt prefilled once, the 8 candidates decoded from
copies of its KV cache), the way rejection sampling samples.

    python bench/sampling.py                      # both shapes
    python bench/sampling.py --shape realistic --batches 4

Both ways sample the same prompts (the world's questions, 8 per batch) with the same seed and settings (temperature 1,
up to `max_new_tokens` tokens, the KV cache on); with the same seed they draw the same candidates (the tests check).
Shapes as in `bench/grpo.py`: the embedded default's base VLM, and a realistic one with random weights (a
SigLIP-base-like tower at 224 px in front of a Llama at the so400m : Llama-3.2-1B cost ratio). Runs alternate; the
medians of candidates/s and their ratio are printed with the images encoded per prompt. Writes
`runs/bench/sampling.json`. Asserts nothing.
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
from common import bench_parser, quiet_libraries, write_report, zoo_root  # noqa: E402
from grpo import realistic_vlm  # noqa: E402
from pretrain_cache import EncoderCounter  # noqa: E402

from align.prompts import load_prompts  # noqa: E402
from align.sampling import generate_groups  # noqa: E402
from model import VLMForConditionalGeneration, VLMProcessor  # noqa: E402


def batches_of(processor, prompts, size: int, count: int) -> list[dict]:
    out = []
    for b in range(count):
        rows = [prompts[i] for i in range(b * size, (b + 1) * size)]
        texts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
        out.append(dict(processor(images=[list(r["images"]) for r in rows], text=texts, padding=True,
                                  padding_side="left", return_tensors="pt")))
    return out


def main(argv=None):
    parser = bench_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--prompts_per_batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="batches per timed run")
    parser.add_argument("--max_new_tokens", type=int, default=12)
    args = parser.parse_args(argv)
    quiet_libraries()

    root = zoo_root()
    prompts = load_prompts(root / "world", num_prompts=args.prompts_per_batch * args.batches)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = ["tiny", "realistic"] if args.shape == "both" else [args.shape]
        for shape in shapes:
            path = str(root / "base") if shape == "tiny" else realistic_vlm(Path(tmp) / "realistic", root / "tokenizer")
            model, processor = VLMForConditionalGeneration.from_pretrained(path).eval(), VLMProcessor.from_pretrained(path)
            batches = batches_of(processor, prompts, args.prompts_per_batch, args.batches)
            tokenizer = processor.tokenizer
            settings = dict(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            n = args.candidates

            def plain(inputs, model=model, n=n, settings=settings):
                return model.generate(**inputs, num_return_sequences=n, use_cache=True, **settings)

            def shared(inputs, model=model, n=n, settings=settings):
                return generate_groups(model, dict(inputs), n, **settings)

            ways = {"generate(num_return_sequences)": plain, "shared prefill": shared}
            counter = EncoderCounter(model.model.vision_towers)
            results = {name: [] for name in ways}
            with torch.no_grad():
                shared(batches[0])  # warm-up
                for repeat in range(args.repeats):
                    order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
                    for name in order:
                        torch.manual_seed(repeat)
                        counter.reset()
                        t0 = time.perf_counter()
                        for inputs in batches:
                            ways[name](inputs)
                        seconds = time.perf_counter() - t0
                        candidates = n * args.prompts_per_batch * args.batches
                        results[name].append({"seconds": seconds, "candidates": candidates, "images": counter.images})
                        print(f"  {shape} repeat {repeat + 1} {name:>32}: {candidates / seconds:7.1f} candidates/s "
                              f"({counter.images} images encoded)", flush=True)
            speed = {name: statistics.median(r["candidates"] / r["seconds"] for r in runs) for name, runs in results.items()}
            prompts_run = args.prompts_per_batch * args.batches
            baseline, ours = speed["generate(num_return_sequences)"], speed["shared prefill"]
            report[shape] = {
                "ratio": ours / baseline, "baseline": baseline, "ours": ours, "unit": "candidates/s",
                "shape": f"{shape}: best-of-{n}, {args.prompts_per_batch} prompts per batch, {args.batches} batches, "
                         f"up to {args.max_new_tokens} new tokens",
                "images_per_prompt": {name: runs[-1]["images"] / prompts_run for name, runs in results.items()},
            }

    print(f"\nBest-of-{args.candidates} sampling, {torch.get_num_threads()} torch thread(s), median of {args.repeats} "
          "alternating runs:\n")
    print("| shape | generate(num_return_sequences) | shared prefill | ratio | images encoded per prompt |")
    print("|---|---:|---:|---:|---|")
    for shape, r in report.items():
        images = r["images_per_prompt"]
        print(f"| {shape} | {r['baseline']:.1f} candidates/s | {r['ours']:.1f} candidates/s | {r['ratio']:.2f}x | "
              f"{images['generate(num_return_sequences)']:.0f} -> {images['shared prefill']:.0f} |")
    write_report("sampling", report)


if __name__ == "__main__":
    main()
