"""Supervised fine-tuning of a VLM on multi-turn conversations with images, the loss on the assistant's tokens only.

Full fine-tuning (the stage's parts train, the rest is frozen), LoRA (`--use_peft`) or QLoRA (`--use_peft
--load_in_4bit`: the LLM in NF4, the towers, projectors and adapters in full precision). The data is a weighted
mixture of local datasets (`datasets:` in the YAML) or, by default, the shapes world's conversations mixed with
refusals. Bad rows are skipped and listed in `<output_dir>/rejects.jsonl`.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/sft.py --config recipes/configs/tiny/sft.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sft.py --config recipes/configs/real/sft.yaml
    python recipes/sft.py --config recipes/configs/tiny/sft_qlora.yaml --max_steps 20

Rerunning a killed command continues it from its newest complete checkpoint; a rerun with other settings
into the same `output_dir` is refused unless `--force` (start over). Writes the model (or LoRA
adapter), the processor, `config.yaml`, `metrics.json`, `rejects.jsonl` and TensorBoard logs (`runs/`) to
`output_dir`.
"""

import logging

from transformers import set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from align.data import REJECTS_FILE, log_rejects
from align.sft import SFTScriptArguments, padding_free_collator, sft_dataset
from align.training import (
    VLMModelConfig,
    check_launch,
    load_vlm,
    prepare_for_training,
    run_metrics,
    setup_logging,
    start_run,
    write_outputs,
)
from model.pretrain import prepare_stage_data

logger = logging.getLogger(__name__)
CONFIG_HEADER = "Resolved settings of this run; rerun with: python recipes/sft.py --config <this file>"


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: VLMModelConfig) -> None:
    # ------------------------------------------------------------------ logging and seed
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    checkpoint = start_run(training_args, script_args, training_args, model_args, force=script_args.force)
    if not training_args.assistant_only_loss:
        logger.warning("assistant_only_loss is off: the loss covers the prompts too")

    # ------------------------------------------------------------------ model and processor
    model, processor = load_vlm(model_args.model_name_or_path, model_args)
    peft_config = prepare_for_training(model, model_args)

    # ------------------------------------------------------------------ data
    main_process = training_args.process_index == 0
    train_dataset = sft_dataset(script_args, training_args.output_dir, training_args.seed, main_process)
    data_collator = None  # TRL's vision collator, on pixels
    cache_dir = script_args.feature_cache_path(training_args.output_dir, model_args.stage)
    if cache_dir is not None:
        with training_args.main_process_first(desc="caching the vision features"):
            data = prepare_stage_data(
                train_dataset, model, processor, model_args.stage, use_feature_cache="true", cache_dir=cache_dir,
                max_length=training_args.max_length, pad_to_multiple_of=training_args.pad_to_multiple_of,
                assistant_only_loss=training_args.assistant_only_loss,
            )
        train_dataset, data_collator = data.train_dataset, data.data_collator
    logger.info(
        "training on %d conversations, %s", len(train_dataset),
        "reading cached vision features" if data_collator is not None else "encoding pixels every step",
    )

    # ------------------------------------------------------------------ trainer
    padding_free = training_args.padding_free
    training_args.padding_free = False  # TRL refuses it for vision data: PaddingFreeVisionCollator does it
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=processor,
        peft_config=peft_config,
    )
    training_args.padding_free = padding_free
    if padding_free:
        trainer.data_collator = padding_free_collator(trainer, model)
        logger.info("padding-free: each batch is one row of its samples' tokens, positions restarting per sample")

    # ------------------------------------------------------------------ train
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    # ------------------------------------------------------------------ save
    rejects = log_rejects(f"{training_args.output_dir}/{REJECTS_FILE}", len(train_dataset)) if main_process else {}
    metrics = run_metrics(trainer, train_result, len(train_dataset), rejects, extra={"resumed_from": checkpoint})
    write_outputs(trainer, processor, (script_args, model_args, training_args), metrics, header=CONFIG_HEADER)
    trainer.end()


def make_parser() -> TrlParser:
    return TrlParser((SFTScriptArguments, SFTConfig, VLMModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
