"""Stage 1: pretrain a VLM's adapters (projectors, cross-attention) on image-caption pairs.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/pretrain.py --config recipes/configs/tiny/pretrain.yaml
    python recipes/pretrain.py --config recipes/configs/tiny/pretrain_cross_attention.yaml --max_steps 20

The mixture-of-encoders schedule, three invocations (a built VLM in `model_name_or_path` wins over the parts):

    python recipes/pretrain.py --config recipes/configs/tiny/pretrain.yaml --stage prealign --output_dir runs/s1
    python recipes/pretrain.py --config recipes/configs/tiny/pretrain.yaml --stage align \
        --model_name_or_path runs/s1 --output_dir runs/s2
    python recipes/pretrain.py --config recipes/configs/tiny/pretrain.yaml --stage finetune \
        --model_name_or_path runs/s2 --output_dir runs/s3

Builds the VLM from parts (`vision`, `text`) or loads a built one (`model_name_or_path`), freezes it for `stage`
(`prealign`: towers + adapters, `align`: adapters only, `finetune`: adapters + LLM), and trains with TRL's `SFTTrainer` on the
world's captions (or `dataset_path`). With frozen towers the images are encoded once into a feature cache and
training reads the features (`use_feature_cache`). Rows with a missing or corrupt image are skipped and listed in
`rejects.jsonl`. Writes the VLM and processor, `config.yaml` (the resolved config) and `metrics.json` (with the
caption figures before and after training when `eval_captions` is set) to `output_dir`. Rerunning a stopped run's
command continues it from the newest complete checkpoint in `output_dir` (`--resume_from_checkpoint false` starts
over, a checkpoint folder picks one); a rerun with other settings into the same `output_dir` is refused, naming
them, unless `--force` (start over).
"""

import logging
import os

from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from align.captioning import evaluate_captions, load_training_pairs
from align.data import REJECTS_FILE, RejectReport
from align.data.world import open_world
from align.pretraining import PretrainScriptArguments
from align.training import run_metrics, setup_logging, start_run, write_outputs
from model import freeze_for_stage
from model.pretrain import (
    TextMixCollator,
    fit_feature_statistics,
    load_or_build_vlm,
    mix_text_rows,
    prepare_stage_data,
    vision_collator,
)

logger = logging.getLogger(__name__)


