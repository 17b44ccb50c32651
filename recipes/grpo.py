"""Online RL: GRPO (group relative policy optimisation) of a VLM with verifiable rewards, on TRL's `GRPOTrainer`.

For each prompt the policy samples `num_generations` answers; each answer's advantage is its reward relative to its
group's; the policy is pushed towards the better ones, with a KL penalty (`beta`) to the reference (the policy with
its LoRA adapters disabled, or a frozen copy). Rewards (`reward_funcs`, weighted by `reward_weights`): `verifier`
(the world's answer checker), `format` (a short answer committing to one value), `reward_model` (a VLM reward model
from recipes/reward.py). Prompts: the world's questions or a local prompt set. Each image is encoded once per group
(`align.grpo.VisionGRPOTrainer`). LoRA (`--use_peft`), QLoRA (`--load_in_4bit` on top) or full fine-tuning.
`--filter_samples N` first samples N answers per prompt with the starting policy and trains only on the prompts it
answers right sometimes but not always (`filter_pass_rate`): groups all right or all wrong teach GRPO nothing.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo.py --config recipes/configs/tiny/grpo.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/grpo.py --config recipes/configs/real/grpo.yaml

Rerunning a killed command continues it from its newest complete checkpoint; a rerun with other settings
into the same `output_dir` is refused unless `--force` (start over). Writes the model (or LoRA
adapter), the processor, `config.yaml`, `metrics.json` (loss, reward and KL per logged step, images encoded, the
prompt filter's pass rates) and
TensorBoard logs (`runs/`) to `output_dir`.
"""

import logging

from transformers import set_seed
from trl import GRPOConfig, TrlParser

from align.data import REJECTS_FILE, log_rejects
from align.grpo import GRPOScriptArguments, VisionGRPOTrainer, filter_by_pass_rate, reward_functions
from align.training import (
    VLMModelConfig,
    check_launch,
    load_reference,
    load_vlm,
    prepare_for_training,
    run_metrics,
    setup_logging,
    start_run,
    write_outputs,
)

logger = logging.getLogger(__name__)
CONFIG_HEADER = "Resolved settings of this run; rerun with: python recipes/grpo.py --config <this file>"


def main(script_args: GRPOScriptArguments, training_args: GRPOConfig, model_args: VLMModelConfig) -> None:
    # ------------------------------------------------------------------ logging and seed
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    checkpoint = start_run(training_args, script_args, training_args, model_args, force=script_args.force)

    # ------------------------------------------------------------------ model, processor and rewards
    model, processor = load_vlm(model_args.model_name_or_path, model_args)
    peft_config = prepare_for_training(model, model_args)
    # Full fine-tuning with a KL term: a frozen copy of the starting policy (under LoRA, the adapters disabled).
    ref_model = load_reference(model_args.model_name_or_path, model_args) if not peft_config and training_args.beta else None
    rewards = reward_functions(
        script_args.reward_funcs, script_args.reward_model_name_or_path, script_args.format_max_words,
        device=training_args.device, verify_reasons=script_args.verify_reasons,
    )
    logger.info("rewards: %s, weights %s", script_args.reward_funcs, training_args.reward_weights or "all 1")

    # ------------------------------------------------------------------ data
    main_process = training_args.process_index == 0
    train_dataset = script_args.prompts(f"{training_args.output_dir}/{REJECTS_FILE}" if main_process else None)
    prompt_filter = None
    if script_args.filter_samples:
        # The starting policy (LoRA adapters start at zero); every process filters alike (same seed, same draws).
        train_dataset, prompt_filter = filter_by_pass_rate(
            model, processor, train_dataset, script_args.filter_samples, *script_args.filter_pass_rate,
            max_new_tokens=training_args.max_completion_length, temperature=training_args.temperature,
            seed=training_args.seed, reasons=script_args.verify_reasons,
        )
        logger.info("kept %d of %d prompts with a pass rate in %s over %d answers (%s)", prompt_filter["kept"],
                    prompt_filter["candidates"], tuple(script_args.filter_pass_rate), script_args.filter_samples,
                    prompt_filter["pass_rates"])
        if not prompt_filter["kept"]:
            raise ValueError(f"no prompt has a pass rate in {tuple(script_args.filter_pass_rate)}: widen filter_pass_rate "
                             "or give more prompts")
    logger.info("training on %d prompts, %d answers each", len(train_dataset), training_args.num_generations)

    # ------------------------------------------------------------------ trainer
    trainer = VisionGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=peft_config,
        ref_model=ref_model,
    )

    # ------------------------------------------------------------------ train
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    # ------------------------------------------------------------------ save
    rejects = log_rejects(f"{training_args.output_dir}/{REJECTS_FILE}", len(train_dataset)) if main_process else {}
    history = trainer.state.log_history
    metrics = run_metrics(
        trainer, train_result, len(train_dataset), rejects,
        extra={
            "resumed_from": checkpoint,
            "reward": {
                "history": [(log["step"], log["reward"]) for log in history if "reward" in log],
                "per_function": {
                    name: [(log["step"], log[f"rewards/{name}/mean"]) for log in history if f"rewards/{name}/mean" in log]
                    for name in trainer.reward_func_names
                },
            },
            "kl": {"history": [(log["step"], log["kl"]) for log in history if "kl" in log]},
            "images_encoded": trainer.images_encoded,
            "prompt_filter": prompt_filter,
        },
    )
    # GRPOConfig derives generation_batch_size from steps_per_generation and refuses both set: config.yaml keeps one.
    training_args.generation_batch_size = None
    write_outputs(trainer, processor, (script_args, model_args, training_args), metrics, header=CONFIG_HEADER)
    trainer.end()


def make_parser() -> TrlParser:
    return TrlParser((GRPOScriptArguments, GRPOConfig, VLMModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
