"""Direct preference optimisation of a VLM on preference pairs (`images`, `prompt`, `chosen`, `rejected`).

LoRA (`--use_peft`; the reference is the policy with its adapters disabled), QLoRA (`--load_in_4bit` on top) or
full fine-tuning (the reference is a frozen copy), or an explicit `--ref_model_name_or_path`. The data is a
weighted mixture of local preference sets (`datasets:`) or, by default, pairs from the shapes world (chosen: the
verified answer; rejected: a plausible wrong answer of the same category). With `precompute_ref_log_probs: true`
the reference log-probs are computed once before training. Bad rows are skipped and listed in
`<output_dir>/rejects.jsonl`.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/dpo.py --config recipes/configs/tiny/dpo.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/dpo.py --config recipes/configs/real/dpo.yaml
    python recipes/dpo.py --config recipes/configs/tiny/dpo_qlora.yaml --max_steps 20

Rerunning a killed command continues it from its newest complete checkpoint; a rerun with other settings
into the same `output_dir` is refused unless `--force` (start over). Writes the model (or LoRA
adapter), the processor, `config.yaml`, `metrics.json`, `rejects.jsonl` and TensorBoard logs (`runs/`) to
`output_dir`.
"""

import logging

from transformers import set_seed
from trl import DPOConfig, TrlParser

from align.data import REJECTS_FILE, log_rejects
from align.dpo import DPOScriptArguments, dpo_trainer, preference_dataset
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
CONFIG_HEADER = "Resolved settings of this run; rerun with: python recipes/dpo.py --config <this file>"


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: VLMModelConfig) -> None:
    # ------------------------------------------------------------------ logging and seed
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    checkpoint = start_run(training_args, script_args, training_args, model_args, force=script_args.force)

    # ------------------------------------------------------------------ model and processor
    model, processor = load_vlm(model_args.model_name_or_path, model_args)
    peft_config = prepare_for_training(model, model_args)
    ref_path = script_args.ref_model_name_or_path or (None if peft_config else model_args.model_name_or_path)
    ref_model = load_reference(ref_path, model_args) if ref_path else None
    logger.info("reference: %s", ref_path or "the policy with its LoRA adapters disabled")

    # ------------------------------------------------------------------ data
    main_process = training_args.process_index == 0
    train_dataset = preference_dataset(script_args, training_args.output_dir, training_args.seed, main_process)
    logger.info("training on %d preference pairs", len(train_dataset))

    # ------------------------------------------------------------------ trainer
    trainer = dpo_trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        ref_model=ref_model,
        peft_config=peft_config,
        feature_cache_dir=script_args.feature_cache_path(training_args.output_dir, model_args.stage),
    )

    # ------------------------------------------------------------------ train
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    # ------------------------------------------------------------------ save
    rejects = log_rejects(f"{training_args.output_dir}/{REJECTS_FILE}", len(train_dataset)) if main_process else {}
    metrics = run_metrics(
        trainer, train_result, len(train_dataset), rejects,
        extra={"reference": ref_path or "adapters disabled", "resumed_from": checkpoint,
               "images_encoded": trainer.images_encoded},
    )
    write_outputs(trainer, processor, (script_args, model_args, training_args), metrics, header=CONFIG_HEADER)
    trainer.end()


def make_parser() -> TrlParser:
    return TrlParser((DPOScriptArguments, DPOConfig, VLMModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
