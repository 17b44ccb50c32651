"""Rejection sampling: sample N answers per prompt from a policy, score them, keep the best for SFT and the
(best, worst) pairs for DPO.

    accelerate launch recipes/rejection_sampling.py --config recipes/configs/tiny/rejection_sampling.yaml
    python recipes/rejection_sampling.py --config recipes/configs/tiny/rejection_sampling.yaml \
        --model_name_or_path runs/tiny/sft --scorer combined --reward_model_name_or_path runs/tiny/reward

The prompts are the zoo world's questions (`dataset_split`, from `prompt_offset`, `num_prompts` of them) or a local
prompt set (`dataset_path`). Scorers: `verifier` (the world's answer checker; needs question records), `reward`
(a reward model from recipes/reward.py) or `combined` (weighted sum). With a reward model and question records, the
reward model's ranking is compared with the verifier's (`reward_verifier_agreement`). A killed run continues where
it stopped when started again with the same settings. Writes to `output_dir`: `candidates.jsonl` (every prompt's
candidates and scores), `sft/` and `dpo/` (`save_to_disk` datasets that recipes/sft.py and recipes/dpo.py read as
`datasets:` entries), `metrics.json` (statistics: score distribution, kept rows, pass@1, pass@N, per category),
`run_settings.json` and `rejects.jsonl`. A rerun with other settings into the same folder is refused unless `--force`.
"""

import logging
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_quantization_config

from align.loading import load_run
from align.rejection_sampling import (
    RejectionSamplingArguments,
    build_datasets,
    collect,
    load_prompts,
    sample_and_score,
    statistics_of,
)
from align.runs import claim_output_dir, resolved_config, save_metrics, staged_dir
from align.scoring import RewardModelScorer, VerifierScorer, WeightedScorer

logger = logging.getLogger(__name__)


def main(script_args: RejectionSamplingArguments, model_args: ModelConfig):
    # ----- logging and seed -------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.accelerator.is_available())
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    datasets.disable_progress_bars()
    transformers.set_seed(script_args.seed)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required: the policy, a VLM folder or a PEFT adapter folder")
    output_dir = Path(script_args.output_dir)
    # Candidates sampled under other settings must not be mixed into a resumed run's (`--force` starts over).
    with state.main_process_first():
        claim_output_dir(
            output_dir, resolved_config(script_args, model_args), force=script_args.force,
            allowed={"reward_batch_size"}, main_process=state.is_main_process,
        )

    # ----- prompts ----------------------------------------------------------------------------------------------
    prompts = load_prompts(script_args, output_dir)
    logger.info("%d prompts, %d candidates each", len(prompts), script_args.num_candidates)

    # ----- policy and scorers -----------------------------------------------------------------------------------
    model, processor = load_run(
        model_args.model_name_or_path, base_model_name_or_path=script_args.base_model_name_or_path,
        dtype=model_args.dtype, quantization_config=get_quantization_config(model_args), device=state.device,
        attn_implementation=model_args.attn_implementation, merge=True,
    )
    has_records = "record" in prompts.column_names
    verifier = VerifierScorer(reasons=script_args.verify_reasons) if has_records else None
    reward = None
    if script_args.reward_model_name_or_path:
        reward = RewardModelScorer.from_pretrained(
            script_args.reward_model_name_or_path, batch_size=script_args.reward_batch_size, device=state.device
        )
    if script_args.scorer == "verifier":
        if verifier is None:
            raise ValueError("the verifier scorer needs prompts with a `record` column (question records)")
        scorer, reference = verifier, reward
    elif script_args.scorer == "reward":
        scorer, reference = reward, verifier
    else:
        parts = {"reward": reward} if verifier is None else {"verifier": verifier, "reward": reward}
        weights = {"verifier": script_args.verifier_weight, "reward": script_args.reward_weight}
        scorer, reference = WeightedScorer(parts, {k: weights[k] for k in parts}), None

    # ----- sample and score (resumable, batches dealt over processes) -------------------------------------------
    sample_and_score(
        model, processor, prompts, scorer, script_args.settings(), output_dir, reference_scorer=reference,
        process_index=state.process_index, num_processes=state.num_processes,
    )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    # ----- select and save --------------------------------------------------------------------------------------
    records = collect(output_dir, len(prompts))
    sft, dpo = build_datasets(
        prompts, records, script_args.sft_threshold, script_args.min_margin, script_args.sft_max_pass_rate
    )
    for name, data in (("sft", sft), ("dpo", dpo)):
        with staged_dir(output_dir / name) as staging:
            data.save_to_disk(str(staging), num_shards=1 if len(data) == 0 else None)  # an empty one needs a shard to load
    stats = statistics_of(records, script_args.sft_threshold, script_args.min_margin, script_args.sft_max_pass_rate)
    stats["model_name_or_path"] = model_args.model_name_or_path
    stats["scorer"] = script_args.scorer
    save_metrics(output_dir / "metrics.json", stats)
    summary = f"{stats['sft_rows']} SFT rows and {stats['dpo_pairs']} DPO pairs from {stats['prompts']} prompts"
    if "pass@1" in stats:
        n = script_args.num_candidates
        summary += f"; pass@1 {stats['pass@1']:.3f}, pass@{n} {stats[f'pass@{n}']:.3f}"
    if "reward_verifier_agreement" in stats:
        summary += f"; reward model agrees with the verifier on {stats['reward_verifier_agreement']:.1%} of pairs"
    logger.info("%s; wrote %s", summary, output_dir)
    return stats


def make_parser() -> TrlParser:
    return TrlParser((RejectionSamplingArguments, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
