"""recipes/evaluate.py end to end: the real script in a subprocess on a tiny VLM, a tiny world and a LoRA adapter."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from torch import nn

from align.world import build_world
from model.build import build_vlm

REPO = Path(__file__).resolve().parents[2]
NUM_QUESTIONS = 12


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    build_world(root / "world", sizes={"test": 3})
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    return root


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "recipes/evaluate.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _check_outputs(output_dir: Path) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert metrics["total"] == len(predictions) == NUM_QUESTIONS
    assert metrics["correct"] == sum(p["correct"] for p in predictions)
    per_category = Counter(p["category"] for p in predictions)
    assert {c: metrics[f"total_{c}"] for c in per_category} == dict(per_category)
    for prediction in predictions:
        assert set(prediction) >= {"question", "answer", "prediction", "correct", "category"}
    table = (output_dir / "eval_table.md").read_text()
    assert f"| **overall** | {NUM_QUESTIONS} | {metrics['correct']} |" in table
    assert all(f"| {category} | {n} |" in table for category, n in per_category.items())
    return metrics


@pytest.mark.slow
def test_evaluate_a_vlm_with_the_text_regression(setup, tiny_parts):
    config = {
        "model_name_or_path": str(setup / "vlm"), "world_path": str(setup / "world"), "output_dir": str(setup / "out"),
        "num_questions": NUM_QUESTIONS, "batch_size": 5, "max_new_tokens": 6, "base_llm": tiny_parts["llama"],
        "text_documents": 6,
    }
    (setup / "evaluate.yaml").write_text(yaml.safe_dump(config))
    _run(["--config", str(setup / "evaluate.yaml")])
    metrics = _check_outputs(setup / "out")
    # A VLM just built around the LLM holds it unchanged: text-only it is the base LLM exactly.
    assert metrics["text_documents"] == 6 and metrics["text_max_abs_logit_diff"] == 0.0
    assert metrics["text_vlm_perplexity"] == metrics["text_base_perplexity"]
    assert "Text-only regression" in (setup / "out" / "eval_table.md").read_text()


@pytest.mark.slow
def test_evaluate_a_lora_adapter(setup):
    from align.evaluation import load_model_for_eval

    base, _ = load_model_for_eval(setup / "vlm")
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
    )
    adapter = get_peft_model(base, lora)
    torch.manual_seed(0)
    for name, param in adapter.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    adapter.save_pretrained(setup / "adapter")
    result = _run([
        "--model_name_or_path", str(setup / "adapter"), "--world_path", str(setup / "world"),
        "--output_dir", str(setup / "adapter_out"), "--num_questions", str(NUM_QUESTIONS), "--max_new_tokens", "6",
    ])
    assert "applied the adapter" in result.stderr
    metrics = _check_outputs(setup / "adapter_out")
    assert metrics["model_name_or_path"] == str(setup / "adapter") and "text_vlm_loss" not in metrics
