"""Lightweight students from a post-trained teacher, as Llama 3.2 1B and 3B came from Llama 3.1 8B: structured
pruning to a fraction of the teacher LLM's parameters, then knowledge distillation from the teacher; plus a ternary
(BitNet b1.58) student of the teacher's size. Each student is also trained on the labels only (`alpha: 0`, same
steps, same data), so the table shows what distillation adds.

    python recipes/students.py --config recipes/configs/tiny/students.yaml
    python recipes/students.py --config recipes/configs/tiny/students.yaml --teacher runs/demo/dpo --targets 0.125 0.375

For each target fraction F (`targets`) and for the ternary student (`ternary`):

    pruning (python -m model.prune, in this process; calibration: the world's training text, or `calibration_file`)
    -> recipes/distill.py with the distill config's alpha   -> recipes/evaluate.py
    -> recipes/distill.py with alpha 0 (labels only)         -> recipes/evaluate.py

Each training and evaluation runs in its own process from a config derived from `distill_config` /
`evaluate_config`, written next to its output so any step can be rerun by hand; `parallel: N` runs N of them side
by side with the CPU threads split among them (on a small CPU machine, 2 does nearly twice the work per second). A finished step (its
`metrics.json`, or a pruned student's `prune_plan.json`) is reused: a killed run continues where it stopped.
Writes `output_dir/metrics.json` (parameters and held-out accuracy of the teacher and of every student, both ways)
and `output_dir/students.md` (the student table).
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from align.data.world import open_world
from align.evaluation import (
    PREDICTIONS,
    is_adapter_dir,
    paired_difference,
    paired_table,
    read_predictions,
    scoreboard,
)
from align.loading import load_processor
from align.pipeline import (
    LAUNCHERS_HELP,
    RECIPES,
    Step,
    derived_step,
    run_parallel,
    run_step,
    threads_per_job,
)
from align.runs import atomic_file, atomic_write_text, save_metrics
from align.training import merged_base
from align.zoo import lm_documents
from model.prune import PLAN_FILE, PruneArguments, llm_parameter_counts, load_teacher
from model.prune import main as prune_main

logger = logging.getLogger(__name__)
TINY = RECIPES / "configs" / "tiny"


@dataclass
class StudentsArguments:
    """The teacher, the students to make, and the configs their training and evaluation derive from."""

    output_dir: str = field(metadata={"help": "Folder for every student, its evaluations, metrics.json, students.md."})
    teacher: str = field(
        metadata={"help": "The post-trained teacher: a VLM folder, or a LoRA output (merged once into <teacher>/merged)."}
    )
    targets: list[float] = field(
        default_factory=lambda: [0.125, 0.375],
        metadata={"help": "Pruned students: fractions of the teacher LLM's non-embedding parameters to keep."},
    )
    depth_share: float | None = field(
        default=0.0,
        metadata={
            "help": "Pruning's depth share (model.prune --depth_share): 0 keeps every layer and prunes width, as "
            "Minitron recommends for students that are distilled afterwards; None tries every depth and keeps the "
            "lowest calibration perplexity before training."
        },
    )
    ternary: bool = field(default=True, metadata={"help": "Also make a ternary (BitNet b1.58) student of the teacher's size."})
    distill_config: str = field(default=str(TINY / "distill.yaml"), metadata={"help": "YAML of recipes/distill.py."})
    evaluate_config: str = field(default=str(TINY / "evaluate.yaml"), metadata={"help": "YAML of recipes/evaluate.py."})
    max_steps: int | None = field(default=None, metadata={"help": "Training steps of every student (default: the distill config's)."})
    ternary_max_steps: int | None = field(
        default=None,
        metadata={"help": "Training steps of the ternary student, both ways (default: max_steps). It has the teacher's "
                  "size, so its steps cost the most."},
    )
    alpha: float | None = field(
        default=None, metadata={"help": "Distillation weight of the distilled students (default: the distill config's; must be > 0)."}
    )
    temperature: float | None = field(
        default=None, metadata={"help": "Distillation temperature of the distilled students (default: the distill config's)."}
    )
    calibration_file: str | None = field(
        default=None,
        metadata={"help": "Pruning calibration documents (JSONL or text); default: the shapes world's training text."},
    )
    world_path: str | None = field(
        default=None, metadata={"help": "Shapes world folder of the default calibration text (default: the zoo's)."}
    )
    calibration_split: str = field(default="train", metadata={"help": "World split of the default calibration text."})
    num_questions: int | None = field(default=None, metadata={"help": "Held-out questions per evaluation (default: the evaluate config's)."})
    paired_world_path: str | None = field(
        default=None,
        metadata={
            "help": "Also evaluate each pruned student, both ways, on this world's test split (a world generated with "
            "another seed: python -m align.world --seed 1), for a larger sample of the distilled − labels-only "
            "comparison than the test split's; its paired figure is reported beside the test split's."
        },
    )
    paired_num_questions: int | None = field(
        default=None, metadata={"help": "Questions of paired_world_path per evaluation (default: num_questions)."}
    )
    teacher_eval: str | None = field(
        default=None, metadata={"help": "metrics.json of the teacher's evaluation to show in the table (default: evaluate it)."}
    )
    launcher: str = field(
        default="python",
        metadata={"help": LAUNCHERS_HELP},
    )
    parallel: int = field(
        default=1,
        metadata={"help": "Trainings (each followed by its evaluation) run side by side, the CPU threads split among them."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every student's training and evaluation."})
    force: bool = field(default=False, metadata={"help": "Redo every step, even those already done."})

    def __post_init__(self):
        for target in self.targets:
            if not 0 < target < 1:
                raise ValueError(f"targets: each fraction must be in (0, 1), got {target}")
        if not self.targets and not self.ternary:
            raise ValueError("nothing to make: give targets and/or ternary: true")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.depth_share is not None and not 0 <= self.depth_share <= 1:
            raise ValueError(f"depth_share must be in [0, 1], got {self.depth_share}")
        for name in ("max_steps", "ternary_max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.paired_num_questions is not None and self.paired_num_questions < 1:
            raise ValueError(f"paired_num_questions must be >= 1, got {self.paired_num_questions}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (alpha 0 is the labels-only baseline, run anyway), got {self.alpha}")
        for name in ("distill_config", "evaluate_config", "calibration_file", "teacher_eval"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name}: {value} does not exist")


def teacher_folder(teacher: str) -> str:
    """A folder holding the whole teacher: the teacher itself, or its LoRA adapter merged into `<teacher>/merged`."""
    if not is_adapter_dir(teacher):
        return teacher
    return str(merged_base(teacher))


def write_calibration(args: StudentsArguments, teacher: str, path: Path) -> Path:
    """The pruning calibration file: `calibration_file`, or the shapes world's training text in the teacher's chat
    format (`align.zoo.lm_documents`), written once."""
    if args.calibration_file:
        return Path(args.calibration_file)
    if not path.is_file() or args.force:
        world = open_world(args.world_path)
        processing = load_processor(teacher)
        documents = lm_documents(world, args.calibration_split, getattr(processing, "tokenizer", processing))
        with atomic_file(path) as handle:
            handle.writelines(json.dumps({"text": text}) + "\n" for text in documents)
        logger.info("wrote %d calibration documents to %s", len(documents), path)
    return path


def prune(args: StudentsArguments, teacher: str, calibration: Path, target: float, output: Path) -> dict:
    """Prune the teacher to `target` of its LLM's non-embedding parameters (reused when its plan exists)."""
    plan = output / PLAN_FILE
    if plan.is_file() and not args.force:
        logger.info("pruned student %s: done before, reusing it", output)
        return json.loads(plan.read_text())
    logger.info("pruning %s to %.3f of its LLM's non-embedding parameters: %s", teacher, target, output)
    return prune_main(
        PruneArguments(
            teacher=teacher, output=str(output), calibration_file=str(calibration), target_params=target,
            depth_share=args.depth_share,
        )
    )