def main(script_args: PretrainScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    # ---------------------------------------------------------------- logging and seed
    setup_logging(training_args)
    set_seed(training_args.seed)
    if model_args.use_peft:
        raise ValueError("adapter pretraining trains whole modules per stage; use recipes/sft.py for LoRA (use_peft)")
    output_dir = training_args.output_dir
    checkpoint = start_run(training_args, script_args, training_args, model_args, force=script_args.force)
    main_process = training_args.process_index == 0

    # ---------------------------------------------------------------- model and processor
    # A built VLM (an earlier stage's output) takes precedence over the parts, so one YAML serves every stage.
    from_parts = model_args.model_name_or_path is None
    build_options = dict(
        fusion=script_args.fusion,
        projector=script_args.projector,
        projector_depth=script_args.projector_depth,
        projector_queries=script_args.projector_queries,
        pool=script_args.pool,
        cross_attention_every=script_args.cross_attention_every,
        vision_feature_layer=script_args.vision_feature_layer,
    )
    model, processor = load_or_build_vlm(
        model_args.model_name_or_path,
        vision=script_args.vision if from_parts else None,
        text=script_args.text if from_parts else None,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        **(build_options if from_parts else {}),
    )
    logger.info("%s", f"built a {script_args.fusion}-fusion VLM from parts" if from_parts
                else f"loaded the VLM at {model_args.model_name_or_path}")
    freeze_for_stage(model, script_args.stage)

    # ---------------------------------------------------------------- data
    dataset = load_training_pairs(
        script_args.world_path, script_args.dataset_path, script_args.dataset_split,
        script_args.caption_style, script_args.train_samples,
        rejects_path=os.path.join(training_args.output_dir, "rejects_conversion.jsonl"),
        questions=script_args.world_questions, question_turns=script_args.question_turns, seed=training_args.seed,
        question_repeats=script_args.question_repeat_counts(), spatial_reasoning=script_args.spatial_reasoning,
    )
    with training_args.main_process_first(desc="checking the images and caching their vision features"):
        data = prepare_stage_data(
            dataset, model, processor, script_args.stage,
            use_feature_cache=script_args.use_feature_cache,
            cache_dir=script_args.feature_cache_dir or os.path.join(output_dir, "feature_cache"),
            max_length=training_args.max_length,
            pad_to_multiple_of=training_args.pad_to_multiple_of,
            assistant_only_loss=training_args.assistant_only_loss,
        )
    rejects_path = os.path.join(output_dir, REJECTS_FILE)
    if main_process:  # an empty file when nothing was skipped, so a rerun never shows stale rejects
        RejectReport("images", data.prepared.total, data.prepared.rejects).write(rejects_path)
    if data.prepared.rejects:
        logger.warning("%s; see %s", data.prepared.summary(), rejects_path)
    logger.info(
        "training on %d image-caption rows, %s", len(data.train_dataset),
        "reading cached vision features" if data.use_feature_cache else "encoding pixels every step",
    )
    train_dataset, data_collator = data.train_dataset, data.data_collator
    if script_args.text_fraction > 0:
        # Text-only rows beside the grounded ones keep the LLM's text while it trains on images; TRL's vision
        # collator takes one kind of row per batch, so `TextMixCollator` composes it with plain language modelling.
        train_dataset = mix_text_rows(
            train_dataset, script_args.text_documents(processor.tokenizer), script_args.text_fraction,
            seed=training_args.seed,
        )
        data_collator = TextMixCollator(
            data_collator or vision_collator(
                processor, max_length=training_args.max_length, pad_to_multiple_of=training_args.pad_to_multiple_of,
                assistant_only_loss=training_args.assistant_only_loss,
            ),
            processor.tokenizer, max_length=script_args.text_max_length,
        )
        logger.info("and %d text-only rows (text_fraction %s)", len(train_dataset) - len(data.train_dataset),
                    script_args.text_fraction)

    if script_args.standardize_features and not model.model.projectors.standardized:
        standardization = fit_feature_statistics(model, processor, data, max_images=script_args.standardize_images)
        logger.info("feature standardisation fitted on %d images: %s", standardization["images"],
                    standardization["towers"])
    else:
        standardization = None

    # ---------------------------------------------------------------- captions before training
    extra = {"stage": script_args.stage, "fusion": model.config.fusion,
             "data": {**data.report(), "text_rows": len(train_dataset) - len(data.train_dataset)}}
    if standardization is not None:
        extra["feature_standardization"] = standardization
    if script_args.eval_captions:
        caption_eval = dict(
            world_split=open_world(script_args.world_path, script_args.eval_split, hint="set --world_path"), n=script_args.eval_captions,
            style=script_args.caption_style, batch_size=script_args.eval_batch_size,
            max_new_tokens=script_args.eval_max_new_tokens,
        )
        if main_process:
            extra["captions_before"] = evaluate_captions(model, processor, **caption_eval)

    # ---------------------------------------------------------------- trainer
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=data_collator,  # None on the pixel path without text rows: TRL's own vision collator
        processing_class=processor,
    )

    # ---------------------------------------------------------------- train
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
        extra["resumed_from_checkpoint"] = checkpoint
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    # ---------------------------------------------------------------- save (model, processor, config, metrics)
    if script_args.eval_captions and trainer.is_world_process_zero():
        extra["captions_after"] = evaluate_captions(trainer.model, processor, **caption_eval)
        for when in ("captions_before", "captions_after"):
            figures = extra[when]
            logger.info(
                "%s training: caption_match %.3f, mention F1 %.3f, BLEU %.3f", when.split("_")[1],
                figures["caption_match"], figures["mention_f1"], figures["bleu"],
            )
    metrics = run_metrics(trainer, train_result, len(data.train_dataset), data.prepared.counts, extra=extra)
    write_outputs(trainer, processor, (script_args, training_args, model_args), metrics, header=__doc__.splitlines()[0])
    trainer.end()


def make_parser() -> TrlParser:
    return TrlParser((PretrainScriptArguments, SFTConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
