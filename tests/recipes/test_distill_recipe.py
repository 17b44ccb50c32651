"""End to end: `recipes/distill.py` run as a script on a tiny config (post-training ternarization of the teacher by
distillation from cached top-k teacher log-probs), the no-distillation baseline and the real-scale config on tiny
stand-ins (in-process), and a teacher with another vocabulary refused."""

import math

import pytest
import yaml
from transformers import AutoModelForImageTextToText

from model import BitLinear
from tests.align.training_helpers import (
    TINY_TRAINING,
    load_recipe,
    read_json,
    real_config,
    run_real_config,
    run_recipe,
    sft_rows_with_bad_ones,
    tiny_vlm,
    tiny_world,
)
from tests.conftest import CORPUS, save_tiny_llama


@pytest.fixture(scope="module")
def setup(tiny_parts, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-recipe")
    return {
        "teacher": tiny_vlm(root / "teacher", tiny_parts["siglip"], tiny_parts["llama"]),
        "student": tiny_vlm(root / "student", tiny_parts["siglip"], save_tiny_llama(root / "llama2", tiny_tokenizer, num_layers=2)),
        "world": tiny_world(root / "world", images=8),
    }


def distill_config(output_dir, **settings) -> dict:
    return {
        **TINY_TRAINING, "output_dir": str(output_dir), "assistant_only_loss": True, "max_length": None,
        "max_steps": 2, "alpha": 0.5, "refusal_weight": 0.25, **settings,
    }


def run_main(config: dict, path) -> None:
    path.write_text(yaml.safe_dump(config))
    recipe = load_recipe("distill")
    recipe.main(*recipe.make_parser().parse_args_and_config(["--config", str(path)]))


def test_ternary_student_from_cached_teacher_topk(setup, tmp_path):
    output_dir = tmp_path / "run"
    config = distill_config(
        output_dir, teacher_model_name_or_path=setup["teacher"], world_path=setup["world"], student_ternary=True,
        cache_teacher_topk=16, distillation_loss="jsd", temperature=2.0,
    )
    result = run_recipe("distill.py", config, tmp_path)
    assert "student ternarized: 28 LLM linears are BitLinear" in result.stdout
    assert "cached the teacher's top-16 log-probs of 10 rows" in result.stdout  # 8 conversations + 2 refusals

    metrics = read_json(output_dir / "metrics.json")
    assert metrics["global_step"] == 2 and metrics["teacher"] == setup["teacher"] and metrics["ternarized_linears"] == 28
    distillation = metrics["distillation"]
    for term in ("distill_loss", "ce_loss", "teacher_agreement"):
        assert len(distillation[term]["history"]) == 2 and math.isfinite(distillation[term]["last"]), term
    assert distillation["distill_loss"]["first"] > 0  # the ternary student is no longer its teacher
    assert (output_dir / "rejects.jsonl").is_file() and list(output_dir.glob("runs/*/events.out.tfevents.*"))

    # The resolved config re-parses, and the student reloads with its ternary layers.
    script_args, training_args, model_args = load_recipe("distill").make_parser().parse_args_and_config(
        ["--config", str(output_dir / "config.yaml")]
    )
    assert script_args.student_ternary and training_args.cache_teacher_topk == 16
    assert model_args.model_name_or_path == setup["teacher"]  # the student started from the teacher
    student = AutoModelForImageTextToText.from_pretrained(output_dir)
    assert student.config.ternary and isinstance(student.model.language_model.layers[0].mlp.up_proj, BitLinear)


def test_on_policy_lora_student_in_process(setup, tmp_path):
    config = distill_config(
        tmp_path / "run", model_name_or_path=setup["student"], teacher_model_name_or_path=setup["teacher"],
        world_path=setup["world"], mode="on_policy", alpha=1.0, max_completion_length=4, use_peft=True, lora_r=4,
        lora_alpha=8, lora_dropout=0.0,
    )
    run_main(config, tmp_path / "on.yaml")
    output_dir = tmp_path / "run"
    assert (output_dir / "adapter_model.safetensors").is_file()
    metrics = read_json(output_dir / "metrics.json")
    assert metrics["global_step"] == 2 and math.isfinite(metrics["distillation"]["distill_loss"]["last"])
    assert set(metrics["distillation"]) == {"distill_loss"}  # TRL's on-policy loss is the divergence alone


def test_baseline_and_real_config_in_process(setup, tmp_path):
    # alpha 0: SFT on the labels with everything else the same; no teacher is needed.
    run_main(distill_config(tmp_path / "baseline", model_name_or_path=setup["student"], world_path=setup["world"], alpha=0.0), tmp_path / "b.yaml")
    metrics = read_json(tmp_path / "baseline" / "metrics.json")
    assert metrics["teacher"] is None and set(metrics["distillation"]) == {"ce_loss"}
    assert metrics["loss"]["history"][0][1] == pytest.approx(metrics["distillation"]["ce_loss"]["history"][0][1], rel=1e-3)

    # The real-scale config, its paths replaced by tiny stand-ins: a LoRA-free student of another size, cached top-k.
    config = real_config("distill")
    data, _ = sft_rows_with_bad_ones(tmp_path / "data")
    assert config["model_name_or_path"].startswith("/path/to/") and config["teacher_model_name_or_path"].startswith("/path/to/")
    metrics = run_real_config("distill", {
        **config, "model_name_or_path": setup["student"], "teacher_model_name_or_path": setup["teacher"],
        "output_dir": str(tmp_path / "real"), "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
        "report_to": "none", "logging_steps": 1,
        "datasets": [{**source, "path": data, "format": "trl", "image_root": None} for source in config["datasets"]],
    }, tmp_path)
    assert metrics["global_step"] == 1 and metrics["rows"]["rejected"] == 8  # 4 bad rows in each of 2 sources
    assert math.isfinite(metrics["distillation"]["distill_loss"]["last"])


def test_a_teacher_with_another_vocabulary_is_refused(setup, tiny_parts, tmp_path):
    from align.zoo.tokenizer import train_tokenizer

    llm = save_tiny_llama(tmp_path / "llama300", train_tokenizer(CORPUS, vocab_size=300))
    teacher = tiny_vlm(tmp_path / "teacher300", tiny_parts["siglip"], llm)
    config = distill_config(
        tmp_path / "run", teacher_model_name_or_path=teacher, model_name_or_path=setup["student"], world_path=setup["world"]
    )
    with pytest.raises(ValueError, match=rf"teacher {teacher} has vocab_size \d+ but student {setup['student']}.*not supported"):
        run_main(config, tmp_path / "c.yaml")
