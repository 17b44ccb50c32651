"""Held-out evaluation two ways, in one run, at two shapes: the ordinary greedy `generate` over batches sorted by
prompt length (every question encodes its image and prefills its whole prompt) and `share_images` (the questions of
one image batched together, the image encoded and the prompt up to it prefilled once per image:
`align.sampling.generate_sharing_images`), the way `recipes/evaluate.py` answers.

    python bench/evaluation.py                      # both shapes
    python bench/evaluation.py --shape tiny --questions 600

Both ways answer the same test questions of the shapes world (about 6 per image) with the same settings; the table
gives questions/s, their ratio and how many answers agree (the tests check that they are the same). Shapes as in
`bench/grpo.py`: the embedded default's base VLM, and a realistic one with random weights (a SigLIP-base-like tower at
224 px in front of a Llama at the so400m : Llama-3.2-1B cost ratio). Runs alternate; medians are printed. Writes
`runs/bench/evaluation.json`. Asserts nothing.
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
from common import alternating_runs, bench_parser, quiet_libraries, shape_paths, write_report, zoo_root  # noqa: E402

from align.evaluation import generate_answers, load_eval_questions  # noqa: E402
from model import VLMForConditionalGeneration, VLMProcessor  # noqa: E402


def main(argv=None):
    parser = bench_parser(__doc__.splitlines()[0], repeats=2)
    parser.add_argument("--questions", type=int, default=None, help="test questions (default: 600 tiny, 96 realistic)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args(argv)
    quiet_libraries()

    root = zoo_root()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, path in shape_paths(args, root, tmp):
            model, processor = VLMForConditionalGeneration.from_pretrained(path).eval(), VLMProcessor.from_pretrained(path)
            count = args.questions or (600 if shape == "tiny" else 96)
            questions = load_eval_questions(root / "world", split="test", n=count)
            settings = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "log_every": 0}
            ways = {"plain": False, "shared": True}

            def run(way, repeat, model=model, processor=processor, questions=questions, settings=settings, ways=ways):
                start = time.perf_counter()
                with torch.no_grad():
                    answers = generate_answers(model, processor, questions, share_images=ways[way], **settings)
                return {"seconds": time.perf_counter() - start, "answers": answers}

            results = alternating_runs(ways, args.repeats, run, shape,
                                       lambda r, count=count: f"{count / r['seconds']:7.1f} questions/s")
            speed = {way: statistics.median(count / r["seconds"] for r in runs) for way, runs in results.items()}
            same = sum(a == b for a, b in zip(results["plain"][-1]["answers"], results["shared"][-1]["answers"]))
            report[shape] = {
                "ratio": speed["shared"] / speed["plain"], "baseline": speed["plain"], "ours": speed["shared"],
                "unit": "questions/s", "same_answers": same, "questions": count,
                "shape": f"{shape}: {count} test questions, {args.batch_size} per batch, up to {args.max_new_tokens} new tokens",
            }

    print(f"\nHeld-out evaluation, {torch.get_num_threads()} torch thread(s), median of {args.repeats} alternating runs:\n")
    print("| shape | ordinary generate | images shared | ratio | same answers |")
    print("|---|---:|---:|---:|---:|")
    for shape, r in report.items():
        print(f"| {shape} | {r['baseline']:.1f} questions/s | {r['ours']:.1f} questions/s | {r['ratio']:.2f}x | "
              f"{r['same_answers']} of {r['questions']} |")
    write_report("evaluation", report)


if __name__ == "__main__":
    main()
