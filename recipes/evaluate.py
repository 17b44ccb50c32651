"""Evaluate a VLM on held-out shapes-world questions: greedy answers, accuracy per category, text-only regression.

    accelerate launch recipes/evaluate.py --config recipes/configs/tiny/evaluate.yaml
    python recipes/evaluate.py --config recipes/configs/tiny/evaluate.yaml --model_name_or_path runs/tiny/sft

`model_name_or_path` is a whole VLM folder or a PEFT adapter folder (`adapter_config.json`), which is applied to
its base VLM (`load_in_4bit: true` loads that base in 4-bit, as for QLoRA). The questions are the zoo world's
`test` split unless `dataset_path` names other ones (see `align.evaluation.load_eval_questions`). With several
processes the questions are sharded and the main process scores and writes. Writes to `output_dir`:
`predictions.jsonl`, `eval_table.md`, `eval_config.json` and, last, `metrics.json`. With `num_samples` N > 1 it
also samples N answers per question (best-of-N decoding: each image encoded once, each prompt prefilled once) and
reports pass@k and majority-vote maj@N next to the greedy accuracy; a rerun into the same folder
with other settings is refused unless `--force`.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import gather_object
from trl import ModelConfig, TrlParser, get_quantization_config

from align.data.mixture import DatasetNameArgument
from align.data.world import open_world
from align.evaluation import (
    PREDICTIONS,
    category_table,
    generate_answers,
    load_eval_questions,
    prediction_rows,
    sample_answers,
    sampled_metrics,
    sampled_table,
    score_answers,
    text_regression,
    text_regression_table,
)
from align.families import family_of
from align.loading import load_run
from align.paths import default_cache_dir
from align.runs import (
    RunArguments,
    atomic_file,
    atomic_write_text,
    claim_output_dir,
    resolved_config,
    save_metrics,
)
from align.zoo import lm_documents

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments(RunArguments, DatasetNameArgument):
    """What to evaluate on and where the results go (the model is `ModelConfig.model_name_or_path`)."""

    output_dir: str = field(metadata={"help": "Folder for metrics.json, eval_table.md and predictions.jsonl."})
    world_path: str | None = field(
        default=None,
        metadata={"help": "Shapes world folder (default: the zoo's, .cache/zoo/world or $VLM_ALIGN_CACHE/world)."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Held-out questions: a world folder, a save_to_disk folder of prompt rows with `record`, or a "
            "TRL JSON/JSONL file of prompt rows with `record`. Default: world_path."
        },
    )
    dataset_split: str = field(default="test", metadata={"help": "Split of the world / DatasetDict to evaluate on."})
    num_questions: int | None = field(default=None, metadata={"help": "Evaluate the first N questions (default: all)."})
    categories: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluate only the questions of these categories (before num_questions is taken), e.g. "
                  "`--categories spatial` for many spatial questions without the rest (default: all)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (per process)."})
    share_images: bool = field(
        default=True,
        metadata={"help": "Batch the questions of one image together and encode and prefill the image (and the prompt "
                  "up to it) once per image, not once per question (`align.sampling.generate_sharing_images`; the "
                  "suite's prepend VLMs, the ordinary way otherwise). The same greedy answers (tested)."},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Answer length limit in tokens."})
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base VLM of an adapter (default: the base_model_name_or_path in adapter_config.json)."},
    )
    base_llm: str | None = field(
        default=None,
        metadata={
            "help": "Base LLM folder: when set, compare the VLM's text-only loss and logits with it (text regression) "
            "on held-out documents of world_path's dataset_split."
        },
    )
    text_documents: int = field(
        default=64, metadata={"help": "Held-out world documents (captions, Q&A, chats) for the text regression."}
    )
    num_samples: int = field(
        default=1,
        metadata={"help": "Besides the greedy answer, sample this many answers per question (N > 1) and report "
                  "pass@k (k = 1, 2, 4, ..., N) and majority-vote accuracy maj@N, overall and per category. Each "
                  "image is encoded once and each prompt prefilled once for its N samples."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the N samples (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass of the N samples (1.0: off)."})
    seed: int = field(default=42, metadata={"help": "Random seed (the N samples' batches are seeded from it)."})

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens", "text_documents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.merge_dataset_name()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1 (1: greedy answers only), got {self.num_samples}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.num_questions is not None and self.num_questions < 1:
            raise ValueError(f"num_questions must be at least 1 or unset (all), got {self.num_questions}")


def main(script_args: EvaluateArguments, model_args: ModelConfig):
    # ----- logging and seed -------------------------------------------------------------------------------------
    # cpu=True lets several CPU processes (torchrun) form a gloo group; accelerate defaults to one process there.
    state = PartialState(cpu=not torch.accelerator.is_available())
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    datasets.disable_progress_bars()
    transformers.set_seed(script_args.seed)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required: a VLM folder or a PEFT adapter folder")
    if script_args.base_llm and not Path(script_args.base_llm).is_dir():
        # Checked here, not when parsing, so that a config naming the zoo's LLM parses before the zoo is built.
        raise ValueError(f"base_llm {script_args.base_llm!r} is not a local folder (leave it unset to skip the text regression)")
    output_dir = Path(script_args.output_dir)
    with state.main_process_first():
        claim_output_dir(output_dir, resolved_config(script_args, model_args), force=script_args.force,
                         main_process=state.is_main_process)

    # ----- model and processor ----------------------------------------------------------------------------------
    model, processor = load_run(
        model_args.model_name_or_path,
        base_model_name_or_path=script_args.base_model_name_or_path,
        dtype=model_args.dtype,
        quantization_config=get_quantization_config(model_args),
        device=state.device,
        attn_implementation=model_args.attn_implementation,
        merge=True,  # an adapter merged into a full-precision base: faster decoding, the same model
    )
    logger.info("evaluating %s (%s)", model_args.model_name_or_path, family_of(model).name)

    # ----- data -------------------------------------------------------------------------------------------------
    world_path = Path(script_args.world_path) if script_args.world_path else default_cache_dir() / "world"
    questions = load_eval_questions(
        script_args.dataset_path or world_path, split=script_args.dataset_split, n=script_args.num_questions,
        categories=script_args.categories,
    )
    logger.info("%d held-out questions from %s", len(questions), script_args.dataset_path or world_path)

    # ----- answer (sharded over processes) ----------------------------------------------------------------------
    start = time.perf_counter()
    with state.split_between_processes(list(range(len(questions)))) as shard:
        answers = []
        if shard:
            answers = generate_answers(
                model, processor, questions.select(shard), batch_size=script_args.batch_size,
                max_new_tokens=script_args.max_new_tokens, share_images=script_args.share_images,
            )
    predictions = gather_object(answers) if state.num_processes > 1 else answers
    seconds = time.perf_counter() - start

    # ----- N sampled answers per question (sharded over processes) ----------------------------------------------
    samples = None
    if script_args.num_samples > 1:
        with state.split_between_processes(list(range(len(questions)))) as shard:
            sampled = []
            if shard:
                sampled = sample_answers(
                    model, processor, questions.select(shard), script_args.num_samples,
                    temperature=script_args.temperature, top_p=script_args.top_p,
                    max_new_tokens=script_args.max_new_tokens, batch_size=script_args.batch_size,
                    seed=script_args.seed + shard[0],
                )
        samples = gather_object(sampled) if state.num_processes > 1 else sampled
    if not state.is_main_process:
        return None

    # ----- score ------------------------------------------------------------------------------------------------
    metrics = score_answers(questions["record"], predictions)
    metrics.update(seconds=round(seconds, 2), questions_per_second=round(len(predictions) / seconds, 2))
    rows = prediction_rows(questions, predictions)
    table = "## Held-out accuracy\n\n" + category_table(metrics)
    if samples is not None:
        metrics.update(sampled_metrics(questions["record"], samples))
        for row, group in zip(rows, samples):
            row["samples"] = group
        table += f"\n\n## {script_args.num_samples} sampled answers per question\n\n" + sampled_table(metrics)
        logger.info("pass@1 %.1f%%, pass@%d %.1f%%, maj@%d %.1f%%", 100 * metrics["pass@1"], script_args.num_samples,
                    100 * metrics[f"pass@{script_args.num_samples}"], script_args.num_samples,
                    100 * metrics[f"maj@{script_args.num_samples}"])

    # ----- text-only regression against the base LLM ------------------------------------------------------------
    if script_args.base_llm:
        world = open_world(world_path)
        docs = lm_documents(world, script_args.dataset_split, processor.tokenizer)
        step = max(1, len(docs) // script_args.text_documents)
        drift = text_regression(model, processor, script_args.base_llm, docs[::step][: script_args.text_documents])
        metrics.update({f"text_{key}": value for key, value in drift.items()})
        table += "\n\n## Text-only regression against the base LLM\n\n" + text_regression_table(drift)
        logger.info("text-only perplexity %.3f (base LLM %.3f)", drift["vlm_perplexity"], drift["base_perplexity"])

    # ----- save -------------------------------------------------------------------------------------------------
    metrics["model_name_or_path"] = model_args.model_name_or_path
    with atomic_file(output_dir / PREDICTIONS) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    atomic_write_text(output_dir / "eval_table.md", table + "\n")
    config = {"script_args": asdict(script_args), "model_args": asdict(model_args)}
    atomic_write_text(output_dir / "eval_config.json", json.dumps(config, indent=2, default=str))
    save_metrics(output_dir / "metrics.json", metrics)  # last: it marks the evaluation done
    logger.info("accuracy %.1f%% ± %.1f on %d questions; wrote %s", 100 * metrics["accuracy"], 100 * metrics["stderr"],
                metrics["total"], output_dir)
    print(table)
    return metrics


def make_parser() -> TrlParser:
    return TrlParser((EvaluateArguments, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
