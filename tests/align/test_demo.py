"""The demo's gates table: each target next to what a run measured, and whether it is met."""

import json
from pathlib import Path

import align.demo
from align.demo import aimed_eval, gates_table, lane_steps, pipeline
from align.evaluation import PREDICTIONS, standard_error

CATEGORIES = ["color", "shape", "count", "existence", "spatial", "unanswerable"]


def _write_eval(path, right: dict[str, int], per_category: int = 40, categories=CATEGORIES) -> dict:
    """An evaluation folder whose first `right[c]` questions of each category are answered right; its metrics."""
    path.mkdir(parents=True, exist_ok=True)
    rows = [
        {"image_id": i, "question": f"{c} {i}", "category": c, "correct": i < right.get(c, per_category)}
        for c in categories for i in range(per_category)
    ]
    (path / PREDICTIONS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = {"accuracy": sum(row["correct"] for row in rows) / len(rows)}
    for category in categories:
        accuracy = right.get(category, per_category) / per_category
        metrics[f"accuracy_{category}"], metrics[f"stderr_{category}"] = accuracy, standard_error(accuracy, per_category)
    return metrics


def _student(distilled: dict, labels: dict, paired: dict, ternary: bool = False) -> dict:
    return {"ternary": ternary, "distilled": distilled, "labels_only": labels, "paired": paired}


def test_gates_table_reports_each_target_against_the_run(tmp_path):
    sft = _write_eval(tmp_path / "eval-sft", {"color": 20, "count": 30})  # color 50%, count 75%, the rest 100%
    _write_eval(tmp_path / "eval-dpo", {"color": 20, "count": 30})  # equal to SFT
    final = _write_eval(tmp_path / "rounds" / "round2" / "eval", {"color": 20, "count": 40, "spatial": 40, "shape": 20})
    _write_eval(tmp_path / "eval-grpo", {"color": 20, "count": 40, "spatial": 39})
    rounds = {"rounds": [{"round": 1, "rejection_sampling": {"reward_verifier_agreement": 0.8}}, {"round": 2}]}
    students = {
        "teacher": {"eval": final},
        "students": {
            "pruned to 0.375": _student({"accuracy": 0.5 * final["accuracy"]}, {"accuracy": 0.1},
                                        {"difference": 0.10, "stderr": 0.02, "questions": 240}),
            "ternary": _student({"accuracy": 0.6}, {"accuracy": 0.55}, {"difference": 0.05, "stderr": 0.02}, ternary=True),
        },
    }
    results = {"eval-sft": sft, "rounds": rounds, "students": students, "reward": {"eval": {"accuracy": 0.95, "pairs": 400},
                                                                               "eval_policy_likelihood": {"accuracy": 0.9, "pairs": 400}}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in gates_table(tmp_path, results).splitlines()[2:]}
    (tmp_path / "eval-grpo" / PREDICTIONS).unlink()
    assert "| GRPO − SFT | count and spatial above +2 paired SE | not run | — |" in gates_table(tmp_path, results)

    assert rows["SFT: color"].endswith("| 50.0% ± 7.9 | no |")
    assert rows["SFT: count"].endswith("| yes |") and rows["SFT: shape"].endswith("| yes |")
    assert rows["DPO − SFT"].endswith("| +0.0 ± 0.0 | yes |")
    assert rows["round 2 − SFT: count"].endswith("| +25.0 ± 6.8 | yes |")
    assert rows["round 2 − SFT: spatial"].endswith("| +0.0 ± 0.0 | no |")
    # shape fell from 40 to 20 right answers of 40: 50 points, far more than twice its paired standard error.
    assert "lowest in paired SEs: shape -50.0" in rows["round 2 − SFT: every category"]
    assert rows["round 2 − SFT: every category"].endswith("| no |")
    assert rows["GRPO − SFT: count"].endswith("| +25.0 ± 6.8 | yes |")
    assert rows["GRPO − SFT: spatial"].endswith("| -2.5 ± 2.5 | no |")
    assert rows["GRPO − SFT: every category"].endswith("| yes |")
    assert rows["pruned to 0.375 student / teacher"].endswith("= 50% | no |")
    assert rows["pruned to 0.375: distilled − labels only"].endswith("| +10.0 ± 2.0 | yes |")
    assert "distilled 60.0%, labels only 55.0%" in rows["ternary student"]
    assert rows["reward model, held-out pairs"].endswith("| yes |")

    # The count and spatial gates read the larger samples of the other seed's world where they were evaluated, the
    # test split's figures beside them: round 2 gains 30 of 400 spatial questions there (+7.5 ± 1.3), GRPO none; on
    # count round 2 gains 3 of 400 (+0.8 ± 0.4: not twice its standard error), GRPO 40 (+10.0 ± 1.5).
    for policy, spatial, count in (("sft", 350, 300), ("rounds", 380, 303), ("grpo", 350, 340)):
        _write_eval(tmp_path / aimed_eval(policy, "spatial"), {"spatial": spatial}, per_category=400, categories=["spatial"])
        _write_eval(tmp_path / aimed_eval(policy, "count"), {"count": count}, per_category=400, categories=["count"])
    _write_eval(tmp_path / "eval-grpo", {"color": 20, "count": 40, "spatial": 39})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in gates_table(tmp_path, results).splitlines()[2:]}
    assert rows["round 2 − SFT: spatial"].endswith(
        "| +7.5 ± 1.3 on 400 questions of the seed-1 world (test split: +0.0 ± 0.0 on 40) | yes |")
    assert rows["GRPO − SFT: spatial"].endswith("| +0.0 ± 0.0 on 400 questions of the seed-1 world (test split: -2.5 ± 2.5 on 40) | no |")
    assert rows["round 2 − SFT: count"].endswith("| +0.8 ± 0.4 on 400 questions of the seed-1 world (test split: +25.0 ± 6.8 on 40) | no |")
    assert rows["GRPO − SFT: count"].endswith("| +10.0 ± 1.5 on 400 questions of the seed-1 world (test split: +25.0 ± 6.8 on 40) | yes |")
    assert "lowest in paired SEs: shape -50.0" in rows["round 2 − SFT: every category"]  # the test split's
    assert rows["the SFT policy's own likelihood, same pairs"].endswith("| reported | 90.0% | — |")

    # The 3/8 student's distilled − labels-only gate, too, reads the other world's larger sample where evaluated.
    students["students"]["pruned to 0.375"]["paired_other_world"] = {"difference": 0.01, "stderr": 0.006, "questions": 6000}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in gates_table(tmp_path, results).splitlines()[2:]}
    assert rows["pruned to 0.375: distilled − labels only"].endswith(
        "| +1.0 ± 0.6 on 6000 questions of the seed-1 world (test split: +10.0 ± 2.0 on 240) | no |")
    assert "80.0% of candidate pairs" in rows["reward model agrees with the verifier"]