def _step(args: StudentsArguments, run_dir: Path, name: str, script: str, base: str, updates: dict) -> Step:
    threads = threads_per_job(args.parallel)
    return derived_step(run_dir, name, script, base, updates, "students.py", launcher=args.launcher, threads=threads)


OTHER_WORLD = "other-world"  # the evaluations on `paired_world_path`: eval-<way>-other-world


def train_and_evaluate(args: StudentsArguments, run_dir: Path, name: str, updates: dict) -> dict:
    """Train a student with recipes/distill.py (`updates` over the distill config) and evaluate it (a pruned one on
    `paired_world_path` too)."""
    updates = {**updates, "seed": args.seed}
    steps = args.ternary_max_steps if updates.get("student_ternary") and args.ternary_max_steps else args.max_steps
    if steps is not None:
        updates["max_steps"] = steps
    tag = f"{run_dir.name} {name}"
    trained = run_step(_step(args, run_dir, name, "distill.py", args.distill_config, updates), run_dir, args.force, tag=tag)
    evaluation = {"model_name_or_path": str(run_dir / name), "seed": args.seed}
    if args.num_questions is not None:
        evaluation["num_questions"] = args.num_questions
    evaluated = run_step(
        _step(args, run_dir, f"eval-{name}", "evaluate.py", args.evaluate_config, evaluation), run_dir, args.force, tag=tag
    )
    if args.paired_world_path and not updates.get("student_ternary"):
        other = {**evaluation, "world_path": args.paired_world_path, "dataset_split": "test"}
        if args.paired_num_questions is not None:
            other["num_questions"] = args.paired_num_questions
        step = _step(args, run_dir, f"eval-{name}-{OTHER_WORLD}", "evaluate.py", args.evaluate_config, other)
        run_step(step, run_dir, args.force, tag=tag)
    return {"training": trained, "eval": evaluated}


