"""Train a reward model of a VLM on preference pairs (`images`, `prompt`, `chosen`, `rejected`) with the
Bradley-Terry loss, and report its pairwise accuracy on held-out pairs before and after training.

The reward model is the VLM's backbone with a scalar head (`model.VLMForRewardModeling`), reading the conversation
rendered with the processor's chat template exactly as the policy does. LoRA (`--use_peft`; the head trains in
full), QLoRA (`--load_in_4bit` on top) or full fine-tuning of the stage's parts. The data is a weighted mixture of
local preference sets (`datasets:`) or, by default, pairs from the shapes world (chosen: the verified answer;
rejected: a plausible wrong answer of the same category); held-out pairs come from another world split
(`validation` by default) or `--eval_path`. Bad rows are skipped and listed in `<output_dir>/rejects.jsonl`.

    python recipes/reward.py --config recipes/configs/tiny/reward.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/reward.py --config recipes/configs/real/reward.yaml

Rerunning a killed command continues it from its newest complete checkpoint; a rerun with other settings
into the same `output_dir` is refused unless `--force` (start over). Writes the model (or LoRA
adapter with the head), the processor, `config.yaml`, `metrics.json` (held-out `eval_accuracy` after training and
`eval_accuracy_before`, overall and per category; with `--likelihood_baseline`, `eval_accuracy_policy_likelihood`:
the starting policy's own preference, the answer it finds likelier), `rejects.jsonl` and TensorBoard logs (`runs/`)
to `output_dir`.
Score answers with the result: `align.reward.load_reward_model(output_dir)` and `align.reward.reward_scores`.
"""

import logging

from transformers import set_seed
from trl import TrlParser

from align.data import REJECTS_FILE, log_rejects
from align.dpo import preference_dataset
from align.reward import (
    RewardScriptArguments,
    VLMRewardConfig,
    accuracy_table,
    held_out_accuracy,
    held_out_pairs,
    load_reward_model_for_training,
    policy_likelihood_accuracy,
    prepare_reward_model,
    reward_trainer,
)
from align.training import (
    VLMModelConfig,
    check_launch,
    run_metrics,
    setup_logging,
    start_run,
    write_outputs,
)

logger = logging.getLogger(__name__)
CONFIG_HEADER = "Resolved settings of this run; rerun with: python recipes/reward.py --config <this file>"


def main(script_args: RewardScriptArguments, training_args: VLMRewardConfig, model_args: VLMModelConfig) -> None:
    # ------------------------------------------------------------------ logging and seed
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    checkpoint = start_run(training_args, script_args, training_args, model_args, force=script_args.force)

    # ------------------------------------------------------------------ data
    main_process = training_args.process_index == 0
    train_dataset = preference_dataset(script_args, training_args.output_dir, training_args.seed, main_process)
    eval_pairs = held_out_pairs(script_args, training_args.seed)
    logger.info("training on %d preference pairs", len(train_dataset))
    likelihood = {}
    if script_args.likelihood_baseline and main_process:
        # The starting policy's own preference, before the reward model is built (one model in memory at a time).
        likelihood = policy_likelihood_accuracy(
            model_args.model_name_or_path, eval_pairs, training_args.per_device_eval_batch_size, model_args.dtype
        )

    # ------------------------------------------------------------------ model and processor
    model, processor = load_reward_model_for_training(
        model_args.model_name_or_path, model_args, likelihood=training_args.likelihood_feature
    )
    peft_config = prepare_reward_model(model, model_args)

    # ------------------------------------------------------------------ trainer
    trainer = reward_trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=peft_config,
        eval_dataset=eval_pairs if training_args.eval_strategy != "no" else None,
    )

    # ------------------------------------------------------------------ train
    before = held_out_accuracy(trainer, processor, eval_pairs, "before")
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    after = held_out_accuracy(trainer, processor, eval_pairs, "after")
    if after:
        logger.info("held-out pairwise accuracy:\n%s", accuracy_table(before, after, likelihood))

    # ------------------------------------------------------------------ save
    rejects = log_rejects(f"{training_args.output_dir}/{REJECTS_FILE}", len(train_dataset)) if main_process else {}
    metrics = run_metrics(
        trainer, train_result, len(train_dataset), rejects,
        extra={
            "eval_accuracy_before": before.get("accuracy"),
            "eval_accuracy": after.get("accuracy"),
            "eval_before": before,
            "eval": after,
            "eval_accuracy_policy_likelihood": likelihood.get("accuracy"),
            "eval_policy_likelihood": likelihood,
            "resumed_from": checkpoint,
        },
    )
    write_outputs(trainer, processor, (script_args, model_args, training_args), metrics, header=CONFIG_HEADER)
    trainer.end()


def make_parser() -> TrlParser:
    return TrlParser((RewardScriptArguments, VLMRewardConfig, VLMModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