def test_pipeline_runs_each_step_after_the_runs_it_reads(tmp_path, monkeypatch):
    """Every run folder a step reads (its model, policy, reward model, initial evaluation) is written by a step of
    an earlier group or earlier in the same lane: the lanes of a group run side by side."""
    monkeypatch.setattr(align.demo, "other_world", lambda run_dir, images: run_dir / "world-seed1")
    run_dir = tmp_path / "demo"
    done, names = set(), []
    for group in pipeline(run_dir, eval_questions=10):
        finished_in_group = set()
        for lane in group:
            ready = set(done)
            for step in lane_steps(lane):
                reads = {
                    Path(value).relative_to(run_dir).parts[0]
                    for value in step.overrides.values()
                    if isinstance(value, Path) and Path(value).is_relative_to(run_dir)
                } - {"world-seed1"}
                assert reads <= ready, (step.name, reads - ready)
                ready.add(step.name)
                finished_in_group.add(step.name)
                names.append(step.name)
        done |= finished_in_group
    assert len(names) == len(set(names))
    assert {"sft", "dpo", "reward", "grpo", "rounds", "eval-dpo", "eval-grpo"} <= done


def test_smoke_runs_every_step_of_the_demo_shrunk(tmp_path, monkeypatch):
    """`--smoke` is the demo's pipeline, step for step, each recipe with `SMOKE`'s settings over the demo's, and
    stage 1's features cached in the run folder, not the shared cache."""
    from align.demo import (
        AIMED_QUESTIONS,
        OTHER_WORLD_IMAGES,
        SMOKE,
        STUDENT_QUESTIONS,
        rounds_aimed_steps,
        students_step,
    )

    monkeypatch.setattr(align.demo, "other_world", lambda run_dir, images: run_dir / f"world-seed1-{images}")
    run_dir = tmp_path / "demo"
    steps = {smoke: [step for group in pipeline(run_dir, 10, smoke=smoke) for lane in group for step in lane_steps(lane)]
             for smoke in (False, True)}
    assert [step.name for step in steps[True]] == [step.name for step in steps[False]]
    for full, small in zip(steps[False], steps[True]):
        assert small.overrides == {**full.overrides, **SMOKE.get(full.script, {}),
                                   **({"feature_cache_dir": run_dir / "features"} if full.script == "pretrain.py" else {}),
                                   **({"world_path": run_dir / "world-seed1-20"} if "world_path" in full.overrides else {}),
                                   **({"num_questions": 10} if full.overrides.get("num_questions") == AIMED_QUESTIONS else {})}
    assert {step.script for step in steps[True]} - {"evaluate.py"} <= set(SMOKE)
    rounds = {"rounds": [{"round": 1}], "final_policy": str(run_dir / "rounds" / "round1" / "dpo")}
    assert students_step(run_dir, rounds, 10, smoke=True).overrides["max_steps"] == SMOKE["students.py"]["max_steps"]
    assert "max_steps" not in students_step(run_dir, rounds, 10).overrides
    # The students' distilled − labels-only comparison on the other seed's world, too: its larger sample.
    for smoke, world, questions in ((False, f"world-seed1-{OTHER_WORLD_IMAGES}", STUDENT_QUESTIONS), (True, "world-seed1-20", 10)):
        overrides = students_step(run_dir, rounds, 10, smoke=smoke).overrides
        assert (overrides["paired_world_path"], overrides["paired_num_questions"]) == (run_dir / world, questions)
    aimed = {smoke: [step.overrides for step in rounds_aimed_steps(run_dir, rounds, 10, smoke=smoke)] for smoke in (False, True)}
    assert aimed[False] == [{"model_name_or_path": run_dir / "rounds" / "round1" / "dpo", "categories": [category],
                             "world_path": run_dir / f"world-seed1-{OTHER_WORLD_IMAGES}", "num_questions": AIMED_QUESTIONS}
                            for category in ("count", "spatial")]
    assert aimed[True] == [{**full, "world_path": run_dir / "world-seed1-20", "num_questions": 10} for full in aimed[False]]


