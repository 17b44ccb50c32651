"""Knowledge distillation: a student VLM (or text LLM) trained against a frozen teacher's token-level distributions.

The loss is `alpha * divergence + (1 - alpha) * CE(labels)` (or `ce_weight` for the second weight), the divergence
being forward KL, reverse KL or the generalized JSD (`distillation_loss`, `jsd_beta`) at a `temperature`.
Off-policy (default) it is computed on the data's answers, the teacher run on every batch or, with
`cache_teacher_topk: K`, its top-K log-probs computed once up front; on-policy (`mode: on_policy`) on answers the
student samples, scored by the teacher (TRL's DistillationTrainer). The student (`model_name_or_path`, default: the
teacher) trains in full, with LoRA (`--use_peft`), or ternarized (`student_ternary: true`: its LLM linears become
BitNet b1.58 layers, post-training ternarization by distillation). `alpha: 0` is the baseline: SFT on the labels
with everything else the same, without the teacher. The data is the SFT recipe's (the shapes world's conversations
and refusals by default, or a `datasets:` mixture); bad rows are skipped and listed in `<output_dir>/rejects.jsonl`.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/distill.py --config recipes/configs/tiny/distill.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/distill.py --config recipes/configs/real/distill.yaml
    python recipes/distill.py --config recipes/configs/tiny/distill.yaml --alpha 0 --output_dir runs/tiny/distill-baseline

Rerunning a killed command continues it from its newest complete checkpoint; a rerun with other settings
into the same `output_dir` is refused unless `--force` (start over). Writes the student (or its LoRA
adapter), the processor, `config.yaml`, `metrics.json` (with the final distillation and cross-entropy losses),
`rejects.jsonl` and TensorBoard logs (`runs/`) to `output_dir`.
"""

import logging

from transformers import set_seed
from trl import TrlParser

from align.data import REJECTS_FILE, log_rejects
from align.distill import (
    DistillConfig,
    DistillScriptArguments,
    check_compatible_teacher,
    distill_trainer,
    distillation_metrics,
    load_for_distillation,
    ternarize_student,
)
from align.sft import sft_dataset
from align.training import (
    VLMModelConfig,
    check_launch,
    prepare_for_training,
    run_metrics,
    setup_logging,
    start_run,
    write_outputs,
)

logger = logging.getLogger(__name__)
CONFIG_HEADER = "Resolved settings of this run; rerun with: python recipes/distill.py --config <this file>"


def main(script_args: DistillScriptArguments, training_args: DistillConfig, model_args: VLMModelConfig) -> None:
    # ------------------------------------------------------------------ logging and seed
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    checkpoint = start_run(training_args, script_args, training_args, model_args, force=script_args.force)
    teacher_path = script_args.teacher_model_name_or_path
    if training_args.alpha > 0 and teacher_path is None:
        raise ValueError("teacher_model_name_or_path is required to distill (alpha > 0); alpha 0 is plain SFT")
    if script_args.student_ternary and model_args.use_peft:
        raise ValueError("student_ternary trains the student's latent weights in full: drop --use_peft")
    model_args.model_name_or_path = model_args.model_name_or_path or teacher_path
    if model_args.model_name_or_path is None:
        raise ValueError("give the student (--model_name_or_path) or the teacher it starts from")

    # ------------------------------------------------------------------ student, teacher and processor
    student, processor = load_for_distillation(model_args.model_name_or_path, model_args)
    teacher = None
    if training_args.alpha > 0:
        teacher_args = VLMModelConfig(
            model_name_or_path=teacher_path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation
        )
        teacher, teacher_processor = load_for_distillation(teacher_path, teacher_args)
        check_compatible_teacher(teacher, student, teacher_processor, processor, teacher_path, model_args.model_name_or_path)
        logger.info(
            "distilling %s into %s: %s at temperature %g, alpha %g, %s",
            teacher_path, model_args.model_name_or_path, training_args.distillation_loss, training_args.temperature,
            training_args.alpha, training_args.mode,
        )
    else:
        logger.info("alpha 0: SFT on the labels only (the no-distillation baseline); no teacher is loaded")
    ternarized = ternarize_student(student) if script_args.student_ternary else []
    peft_config = prepare_for_training(student, model_args)

    # ------------------------------------------------------------------ data
    main_process = training_args.process_index == 0
    train_dataset = sft_dataset(script_args, training_args.output_dir, training_args.seed, main_process)
    logger.info("training on %d conversations", len(train_dataset))

    # ------------------------------------------------------------------ trainer
    trainer = distill_trainer(student, teacher, training_args, train_dataset, processor, peft_config=peft_config)

    # ------------------------------------------------------------------ train
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)

    # ------------------------------------------------------------------ save
    rejects = log_rejects(f"{training_args.output_dir}/{REJECTS_FILE}", len(train_dataset)) if main_process else {}
    extra = {
        "teacher": teacher_path if teacher is not None else None,
        "ternarized_linears": len(ternarized),
        "resumed_from": checkpoint,
    }
    metrics = run_metrics(trainer, train_result, len(train_dataset), rejects, extra=extra)
    metrics["distillation"] = distillation_metrics(trainer)
    write_outputs(trainer, processor, (script_args, model_args, training_args), metrics, header=CONFIG_HEADER)
    trainer.end()


def make_parser() -> TrlParser:
    return TrlParser((DistillScriptArguments, DistillConfig, VLMModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
