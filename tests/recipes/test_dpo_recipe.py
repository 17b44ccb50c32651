"""End to end: `recipes/dpo.py` run as a script on tiny configs (LoRA with the adapter-disabled reference, its
log-probs precomputed, in two processes under `accelerate launch`; QLoRA with cross-attention fusion, an explicit
reference model and bad rows), and the real-scale config on tiny stand-ins."""

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from align.training import load_trained
from model import VLMForConditionalGeneration
from tests.align.training_helpers import (
    check_run_output,
    lora_config,
    preference_rows_with_bad_ones,
    real_config,
    run_real_config,
    run_recipe,
    tiny_vlm,
    tiny_world,
)
from tests.conftest import save_tiny_llama

LN2 = math.log(2)


@pytest.fixture(scope="module")
def setup(tiny_parts, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    llama64 = save_tiny_llama(root / "llama64", tiny_tokenizer, hidden_size=64)
    cross64 = tiny_vlm(root / "vlm-cross64", tiny_parts["siglip"], llama64, "cross_attention")
    # A reference that differs from the policy: the same VLM with its LM head scaled.
    reference = AutoModelForImageTextToText.from_pretrained(cross64)
    with torch.no_grad():
        reference.lm_head.weight.mul_(1.5)
    reference.save_pretrained(root / "vlm-cross64-ref")
    return {
        "prepend": tiny_vlm(root / "vlm-prepend", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention64": cross64,
        "reference": str(root / "vlm-cross64-ref"),
        "world": tiny_world(root / "world", images=12),
    }


def dpo_config(model: str, output_dir, **settings) -> dict:
    return lora_config(model, output_dir, **{"lora_dropout": 0.0, "max_length": None, "beta": 0.1, **settings})


def check_output(output_dir, steps: int) -> dict:
    metrics, _ = check_run_output("dpo", output_dir, steps)
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(loss) for _, loss in metrics["loss"]["history"])
    assert isinstance(load_trained(output_dir), VLMForConditionalGeneration)
    return metrics


@pytest.mark.slow
def test_lora_precomputed_adapter_free_reference_with_two_processes(setup, tmp_path):
    config = dpo_config(
        setup["prepend"], tmp_path / "run", world_path=setup["world"], pairs_per_image=1, precompute_ref_log_probs=True
    )
    result = run_recipe("dpo.py", config, tmp_path, processes=2)
    assert "precomputed the reference log-probs of 12 preference pairs" in result.stdout
    metrics = check_output(tmp_path / "run", steps=2)
    assert metrics["reference"] == "adapters disabled" and metrics["rows"]["train"] == 12
    # At the first step the policy is its reference (LoRA B = 0): with the precomputed values gathered back in row
    # order from both processes, every pair's log-ratio is 0 and the loss is exactly ln 2.
    assert metrics["loss"]["history"][0][1] == pytest.approx(LN2, abs=1e-4)
    assert metrics["loss"]["history"][1][1] != pytest.approx(LN2, abs=1e-6)


@pytest.mark.slow
def test_qlora_cross_attention_explicit_reference_and_bad_rows(setup, tmp_path):
    data, expected = preference_rows_with_bad_ones(tmp_path / "data")
    config = dpo_config(
        setup["cross_attention64"], tmp_path / "run", datasets=[{"path": data, "format": "rlaif_v"}],
        ref_model_name_or_path=setup["reference"], load_in_4bit=True, use_bnb_nested_quant=True,
    )
    result = run_recipe("dpo.py", config, tmp_path)
    assert "skipped 2 rows (" in result.stdout and f"reference: {setup['reference']}" in result.stdout
    metrics = check_output(tmp_path / "run", steps=2)
    assert metrics["rows"] == {"train": 8, "rejected": 2, "rejected_by_reason": expected}
    assert metrics["linears"]["language_model"] == {"4bit": 4 * 7, "full_precision": 0}
    assert metrics["reference"] == setup["reference"]
    # The reference is not the policy, so even the first step has non-zero log-ratios.
    assert metrics["loss"]["history"][0][1] != pytest.approx(LN2, abs=1e-3)


def test_real_config_on_tiny_stand_ins(setup, tmp_path):
    """The real-scale config, its paths replaced by tiny stand-ins, runs one step (in-process)."""
    config = real_config("dpo")
    data, _ = preference_rows_with_bad_ones(tmp_path / "data")
    assert all(source["path"].startswith("/path/to/") for source in config["datasets"])
    metrics = run_real_config("dpo", {
        **config, "model_name_or_path": setup["prepend"], "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 2,
        "datasets": [{**source, "path": data, "image_root": None} for source in config["datasets"]],
    }, tmp_path)
    assert metrics["global_step"] == 1 and metrics["rows"]["train"] == 8
    assert metrics["train"]["train_loss"] == pytest.approx(LN2, abs=1e-4)  # precomputed, adapter-free reference