def test_reasons_section_reads_each_stage_s_reasoned_answers(tmp_path):
    """The report's reasons table: one row per stage whose evaluation exists, from its prediction rows."""
    from datasets import Dataset

    from align.demo import reasons_section
    from align.evaluation import prediction_rows

    record = {"category": "spatial", "question": "Is the red square above the orange square?", "answer": "no",
              "answer_type": "yes_no", "choices": [], "relation": "above"}
    questions = Dataset.from_dict({"record": [json.dumps(record)], "image_id": ["test-0"]})
    answers = {"eval-base": "The orange square is higher, so no.", "eval-sft": "The orange square is higher, so yes.",
               "rounds/round2/eval": "The red square is higher, so no."}  # no DPO or GRPO evaluation: no row
    for folder, answer in answers.items():
        (tmp_path / folder).mkdir(parents=True)
        rows = prediction_rows(questions, [answer])
        (tmp_path / folder / PREDICTIONS).write_text(json.dumps(rows[0]) + "\n")
    rows = reasons_section(tmp_path, {"rounds": [{"round": 1}, {"round": 2}]}).splitlines()
    assert rows[2] == "| base | 1 | 1 | 100.0% (1) | 100.0% (1) | 100.0% (1) | — | 0.0% (1) |"
    assert rows[3] == "| SFT (LoRA) | 1 | 1 | 100.0% (1) | 0.0% (1) | 0.0% (1) | — | 0.0% (1) |"
    assert rows[4] == "| round 2 | 1 | 1 | 0.0% (1) | 0.0% (1) | 0.0% (1) | — | 100.0% (1) |"
    assert rows[5] == "" and "one shape" in rows[6]
