"""End to end: `recipes/reward.py` run as a script on a tiny config (LoRA on world pairs, held-out pairs of the
world's validation split), its outputs loaded back for scoring, bad parameters refused with a clear message, and the
real-scale config on tiny stand-ins."""

import math

import pytest
import yaml

from align.reward import load_reward_model, reward_scores
from align.world import WorldConfig, build_world
from tests.align.training_helpers import (
    IMAGE_SIZE,
    load_recipe,
    lora_config,
    preference_rows_with_bad_ones,
    read_json,
    real_config,
    run_real_config,
    run_recipe,
    tiny_vlm,
)

LN2 = math.log(2)


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_recipe")
    build_world(str(root / "world"), sizes={"train": 8, "validation": 3}, config=WorldConfig(image_size=IMAGE_SIZE), seed=0)
    return {"vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]), "world": str(root / "world")}


def reward_config(model: str, output_dir, **settings) -> dict:
    return lora_config(model, output_dir, **{"lora_dropout": 0.0, "max_length": None, "max_steps": 3,
                                             "score_learning_rate": 1.0e-2, **settings})


def test_lora_on_world_pairs_reports_held_out_accuracy(setup, tmp_path):
    output_dir = tmp_path / "run"
    config = reward_config(setup["vlm"], output_dir, world_path=setup["world"], pairs_per_image=1, eval_images=2,
                           likelihood_baseline=True)
    result = run_recipe("reward.py", config, tmp_path)
    assert "held-out pairwise accuracy before training: 50.0% of" in result.stdout
    assert "held-out pairwise accuracy of the policy's likelihood:" in result.stdout
    assert "| pairs | n | before | after | the policy's likelihood |" in result.stdout

    for name in ("adapter_model.safetensors", "processor_config.json", "config.yaml", "metrics.json", "rejects.jsonl"):
        assert (output_dir / name).is_file(), name
    assert list(output_dir.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"
    script_args, training_args, model_args = load_recipe("reward").make_parser().parse_args_and_config(
        ["--config", str(output_dir / "config.yaml")]
    )
    assert training_args.output_dir == str(output_dir) and script_args.eval_images == 2
    assert model_args.lora_task_type == "SEQ_CLS" and "score" in model_args.lora_modules_to_save

    metrics = read_json(output_dir / "metrics.json")
    assert metrics["global_step"] == 3 and metrics["rows"]["train"] == 8
    assert metrics["loss"]["history"][0][1] == pytest.approx(LN2, abs=1e-6)  # zero head
    assert metrics["eval_accuracy_before"] == 0.5  # every answer scores 0: all ties
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval"]["pairs"] == 2  # 2 images, 1 pair each
    assert {"accuracy", "pairs", "mean_margin"} <= metrics["eval"].keys()
    assert any(key.startswith("accuracy_") for key in metrics["eval"])  # per category
    likelihood = metrics["eval_policy_likelihood"]
    assert likelihood["pairs"] == 2 and metrics["eval_accuracy_policy_likelihood"] == likelihood["accuracy"]

    model, processor = load_reward_model(output_dir)
    rows = [{"images": [], "prompt": [{"role": "user", "content": "Hello?"}], "completion": "Hi."}]
    assert len(reward_scores(model, processor, rows)) == 1


@pytest.mark.slow
def test_two_processes(setup, tmp_path):
    """DDP over gloo: the loss and metrics are gathered, the held-out pairs are scored once on the main process."""
    config = reward_config(setup["vlm"], tmp_path / "run", world_path=setup["world"], pairs_per_image=1, max_steps=2)
    result = run_recipe("reward.py", config, tmp_path, processes=2)
    assert result.stdout.count("held-out pairwise accuracy after training") == 1
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["global_step"] == 2 and metrics["rows"]["train"] == 8 and metrics["eval"]["pairs"] == 3
    assert metrics["loss"]["history"][0][1] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--pairs_per_image", "0"], "pairs_per_image must be >= 1"),
        (["--eval_split", "train"], "is the training split"),
        (["--eval_images", "-3"], "eval_images must be >= 0"),
        (["--load_in_4bit", "true", "--use_peft", "false"], "add --use_peft"),
    ],
)
def test_bad_parameters_are_refused_clearly(override, message, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(reward_config("unused", tmp_path / "run")))
    with pytest.raises(ValueError, match=message):
        load_recipe("reward").make_parser().parse_args_and_config(["--config", str(tmp_path / "config.yaml"), *override])


def test_real_config_on_tiny_stand_ins(setup, tmp_path):
    """The real-scale config, its paths replaced by tiny stand-ins (bad rows included), runs one step in-process."""
    config = real_config("reward")
    data, expected = preference_rows_with_bad_ones(tmp_path / "data")
    assert all(source["path"].startswith("/path/to/") for source in config["datasets"])
    assert config["eval_path"].startswith("/path/to/")
    metrics = run_real_config("reward", {
        **config, "model_name_or_path": setup["vlm"], "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "report_to": "none",
        "datasets": [{**source, "path": data, "image_root": None} for source in config["datasets"]],
        "eval_path": data, "eval_image_root": None,
    }, tmp_path)
    assert metrics["global_step"] == 1 and metrics["rows"] == {"train": 8, "rejected": 2, "rejected_by_reason": expected}
    assert metrics["eval_accuracy_before"] == 0.5 and metrics["eval"]["pairs"] == 8
