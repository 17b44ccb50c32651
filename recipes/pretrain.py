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
from dataclasses import dataclass, field

from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from align.captioning import CAPTION_STYLES, evaluate_captions, load_training_pairs
from align.data.world import open_world
from align.runs import RunArguments
from align.training import run_metrics, setup_logging, start_run, write_outputs
from align.world import CATEGORIES
from model import FUSIONS, PROJECTORS, STAGES, freeze_for_stage
from model.pretrain import (
    FEATURE_CACHE_MODES,
    fit_feature_statistics,
    load_or_build_vlm,
    prepare_stage_data,
    towers_frozen,
    write_rejects,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainScriptArguments(RunArguments):
    """Model building, data and feature-cache knobs of adapter pretraining (training knobs are `SFTConfig`'s)."""

    vision: list[str] | None = field(
        default=None,
        metadata={"help": "Path(s) of the vision tower(s) to build a new VLM from (unused with model_name_or_path).",
                  "nargs": "+"},
    )
    text: str | None = field(
        default=None, metadata={"help": "Path of the causal LLM to build a new VLM from (unused with model_name_or_path)."}
    )
    fusion: str = field(default="prepend", metadata={"help": f"How images reach the LLM: {sorted(FUSIONS)}."})
    projector: str = field(default="mlp", metadata={"help": f"Projector of a new VLM: {sorted(PROJECTORS)}."})
    projector_depth: int = field(default=2, metadata={"help": "Blocks of the attention and resampler projectors."})
    projector_queries: int = field(default=16, metadata={"help": "Visual tokens per image of the resampler projector."})
    pool: int = field(default=1, metadata={"help": "Average-pool the patch grid by this factor per side."})
    cross_attention_every: int = field(
        default=4, metadata={"help": "One cross-attention adapter every this many decoder layers."}
    )
    vision_feature_layer: int = field(default=-1, metadata={"help": "Hidden state of the towers that is projected."})
    stage: str = field(default="align", metadata={"help": f"What trains: {sorted(STAGES)} (see model.stages)."})
    standardize_features: bool = field(
        default=True,
        metadata={
            "help": "Before training, fit the projectors' input standardisation (per-channel mean and std of the "
            "towers' features) on the training images, when the VLM has none yet (a VLM loaded from an earlier "
            "stage keeps the one its projectors were trained with)."
        },
    )
    standardize_images: int = field(
        default=2048, metadata={"help": "Distinct training images the feature standardisation is measured on."}
    )
    use_feature_cache: str = field(
        default="auto",
        metadata={
            "help": "Train on cached vision features: 'auto' whenever the stage freezes the towers (pixels "
            "otherwise), 'true' to require it (an error for a stage that trains the towers), 'false' for pixels.",
            "choices": list(FEATURE_CACHE_MODES),
        },
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Root folder of the feature cache, shared between runs (default: <output_dir>/feature_cache)."},
    )
    world_path: str | None = field(
        default=None, metadata={"help": "The shapes world (default: the zoo's, .cache/zoo/world)."}
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Image-caption data to train on instead of the world's captions: a save_to_disk dataset "
                  "in TRL's internal format (images + messages), or a TRL JSON/JSONL, LLaVA-Instruct or ShareGPT file "
                  "(converted on load; refused rows in rejects_conversion.jsonl)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the world or dataset to train on."})
    train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only (of the world: its first N images)."})
    caption_style: str = field(
        default="short", metadata={"help": f"World captions to train on: {list(CAPTION_STYLES)}."}
    )
    world_questions: list[str] = field(
        default_factory=list,
        metadata={"help": "Grounded pretraining: also train on every question of these world categories about the same "
                  f"images (conversations of up to question_turns turns), next to the captions; any of {list(CATEGORIES)}. "
                  "Empty: captions only.", "nargs": "*"},
    )
    question_turns: int = field(default=4, metadata={"help": "Question-answer turns per conversation of world_questions."})
    eval_captions: int = field(
        default=0,
        metadata={"help": "Caption this many held-out world images before and after training and write the "
                  "caption_match figures to metrics.json (0: skip)."},
    )
    eval_split: str = field(default="test", metadata={"help": "World split the captions are evaluated on."})
    eval_batch_size: int = field(default=16, metadata={"help": "Images per generate call when evaluating captions."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest caption generated when evaluating."})

    def __post_init__(self):
        # YAML reads `true`/`false` as booleans.
        if isinstance(self.use_feature_cache, bool):
            self.use_feature_cache = str(self.use_feature_cache).lower()
        if self.standardize_images < 1:
            raise ValueError(f"standardize_images must be positive, got {self.standardize_images}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        if self.use_feature_cache not in FEATURE_CACHE_MODES:
            raise ValueError(f"use_feature_cache must be one of {list(FEATURE_CACHE_MODES)}, got {self.use_feature_cache!r}")
        if self.use_feature_cache == "true" and not towers_frozen(self.stage):
            raise ValueError(
                f"use_feature_cache=true cannot be used with stage {self.stage!r}, which trains the vision towers "
                "(their features change every step); use use_feature_cache=auto or false"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {sorted(PROJECTORS)}, got {self.projector!r}")
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style must be one of {list(CAPTION_STYLES)}, got {self.caption_style!r}")
        if self.train_samples is not None and self.train_samples <= 0:
            raise ValueError(f"train_samples must be positive or unset, got {self.train_samples}")
        unknown = set(self.world_questions) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"world_questions has unknown categories {sorted(unknown)}; supported: {list(CATEGORIES)}")
        if self.world_questions and self.dataset_path is not None:
            raise ValueError("world_questions come from the shapes world: leave dataset_path unset to use them")
        if self.question_turns < 1:
            raise ValueError(f"question_turns must be >= 1, got {self.question_turns}")
        if self.eval_captions < 0:
            raise ValueError(f"eval_captions must be >= 0 (0 skips the evaluation), got {self.eval_captions}")


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
    rejects_path = os.path.join(output_dir, "rejects.jsonl")
    if main_process:
        write_rejects(data.prepared.rejects, rejects_path)
    if data.prepared.rejects:
        logger.warning("%s; see %s", data.prepared.summary(), rejects_path)
    logger.info(
        "training on %d image-caption rows, %s", len(data.train_dataset),
        "reading cached vision features" if data.use_feature_cache else "encoding pixels every step",
    )

    if script_args.standardize_features and not model.model.projectors.standardized:
        standardization = fit_feature_statistics(model, processor, data, max_images=script_args.standardize_images)
        logger.info("feature standardisation fitted on %d images: %s", standardization["images"],
                    standardization["towers"])
    else:
        standardization = None

    # ---------------------------------------------------------------- captions before training
    extra = {"stage": script_args.stage, "fusion": model.config.fusion, "data": data.report()}
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
        train_dataset=data.train_dataset,
        data_collator=data.data_collator,  # None on the pixel path: TRL's own vision collator
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