WAYS = ("distilled", "labels_only")


def both_ways(args: StudentsArguments, run_dir: Path, student: dict, teacher: str) -> list:
    """Two jobs: train `student` distilled (alpha > 0) and on the labels only (alpha 0), with the same start, steps
    and data, each then evaluated."""
    base = {"model_name_or_path": student["init"], "teacher_model_name_or_path": teacher, "student_ternary": student["ternary"]}
    distilled = {**base, **{key: value for key in ("alpha", "temperature") if (value := getattr(args, key)) is not None}}
    return [
        lambda: train_and_evaluate(args, run_dir, "distilled", distilled),
        lambda: train_and_evaluate(args, run_dir, "labels-only", {**base, "alpha": 0.0}),
    ]


def student_table(summary: dict) -> str:
    """Markdown table: LLM parameters and held-out accuracy per category of the teacher and of each student,
    distilled and trained on the labels only."""
    board, params = {"teacher": summary["teacher"]["eval"]}, {"teacher": summary["teacher"]["parameters"]}
    for name, student in summary["students"].items():
        for way, label in (("distilled", "distilled"), ("labels_only", "labels only")):
            board[f"{name}, {label}"] = student[way]
            params[f"{name}, {label}"] = student["parameters"]
    table = scoreboard(board).splitlines()
    header = table[0].replace("| stage |", "| model | LLM parameters | LLM non-embedding |", 1)
    rule = "|---|---:|---:|" + table[1].removeprefix("|---|")
    rows = [
        line.replace(f"| {row} |", f"| {row} | {params[row]['llm']:,} | {params[row]['llm_non_embedding']:,} |", 1)
        for row, line in zip(board, table[2:])
    ]
    return "\n".join([header, rule, *rows])


def comparison_table(summary: dict) -> str:
    """Each student distilled minus the same student on the labels only, paired on the same held-out questions (and
    on the other world's, `paired_world_path`, where evaluated)."""
    rows = {}
    for name, student in summary["students"].items():
        rows[f"{name}: distilled − labels only"] = student["paired"]
        if student.get("paired_other_world"):
            rows[f"{name}: distilled − labels only, other world"] = student["paired_other_world"]
    questions = next(iter(summary["students"].values()))["paired"]["questions"]
    other = " (\"other world\": the test split of another world, `paired_world_path`)" if len(rows) > len(summary["students"]) else ""
    return (
        f"Distilled minus labels only, in points, paired on the same {questions} held-out questions{other}, ± the paired "
        f"standard error:\n\n" + paired_table(rows)
    )


