"""recipes/students.py end to end on tiny parts: a pruned student and a ternary student of a tiny teacher VLM, each
distilled and trained on the labels only, evaluated, and tabled; every step a real recipe in its own process."""

import json

import pytest
import yaml
from transformers import AutoModelForImageTextToText

from align.world import WorldConfig, build_world
from model import BitLinear
from tests.align.training_helpers import (
    IMAGE_SIZE,
    TINY_TRAINING,
    load_recipe,
    read_json,
    run_recipe,
    run_until_killed,
    tiny_vlm,
    tiny_world,
    write_yaml,
)


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    world = tiny_world(root / "world", images=8)
    other = root / "world-seed1"  # a world generated with another seed: its test split alone, as make demo's
    build_world(str(other), sizes={"test": 4}, config=WorldConfig(image_size=IMAGE_SIZE), seed=1)
    return {
        "other_world": str(other),
        "teacher": tiny_vlm(root / "teacher", tiny_parts["siglip"], tiny_parts["llama"]),
        "world": world,
        "distill_config": write_yaml(root / "distill.yaml", {
            **TINY_TRAINING, "output_dir": "unused", "world_path": world, "assistant_only_loss": True,
            "max_length": None, "max_steps": 3, "alpha": 0.5, "refusal_weight": 0.25,
        }),
        "evaluate_config": write_yaml(root / "eval.yaml", {
            "dtype": "float32", "world_path": world, "dataset_split": "train", "output_dir": "unused",
            "num_questions": 6, "batch_size": 6, "max_new_tokens": 6,
        }),
    }


def students_config(setup, out) -> dict:
    return {
        "teacher": setup["teacher"], "output_dir": str(out), "targets": [0.5], "ternary": True, "max_steps": 2, "ternary_max_steps": 3,
        "parallel": 2, "launcher": "forkserver",  # forked steps, from a recipe that is itself forked (run_recipe)
        "world_path": setup["world"], **{k: setup[k] for k in ("distill_config", "evaluate_config")},
        "paired_world_path": setup["other_world"], "paired_num_questions": 5, "temperature": 2.0,
    }


@pytest.fixture(scope="module")
def students_run(setup, tmp_path_factory):
    """The pipeline run once, uninterrupted."""
    folder = tmp_path_factory.mktemp("students-run")
    run_recipe("students.py", students_config(setup, folder / "students"), folder, timeout=900)
    return folder / "students"


@pytest.mark.slow
def test_pruned_and_ternary_students_distilled_and_labels_only(setup, students_run, tmp_path):
    out = students_run
    config = students_config(setup, out)
    summary = read_json(out / "metrics.json")
    assert summary["teacher"]["eval"]["total"] == 6
    pruned, ternary = summary["students"]["pruned to 0.5"], summary["students"]["ternary (b1.58)"]

    # The pruned student: about half the teacher LLM's non-embedding parameters, an ordinary checkpoint.
    teacher_params = summary["teacher"]["parameters"]
    assert 0.4 < pruned["parameters"]["llm_non_embedding"] / teacher_params["llm_non_embedding"] <= 0.5
    assert ternary["parameters"] == teacher_params and ternary["init"] == setup["teacher"]
    plan = read_json(out / "pruned-0.5" / "pruned" / "prune_plan.json")
    assert plan["teacher"] == setup["teacher"] and plan["params_after"] == pruned["parameters"]
    # Width pruning by default (depth_share 0): every layer kept, the MLP narrower.
    assert plan["sizes"]["num_layers"] == plan["teacher_sizes"]["num_layers"]
    assert plan["sizes"]["intermediate_size"] < plan["teacher_sizes"]["intermediate_size"]
    calibration = (out / "calibration.jsonl").read_text().splitlines()
    assert calibration and all("text" in json.loads(line) for line in calibration)

    # Both ways trained the same steps (the ternary student its own) from the same start; only the distilled run had
    # a teacher.
    for student_dir, init, steps in ((out / "pruned-0.5", str(out / "pruned-0.5" / "pruned"), 2), (out / "ternary", setup["teacher"], 3)):
        distilled = yaml.safe_load((student_dir / "distilled.yaml").read_text())
        labels_only = yaml.safe_load((student_dir / "labels-only.yaml").read_text())
        assert distilled["model_name_or_path"] == labels_only["model_name_or_path"] == init
        assert distilled["max_steps"] == labels_only["max_steps"] == steps
        assert distilled["alpha"] == 0.5 and labels_only["alpha"] == 0.0
        assert distilled["temperature"] == 2.0 and "temperature" not in labels_only  # the students' temperature
        assert read_json(student_dir / "distilled" / "metrics.json")["teacher"] == setup["teacher"]
        assert read_json(student_dir / "labels-only" / "metrics.json")["teacher"] is None
        for way in ("distilled", "labels-only"):
            assert read_json(student_dir / f"eval-{way}" / "metrics.json")["total"] == 6
    assert pruned["distilled"]["total"] == pruned["labels_only"]["total"] == 6
    student = AutoModelForImageTextToText.from_pretrained(out / "ternary" / "distilled")
    assert isinstance(student.model.language_model.layers[0].mlp.up_proj, BitLinear)

    # The table: the teacher and each student both ways, with parameters.
    table = (out / "students.md").read_text()
    assert table.startswith("| model | LLM parameters | LLM non-embedding | questions | overall |")
    for row in ("teacher", "pruned to 0.5, distilled", "pruned to 0.5, labels only", "ternary (b1.58), distilled",
                "ternary (b1.58), labels only"):
        assert f"| {row} | " in table, row
    assert f"| pruned to 0.5, distilled | {pruned['parameters']['llm']:,} | " in table
    # ... and each student distilled minus labels only, paired on the same questions.
    for name in ("pruned to 0.5", "ternary (b1.58)"):
        paired = summary["students"][name]["paired"]
        right = {way: summary["students"][name][way]["correct"] for way in ("distilled", "labels_only")}
        assert paired["questions"] == 6 and paired["a_only"] - paired["b_only"] == right["distilled"] - right["labels_only"]
        assert f"| {name}: distilled − labels only | 6 | " in table
    # ... and the pruned student (not the ternary one) on the other world's test split, paired too.
    assert summary["students"]["ternary (b1.58)"]["paired_other_world"] is None
    other = summary["students"]["pruned to 0.5"]["paired_other_world"]
    for way in ("distilled", "labels-only"):
        settings = read_json(out / "pruned-0.5" / f"eval-{way}-other-world" / "metrics.json")
        assert settings["total"] == 5 and settings["model_name_or_path"] == str(out / "pruned-0.5" / way)
        assert yaml.safe_load((out / "pruned-0.5" / f"eval-{way}-other-world.yaml").read_text())["world_path"] == setup["other_world"]
    assert other["questions"] == 5 and "| pruned to 0.5: distilled − labels only, other world | 5 | " in table

    # A second run reuses every finished step (4 trainings, 7 evaluations, the pruning).
    again = run_recipe("students.py", config, tmp_path, timeout=300)
    assert again.stdout.count("done before, reusing") == 11
    assert "done before, reusing it" in again.stderr + again.stdout


