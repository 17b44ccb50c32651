"""Synthetic Q&A augmentation: a text-only LLM writes question-answer pairs from captions, and only checked pairs
are kept (the world's verifier where an image has a scene graph, a reward model's score otherwise).

    python recipes/augment.py --config recipes/configs/tiny/augment.yaml
    python recipes/augment.py --config recipes/configs/real/augment.yaml

Writes to `output_dir`: `data/` (the kept pairs as SFT rows, a `save_to_disk` folder that `recipes/sft.py` takes as
a mixture source: `datasets: [{path: <output_dir>/data}]`), `generated.jsonl` (every sampled text with each line's
outcome), `metrics.json` (generated / parsed / unique / kept, the yield, kept per category, rejections per reason)
and `config.yaml` (the resolved settings, re-runnable with `--config`).
"""

import json
import logging
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import TrlParser

from align.augment import (
    AugmentArguments,
    AugmentOutputArguments,
    GenerationArguments,
    augment,
    load_captioned_images,
    needs_reward_model,
    reward_score_fn,
)
from align.paths import default_cache_dir
from align.runs import claim_output_dir, resolved_config, save_metrics, save_resolved_config, staged_dir

logger = logging.getLogger(__name__)
CONFIG_HEADER = "Resolved settings of this run; rerun with: python recipes/augment.py --config <this file>"


def main(script_args: AugmentArguments, generation_args: GenerationArguments, output_args: AugmentOutputArguments):
    # ------------------------------------------------------------------ logging and seed
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    datasets.disable_progress_bars()
    set_seed(output_args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    claim_output_dir(output_args.output_dir, resolved_config(script_args, generation_args, output_args),
                     force=output_args.force)

    # ------------------------------------------------------------------ data
    images = load_captioned_images(script_args.world_path, script_args.world_split, script_args.world_images)
    if script_args.caption_column not in images.column_names:
        raise ValueError(
            f"caption_column {script_args.caption_column!r} is not a column of the data; columns: {images.column_names}"
        )

    # ------------------------------------------------------------------ models: the LLM (and the reward model)
    llm_path = Path(script_args.llm_name_or_path or default_cache_dir() / "llama")
    if not llm_path.is_dir():
        raise ValueError(
            f"llm_name_or_path {llm_path} is not a model folder (build the zoo's with `python -m align.zoo`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    dtype = "auto" if script_args.dtype == "auto" else getattr(torch, script_args.dtype)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype).to(device)
    logger.info("LLM %s (%.2fM parameters) on %s", llm_path, llm.num_parameters() / 1e6, device)
    score_fn = None
    if needs_reward_model(images, script_args.filter):
        if not script_args.reward_model_name_or_path:
            raise ValueError(
                f"filter={script_args.filter!r} sends images without a scene graph to the reward model: set "
                "reward_model_name_or_path (or use a world with a `scene` column)"
            )
        score_fn = reward_score_fn(script_args.reward_model_name_or_path, script_args.reward_batch_size, device)

    # ------------------------------------------------------------------ generate, parse, deduplicate, filter
    output_dir = Path(output_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    kept, stats = augment(
        images, llm, tokenizer, caption_column=script_args.caption_column,
        samples_per_caption=generation_args.samples_per_caption, temperature=generation_args.temperature,
        top_p=generation_args.top_p, max_new_tokens=generation_args.max_new_tokens,
        batch_size=generation_args.batch_size, seed=output_args.seed, method=script_args.filter, score_fn=score_fn,
        threshold=script_args.reward_threshold, template=generation_args.prompt_template,
        generations_path=output_dir / "generated.jsonl",
    )

    # ------------------------------------------------------------------ save
    # `datasets` writes no shard at all for an empty dataset unless told to, and cannot load that folder back.
    with staged_dir(output_dir / "data") as staging:
        kept.save_to_disk(str(staging), num_shards=None if len(kept) else 1)
    save_resolved_config(output_dir / "config.yaml", script_args, generation_args, output_args, header=CONFIG_HEADER)
    save_metrics(output_dir / "metrics.json", {**stats, "llm": str(llm_path)})  # last: it marks the run done
    if len(kept) == 0:
        logger.warning("no pair was kept; see %s for what the LLM wrote", output_dir / "generated.jsonl")
    logger.info("wrote %d SFT rows to %s; train on them with `datasets: [{path: %s}]` in an SFT config",
                len(kept), output_dir / "data", output_dir / "data")
    print(json.dumps(stats, indent=2))
    return stats


def make_parser() -> TrlParser:
    return TrlParser((AugmentArguments, GenerationArguments, AugmentOutputArguments))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
