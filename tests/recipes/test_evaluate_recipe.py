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
    from align.loading import load_run

    base, _ = load_run(setup / "vlm")
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


@pytest.mark.slow
def test_evaluate_with_n_samples_reports_pass_at_k_and_majority(setup):
    from align.evaluation import load_eval_questions
    from align.world import verify

    out = setup / "sampled_out"
    _run([
        "--model_name_or_path", str(setup / "vlm"), "--world_path", str(setup / "world"), "--output_dir", str(out),
        "--num_questions", str(NUM_QUESTIONS), "--max_new_tokens", "6", "--batch_size", "5", "--num_samples", "4",
        "--temperature", "1.5",
    ])
    metrics = _check_outputs(out)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_samples"] == 4 and all(len(p["samples"]) == 4 for p in predictions)
    assert len({text for p in predictions for text in p["samples"]}) > NUM_QUESTIONS  # sampled, not greedy copies
    # pass@1 is the mean sampled accuracy and pass@4 the share of questions with a right sample, read back from the
    # samples with the world's verifier on the same questions' records.
    records = [json.loads(r) for r in load_eval_questions(setup / "world", n=NUM_QUESTIONS)["record"]]
    assert [r["question"] for r in records] == [p["question"] for p in predictions]
    right = [sum(bool(verify(r, text)) for text in p["samples"]) for r, p in zip(records, predictions)]
    assert metrics["pass@1"] == pytest.approx(sum(right) / (4 * NUM_QUESTIONS))
    assert metrics["pass@4"] == pytest.approx(sum(c > 0 for c in right) / NUM_QUESTIONS)
    assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]
    table = (out / "eval_table.md").read_text()
    assert "## 4 sampled answers per question" in table and "| category | greedy | pass@1 | pass@2 | pass@4 | maj@4 |" in table