@pytest.mark.slow
def test_killed_mid_pipeline_continues_to_the_same_table(setup, students_run, tmp_path):
    """kill -9 of the whole pipeline once the pruned student is trained (its labels-only twin and the ternary
    student's runs under way), then the same command: it ends with the uninterrupted run's table and predictions."""
    out = tmp_path / "students"
    run_until_killed(
        "students.py", students_config(setup, out), tmp_path,
        lambda: (out / "pruned-0.5" / "distilled" / "metrics.json").is_file(), timeout=900, pipeline=True,
    )
    assert not (out / "metrics.json").exists()
    again = run_recipe("students.py", students_config(setup, out), tmp_path, timeout=900)
    assert "done before, reusing" in again.stdout
    for name in ("pruned-0.5/eval-distilled", "pruned-0.5/eval-labels-only", "ternary/eval-distilled", "eval-teacher"):
        assert (out / name / "predictions.jsonl").read_text() == (students_run / name / "predictions.jsonl").read_text()
    assert (out / "students.md").read_text() == (students_run / "students.md").read_text()


def test_bad_settings_are_named(setup, tmp_path):
    path = tmp_path / "config.yaml"
    for override, message in (
        ({"targets": [1.5]}, "targets: each fraction must be in"),
        ({"targets": [], "ternary": False}, "nothing to make"),
        ({"distill_config": "missing.yaml"}, "distill_config"),
        ({"alpha": 0.0}, "alpha must be in"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"paired_num_questions": 0}, "paired_num_questions must be >= 1"),
        ({"parallel": 0}, "parallel must be >= 1"),
        ({"depth_share": 1.5}, "depth_share must be in"),
    ):
        path.write_text(yaml.safe_dump({"teacher": setup["teacher"], "output_dir": str(tmp_path), **override}))
        with pytest.raises(ValueError, match=message):
            load_recipe("students").make_parser().parse_args_and_config(["--config", str(path)])
    path.write_text(yaml.safe_dump({"teacher": str(tmp_path / "nowhere"), "output_dir": str(tmp_path)}))
    recipe = load_recipe("students")
    (args,) = recipe.make_parser().parse_args_and_config(["--config", str(path)])
    with pytest.raises(ValueError, match="teacher: .* is not a directory"):
        recipe.main(args)
    (args,) = recipe.make_parser().parse_dict({"teacher": setup["teacher"], "output_dir": str(tmp_path / "out"),
                                               "paired_world_path": str(tmp_path / "no-world")})
    with pytest.raises(ValueError, match="paired_world_path: .*no-world is not a directory"):
        recipe.main(args)
    assert not (tmp_path / "out" / "calibration.jsonl").exists()  # refused before pruning and training