def paired_ways(run_dir: Path, suffix: str = "") -> dict | None:
    """The student in `run_dir` distilled minus labels only, paired on their evaluations `eval-<way><suffix>` (None
    when either is missing)."""
    paths = [run_dir / f"eval-{way}{suffix}" / PREDICTIONS for way in ("distilled", "labels-only")]
    if not all(path.is_file() for path in paths):
        return None
    return paired_difference(*(read_predictions(path) for path in paths))


def main(args: StudentsArguments) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.teacher).is_dir():  # checked here, not at parsing, so configs parse before the teacher exists
        raise ValueError(f"teacher: {args.teacher} is not a directory")
    if args.paired_world_path and not Path(args.paired_world_path).is_dir():  # before any training, not after it
        raise ValueError(f"paired_world_path: {args.paired_world_path} is not a directory")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    teacher = teacher_folder(args.teacher)
    for name in ("distill_config", "evaluate_config"):
        setattr(args, name, str(Path(getattr(args, name)).resolve()))

    # ----- the teacher's evaluation (given, or a job run with the students') --------------------------------------
    def evaluate_teacher() -> dict:
        if args.teacher_eval:
            return json.loads(Path(args.teacher_eval).read_text())
        evaluation = {"model_name_or_path": teacher, "seed": args.seed}
        if args.num_questions is not None:
            evaluation["num_questions"] = args.num_questions
        step = _step(args, output_dir, "eval-teacher", "evaluate.py", args.evaluate_config, evaluation)
        return run_step(step, output_dir, args.force, tag="teacher")

    # ----- the students: pruned ones first, then every training (and its evaluation) -----------------------------
    calibration = write_calibration(args, teacher, output_dir / "calibration.jsonl") if args.targets else None
    students, teacher_params = {}, None
    for target in args.targets:
        run_dir = output_dir / f"pruned-{target:g}"
        plan = prune(args, teacher, calibration, target, run_dir / "pruned")
        teacher_params = plan["params_before"]
        students[f"pruned to {target:g}"] = {
            "dir": run_dir, "init": str(run_dir / "pruned"), "ternary": False, "parameters": plan["params_after"],
            "sizes": plan["sizes"],
        }
    if teacher_params is None:
        teacher_params = llm_parameter_counts(load_teacher(teacher)[0])
    if args.ternary:
        students["ternary (b1.58)"] = {"dir": output_dir / "ternary", "init": teacher, "ternary": True, "parameters": teacher_params}
    # The largest students first (the ternary one has the teacher's size), so that N side by side end together.
    order = sorted(students, key=lambda name: -students[name]["parameters"]["llm"])
    jobs = [evaluate_teacher] + [job for name in order for job in both_ways(args, students[name]["dir"], students[name], teacher)]
    results = iter(run_parallel(jobs, args.parallel))
    teacher_eval = next(results)
    for name in order:
        students[name].update({way: next(results) for way in WAYS})

    # ----- save -------------------------------------------------------------------------------------------------
    summary = {
        "teacher": {"path": teacher, "parameters": teacher_params, "eval": teacher_eval},
        "students": {
            name: {
                "init": entry["init"], "ternary": entry["ternary"], "parameters": entry["parameters"],
                "sizes": entry.get("sizes"), "steps": entry["distilled"]["training"].get("global_step"),
                "distilled": entry["distilled"]["eval"], "labels_only": entry["labels_only"]["eval"],
                "distillation": entry["distilled"]["training"].get("distillation"),
                "paired": paired_ways(entry["dir"]),
                "paired_other_world": paired_ways(entry["dir"], f"-{OTHER_WORLD}") if args.paired_world_path else None,
            }
            for name, entry in students.items()
        },
    }
    table = student_table(summary) + "\n\n" + comparison_table(summary)
    atomic_write_text(output_dir / "students.md", table + "\n")
    save_metrics(output_dir / "metrics.json", summary)  # last: it marks the pipeline done
    print(table)
    return summary


def make_parser() -> TrlParser:
    return TrlParser((StudentsArguments,))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
