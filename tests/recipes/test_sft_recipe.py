"""End to end: `recipes/sft.py` run as a script on tiny configs (QLoRA with cross-attention fusion on data with bad
rows, then resumed; LoRA with prepend fusion on the world in two processes under `accelerate launch`), and the
real-scale config on tiny stand-ins."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from align.training import load_trained
from tests.align.training_helpers import (
    check_run_output,
    lora_config,
    real_config,
    run_real_config,
    run_recipe,
    sft_rows_with_bad_ones,
    tiny_vlm,
    tiny_world,
)
from tests.conftest import save_tiny_llama


@pytest.fixture(scope="module")
def setup(tiny_parts, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    llama64 = save_tiny_llama(root / "llama64", tiny_tokenizer, hidden_size=64)
    return {
        "root": root,
        "prepend": tiny_vlm(root / "vlm-prepend", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention64": tiny_vlm(root / "vlm-cross64", tiny_parts["siglip"], llama64, "cross_attention"),
        "world": tiny_world(root / "world", images=12),
    }


def sft_config(model: str, output_dir: Path, **settings) -> dict:
    return lora_config(model, output_dir, **{"assistant_only_loss": True, "max_length": None, **settings})


def check_output(output_dir: Path, steps: int) -> dict:
    """The run's files are there, its config re-parses, its metrics are sane and the model loads and runs."""
    metrics, (_, _, model_args) = check_run_output("sft", output_dir, steps)
    assert (output_dir / "rejects.jsonl").is_file()
    assert model_args.use_peft == (output_dir / "adapter_config.json").is_file()
    assert math.isfinite(metrics["loss"]["last"])
    assert metrics["rows"]["train"] > 0 and metrics["parameters"]["trainable"] > 0

    model, processor = load_trained(output_dir), AutoProcessor.from_pretrained(output_dir)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8).numpy().transpose(1, 2, 0)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=[[image]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    return metrics


@pytest.mark.slow
def test_qlora_cross_attention_with_bad_rows_then_resume(setup, tmp_path):
    data, expected = sft_rows_with_bad_ones(tmp_path / "data")
    output_dir = tmp_path / "run"
    config = sft_config(
        setup["cross_attention64"], output_dir, dataset_path=data, dataset_format="trl",  # one file, as TRL takes it
        load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True, save_strategy="steps", save_steps=2,
    )
    first = run_recipe("sft.py", config, tmp_path)
    assert "28 linears of the LLM quantized to NF4 with double quantization" in first.stdout
    assert "skipped 4 rows (" in first.stdout and "rejects.jsonl" in first.stdout
    assert len((output_dir / "rejects.jsonl").read_text().splitlines()) == sum(expected.values())
    metrics = check_output(output_dir, steps=2)
    assert metrics["rows"] == {"train": 8, "rejected": 4, "rejected_by_reason": expected}
    linears = metrics["linears"]
    assert linears["language_model"] == {"4bit": 4 * 7, "full_precision": 0}
    for component in ("vision_towers", "projectors", "cross_attention", "lm_head"):
        assert linears[component]["4bit"] == 0 and linears[component]["full_precision"] > 0
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()

    # The run is extended to 3 steps from its checkpoint: it restores steps 1-2 and trains step 3 only.
    second = run_recipe("sft.py", config, tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "last")
    assert "resuming from" in second.stdout and "checkpoint-2" in second.stdout
    resumed = check_output(output_dir, steps=3)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert [step for step, _ in resumed["loss"]["history"]] == [1, 2, 3]
    assert resumed["loss"]["history"][:2] == metrics["loss"]["history"]
    # The trainer reports the loss of this call's steps only, so a restart from scratch would average three.
    assert resumed["train"]["train_loss"] == pytest.approx(resumed["loss"]["history"][2][1], rel=1e-4)


@pytest.mark.slow
def test_lora_prepend_on_the_world_with_two_processes(setup, tmp_path):
    config = sft_config(setup["prepend"], tmp_path / "run", world_path=setup["world"], refusal_weight=0.25)
    run_recipe("sft.py", config, tmp_path, processes=2)
    metrics = check_output(tmp_path / "run", steps=2)
    assert metrics["rows"]["train"] == 15  # 12 conversations + 3 refusals
    assert metrics["linears"]["language_model"] == {"4bit": 0, "full_precision": 4 * 7}
    # Both processes trained: an epoch of 15 rows is ceil(15 / (2 per device x 2 processes)) = 4 steps, not 8.
    assert metrics["train"]["epoch"] == pytest.approx(2 / 4)


def test_real_config_on_tiny_stand_ins(setup, tmp_path):
    """The real-scale config, its paths replaced by tiny stand-ins, runs one step (in-process)."""
    config = real_config("sft")
    data, _ = sft_rows_with_bad_ones(tmp_path / "data")
    assert all(source["path"].startswith("/path/to/") for source in config["datasets"])
    metrics = run_real_config("sft", {
        **config, "model_name_or_path": setup["prepend"], "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 2,
        "datasets": [{**source, "path": data, "format": "trl", "image_root": None} for source in config["datasets"]],
    }, tmp_path)
    assert metrics["global_step"] == 1 and metrics["rows"]["rejected"] == 12  # 4 bad rows in each of 3 sources


@pytest.mark.slow
def test_lora_on_cached_features_trains_as_on_pixels(setup, tmp_path):
    """`use_feature_cache: true`: the towers' output is cached once and training reads it (no tower call per step);
    the losses are those of training on pixels."""
    losses = {}
    for mode in ("true", "false"):
        config = sft_config(setup["prepend"], tmp_path / mode, world_path=setup["world"], use_feature_cache=mode, max_steps=3)
        result = run_recipe("sft.py", config, tmp_path)
        cached = "reading cached vision features" in result.stdout
        assert cached == (mode == "true")
        losses[mode] = [loss for _, loss in check_output(tmp_path / mode, steps=3)["loss"]["history"]]
    assert (tmp_path / "true" / "feature_cache").is_dir()
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


@pytest.mark.slow
def test_padding_free_lora_trains_as_padded(setup, tmp_path):
    losses = {}
    for padding_free in (True, False):
        out = tmp_path / str(padding_free)
        config = sft_config(setup["prepend"], out, world_path=setup["world"], padding_free=padding_free, max_steps=3)
        result = run_recipe("sft.py", config, tmp_path)
        assert ("padding-free:" in result.stdout) == padding_free
        losses[padding_free] = [loss for _, loss in check_output(out, steps=3)["loss"]["history"]]
    # The first step's loss is the same weights on the same batch; after it, the two ways' float sums differ in their
    # last bits and Adam's normalised updates carry that forward, so later steps agree to 1e-3.
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
