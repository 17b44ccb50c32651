"""End to end: `recipes/grpo.py` run as a script on tiny configs (LoRA with prepend fusion on the world's prompts,
then resumed; QLoRA with cross-attention fusion and a reward model among the rewards), and the real-scale config
on tiny stand-ins."""

import math

import pytest
import torch

from align.training import load_trained
from model import VLMForConditionalGeneration, VLMProcessor
from model.reward_model import VLMForRewardModeling
from tests.align.training_helpers import (
    check_run_output,
    lora_config,
    real_config,
    run_real_config,
    run_recipe,
    tiny_vlm,
    tiny_world,
)


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-recipe")
    cross = tiny_vlm(root / "vlm-cross", tiny_parts["siglip"], tiny_parts["llama"], "cross_attention")
    # A reward model on the same backbone whose head scores answers differently (an untrained head scores all 0).
    reward = VLMForRewardModeling.from_vlm(cross)
    with torch.no_grad():
        reward.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    reward.save_pretrained(root / "reward")
    VLMProcessor.from_pretrained(cross).save_pretrained(root / "reward")
    return {
        "prepend": tiny_vlm(root / "vlm-prepend", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention": cross,
        "reward": str(root / "reward"),
        "world": tiny_world(root / "world", images=8),
    }


def grpo_config(model: str, output_dir, world: str, **settings) -> dict:
    return lora_config(model, output_dir, **{
        "world_path": world, "num_prompts": 16, "num_generations": 4, "per_device_train_batch_size": 8,
        "max_completion_length": 6, "beta": 0.04, **settings,
    })


def check_output(output_dir, steps: int) -> dict:
    metrics, _ = check_run_output("grpo", output_dir, steps)
    assert (output_dir / "adapter_model.safetensors").is_file() and metrics["rows"]["train"] == 16
    assert [step for step, _ in metrics["reward"]["history"]] == list(range(1, steps + 1))
    assert all(math.isfinite(kl) and kl >= 0 for _, kl in metrics["kl"]["history"])
    assert isinstance(load_trained(output_dir), VLMForConditionalGeneration)
    return metrics


@pytest.mark.slow
def test_lora_prepend_on_world_prompts_then_resume(setup, tmp_path):
    output_dir = tmp_path / "run"
    config = grpo_config(setup["prepend"], output_dir, setup["world"], save_strategy="steps", save_steps=2)
    first = run_recipe("grpo.py", config, tmp_path)
    assert "training on 16 prompts, 4 answers each" in first.stdout
    metrics = check_output(output_dir, steps=2)
    # 2 prompts per step: at most 2 images per step go through the tower, whatever the 4 answers and 3 passes.
    assert 1 <= metrics["images_encoded"] <= 4
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()

    second = run_recipe("grpo.py", config, tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "last")
    assert "resuming from" in second.stdout and "checkpoint-2" in second.stdout
    resumed = check_output(output_dir, steps=3)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["reward"]["history"][:2] == metrics["reward"]["history"]
    assert resumed["images_encoded"] <= 2  # only step 3 ran


@pytest.mark.slow
def test_qlora_cross_attention_with_a_reward_model(setup, tmp_path):
    config = grpo_config(
        setup["cross_attention"], tmp_path / "run", setup["world"], load_in_4bit=True,
        reward_funcs=["verifier", "format", "reward_model"], reward_model_name_or_path=setup["reward"],
        reward_weights=[1.0, 0.1, 0.5],
    )
    result = run_recipe("grpo.py", config, tmp_path)
    assert "rewards: ['verifier', 'format', 'reward_model'], weights [1.0, 0.1, 0.5]" in result.stdout
    metrics = check_output(tmp_path / "run", steps=2)
    assert metrics["linears"]["language_model"]["4bit"] > 0 and metrics["linears"]["vision_towers"]["4bit"] == 0
    # Each reward function's mean is logged; the weighted sum is the reward.
    per_function = metrics["reward"]["per_function"]
    assert set(per_function) == {"verifier", "format", "reward_model"}
    for step, total in metrics["reward"]["history"]:
        parts = {name: dict(history)[step] for name, history in per_function.items()}
        expected = parts["verifier"] + 0.1 * parts["format"] + 0.5 * parts["reward_model"]
        assert total == pytest.approx(expected, abs=1e-4)


def test_real_config_on_tiny_stand_ins(setup, tmp_path):
    """The real-scale config, its paths replaced by tiny stand-ins, runs one step (in-process)."""
    config = real_config("grpo")
    assert config["dataset_path"].startswith("/path/to/")
    metrics = run_real_config("grpo", {
        **config, "model_name_or_path": setup["prepend"], "output_dir": str(tmp_path / "run"),
        "dataset_path": setup["world"], "num_prompts": 8, "per_device_train_batch_size": 4, "num_generations": 4,
        "max_completion_length": 6, "load_in_4bit": False, "report_to": [],
    }, tmp_path)
    assert metrics["global_step"] == 1 and metrics["rows"]["train"] == 8


def test_the_prompt_filter_decides_what_grpo_trains_on(setup, tmp_path, monkeypatch):
    """`--filter_samples`: the recipe hands the starting policy and the prompts to `filter_by_pass_rate` with its
    bounds, trains on what it keeps, records its report, and stops with a clear error when it keeps nothing."""
    import align.grpo

    calls = []

    def keep_first(model, processor, prompts, samples, low, high, **kwargs):
        calls.append((samples, low, high, len(prompts), isinstance(model, VLMForConditionalGeneration)))
        keep = int(kwargs.get("seed", 0) == 0) * 4  # seed 0 keeps four prompts, any other seed none
        return prompts.select(range(keep)), {"candidates": len(prompts), "kept": keep, "pass_rates": {}}

    monkeypatch.setattr(align.grpo, "filter_by_pass_rate", keep_first)
    config = {
        **real_config("grpo"), "model_name_or_path": setup["prepend"], "output_dir": str(tmp_path / "run"),
        "dataset_path": setup["world"], "num_prompts": 8, "per_device_train_batch_size": 4, "num_generations": 4,
        "max_completion_length": 6, "load_in_4bit": False, "report_to": [], "filter_samples": 3,
        "filter_pass_rate": [0.25, 0.75], "seed": 0,
    }
    metrics = run_real_config("grpo", config, tmp_path)
    assert calls == [(3, 0.25, 0.75, 8, True)]
    assert metrics["rows"]["train"] == 4 and metrics["prompt_filter"] == {"candidates": 8, "kept": 4, "pass_rates": {}}
    with pytest.raises(ValueError, match="no prompt has a pass rate in"):
        run_real_config("grpo", {**config, "output_dir": str(tmp_path / "none"), "seed": 1}, tmp_path)
