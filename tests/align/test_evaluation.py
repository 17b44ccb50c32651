"""Evaluation: batched greedy answers, per-category scoring with standard errors, the text-only regression check,
loading adapters, Markdown tables and the run report."""

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from torch import nn

from align.evaluation import (
    category_table,
    decode_completions,
    evaluate_qa,
    generate_answers,
    is_adapter_dir,
    load_eval_questions,
    majority_answer,
    paired_difference,
    paired_table,
    question_rows,
    read_predictions,
    sample_answers,
    sample_batch,
    sampled_metrics,
    sampled_table,
    score_answers,
    scoreboard,
    text_regression,
)
from align.loading import load_run
from align.report import load_log_history, write_report
from align.world import build_world, generate_split
from model.build import build_vlm
from tests.conftest import CORPUS

LLM_LORA = dict(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
# Wrong answers: a made-up answer to an unanswerable question, a refusal to an answerable one.
WRONG = {"refusal": "It is made of wood."}


@pytest.fixture(scope="module")
def world_split():
    return generate_split("test", 3)  # 28 questions of every category


@pytest.fixture(scope="module")
def questions(world_split):
    return question_rows(world_split, n=8)


def _open_gates(vlm):
    # Zero-initialised gates make a cross-attention VLM ignore its images; open them so that images matter.
    for block in vlm.model.cross_attention.values():
        nn.init.constant_(block.attn_gate, 1.0)
        nn.init.constant_(block.mlp_gate, 1.0)


def _with_lora(vlm):
    peft_model = get_peft_model(copy.deepcopy(vlm), LoraConfig(task_type="CAUSAL_LM", **LLM_LORA))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it change the model
            nn.init.normal_(param, std=0.1)
    return peft_model


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_batched_answers_match_one_by_one(tiny_parts, questions, fusion):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion=fusion)
    if fusion == "cross_attention":
        _open_gates(vlm)
    prompts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in questions["prompt"]]
    assert len({len(processor.tokenizer(p)["input_ids"]) for p in prompts}) > 1  # one batch of 8 is left-padded
    batched = generate_answers(vlm, processor, questions, batch_size=8, max_new_tokens=6)
    single = generate_answers(vlm, processor, questions, batch_size=1, max_new_tokens=6)
    assert batched == single and len(batched) == len(questions)
    # A list of dicts works like a Dataset.
    assert generate_answers(vlm, processor, [questions[i] for i in range(3)], batch_size=2, max_new_tokens=6) == batched[:3]


def test_answers_of_a_peft_wrapped_vlm(tiny_parts, questions):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    wrapped = _with_lora(vlm)
    batched = generate_answers(wrapped, processor, questions, batch_size=8, max_new_tokens=6)
    assert batched == generate_answers(wrapped, processor, questions, batch_size=1, max_new_tokens=6)


def test_decode_strips_end_of_turn_and_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    red = tok(" red", add_special_tokens=False)["input_ids"]
    two = tok("two circles", add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    completions = [red + [eos, pad, pad], two, [eos] + red]
    assert decode_completions(tok, completions, [eos]) == ["red", "two circles", ""]


def test_evaluate_qa_with_a_fake_answerer(world_split):
    rows = question_rows(world_split)
    records = [json.loads(r) for r in rows["record"]]
    # Right on every question whose index is not a multiple of 3, wrong on the others.
    right = [i % 3 != 0 for i in range(len(records))]

    def answer(question_rows_):
        assert len(question_rows_) == len(records)
        return [
            r["answer"] if ok else WRONG.get(r["answer_type"], "I can not tell.") for r, ok in zip(records, right)
        ]

    metrics, predictions = evaluate_qa(None, None, world_split, answer_fn=answer, return_predictions=True)
    expected = {}
    for record, ok in zip(records, right):
        correct, total = expected.get(record["category"], (0, 0))
        expected[record["category"]] = (correct + ok, total + 1)
    assert set(expected) == {"color", "shape", "count", "existence", "spatial", "unanswerable"}
    for category, (correct, total) in expected.items():
        p = correct / total
        assert metrics[f"total_{category}"] == total and metrics[f"correct_{category}"] == correct
        assert metrics[f"accuracy_{category}"] == pytest.approx(p)
        assert metrics[f"stderr_{category}"] == pytest.approx(math.sqrt(p * (1 - p) / total))
    assert metrics["total"] == len(records) == 28 and metrics["correct"] == sum(right)
    assert metrics["stderr"] == pytest.approx(math.sqrt(sum(right) / 28 * (1 - sum(right) / 28) / 28))
    assert [p["correct"] for p in predictions] == right
    assert predictions[0]["question"] == records[0]["question"] and predictions[0]["image_id"] == "test-000000"

    # n keeps the first questions.
    first = evaluate_qa(None, None, world_split, n=5, answer_fn=lambda q: [json.loads(r)["answer"] for r in q["record"]])
    assert first["total"] == 5 and first["accuracy"] == 1.0 and first["stderr"] == 0.0


def test_score_answers_by_hand():
    def record(category, answer, answer_type):
        return {"category": category, "question": "Q?", "answer": answer, "answer_type": answer_type, "choices": []}

    records = [record("count", "2", "number")] * 3 + [record("color", "red", "color")]
    metrics = score_answers(records, ["two", "There are 2.", "3", "blue"])
    assert (metrics["correct"], metrics["total"], metrics["accuracy"]) == (2, 4, 0.5)
    assert metrics["stderr"] == pytest.approx(0.25)  # sqrt(0.5 * 0.5 / 4)
    assert metrics["stderr_count"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert metrics["accuracy_color"] == 0.0 and metrics["stderr_color"] == 0.0
    with pytest.raises(ValueError, match="3 predictions for 4"):
        score_answers(records, ["a", "b", "c"])


def _prediction_file(path, correct, categories, shuffle=False):
    rows = [
        {"question": f"Q{i}?", "answer": "a", "prediction": "a" if ok else "b", "correct": ok, "category": c,
         "image_id": f"test-{i // 2:06d}"}
        for i, (ok, c) in enumerate(zip(correct, categories))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows[::-1] if shuffle else rows)))
    return path


def test_sampled_metrics_by_hand():
    count = {"category": "count", "question": "Q?", "answer": "2", "answer_type": "number", "choices": []}
    color = {"category": "color", "question": "Q?", "answer": "red", "answer_type": "color", "choices": []}
    samples = [
        ["two", "2", "three", "Two."],  # count: 3 of 4 right; the majority ("two", twice) is right
        ["blue", "red", "blue", "green"],  # color: 1 of 4 right; the majority ("blue") is wrong
    ]
    metrics = sampled_metrics([count, json.dumps(color)], samples)
    assert metrics["num_samples"] == 4 and set(k for k in metrics if k.startswith("pass@") and "_" not in k) == {
        "pass@1", "pass@2", "pass@4"}
    assert metrics["pass@1_count"] == 0.75 and metrics["pass@1_color"] == 0.25
    assert metrics["pass@2_color"] == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert metrics["pass@4_color"] == 1.0 and metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["maj@4_count"] == 1.0 and metrics["maj@4_color"] == 0.0 and metrics["maj@4"] == 0.5
    assert majority_answer(["Two.", "red", "two"]) == "Two."  # compared normalized, the first one seen returned
    table = sampled_table({**metrics, **score_answers([count, color], ["two", "blue"])})
    assert "| category | greedy | pass@1 | pass@2 | pass@4 | maj@4 |" in table
    assert "| **overall** | 50.0% | 50.0% | " in table
    with pytest.raises(ValueError, match="same number"):
        sampled_metrics([count, color], [["two"], ["red", "blue"]])


def test_sample_answers_are_best_of_n_batches_seeded_by_their_first_row(tiny_parts, questions):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    rows = questions.select(range(5))
    settings = dict(temperature=1.0, max_new_tokens=4)
    samples = sample_answers(vlm, processor, rows, 3, batch_size=2, seed=10, **settings)
    assert [len(group) for group in samples] == [3] * 5
    assert samples == sample_answers(vlm, processor, rows, 3, batch_size=2, seed=10, **settings)
    batches = [list(rows.select(range(first, min(first + 2, 5)))) for first in (0, 2, 4)]
    by_batch = [sample_batch(vlm, processor, batch, 3, seed=10 + first, **settings) for batch, first in zip(batches, (0, 2, 4))]
    assert samples == [group for batch in by_batch for group in batch]


def test_paired_difference_by_hand(tmp_path):
    categories = ["count"] * 6 + ["spatial"] * 4
    a = read_predictions(_prediction_file(tmp_path / "a.jsonl", [1, 1, 1, 0, 0, 1, 1, 1, 0, 0], categories))
    # The same questions in another order: matched by image and question, not by line.
    b = read_predictions(_prediction_file(tmp_path / "b.jsonl", [1, 0, 0, 0, 1, 1, 0, 1, 0, 0], categories, shuffle=True))
    result = paired_difference(a, b)
    # Only a right: questions 1, 2, 6; only b right: question 4. d = (0,1,1,0,-1,0,1,0,0,0).
    assert (result["questions"], result["a_only"], result["b_only"]) == (10, 3, 1)
    assert result["difference"] == pytest.approx(0.2)
    assert result["stderr"] == pytest.approx(math.sqrt((4 / 10 - 0.2**2) / 10))
    assert result["difference_count"] == pytest.approx(1 / 6) and result["questions_count"] == 6
    assert result["stderr_count"] == pytest.approx(math.sqrt((3 / 6 - (1 / 6) ** 2) / 6))
    assert result["difference_spatial"] == pytest.approx(0.25) and result["questions_spatial"] == 4
    # Identical answers differ by exactly nothing.
    assert paired_difference(a, a)["difference"] == 0.0 and paired_difference(a, a)["stderr"] == 0.0

    table = paired_table({"A − B": result})
    assert table.splitlines()[0].startswith("| comparison | questions | difference | only the first right |")
    assert "| A − B | 10 | +20.0 ± 19.0 | 3 | 1 | +16.7 ± 28.1 | +25.0 ± 21.7 |" in table

    with pytest.raises(ValueError, match="not on the same questions"):
        paired_difference(a, b[:9])
    with pytest.raises(ValueError, match="second evaluation holds question .* more than once"):
        paired_difference(a, b[:9] + b[:1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "correct": True}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        read_predictions(bad)


def test_command_line_compares_evaluations_with_a_baseline(tmp_path, capsys):
    """`python -m align.evaluation BASELINE OTHER...`: each evaluation folder minus the first, paired."""
    from align.evaluation import main

    categories = ["count", "spatial"] * 3
    for folder, correct in {"sft": [0, 0, 1, 0, 1, 1], "dpo": [0, 1, 1, 0, 1, 1], "round1": [1, 1, 1, 1, 0, 1]}.items():
        (tmp_path / folder).mkdir()
        _prediction_file(tmp_path / folder / "predictions.jsonl", correct, categories)
    main([str(tmp_path / "sft"), str(tmp_path / "dpo"), str(tmp_path / "round1")])
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith(f"| {tmp_path / 'dpo'} − {tmp_path / 'sft'} | 6 | +16.7 ± 15.2 | 1 | 0 |")
    assert rows[3].startswith(f"| {tmp_path / 'round1'} − {tmp_path / 'sft'} | 6 | +33.3 ± 30.4 | 3 | 1 |")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "sft")])


def test_form_table_splits_a_category_by_question_form(tmp_path, capsys):
    """`--forms`: accuracy per form of the categories asked in several forms; older rows without a form are refused."""
    from align.evaluation import form_table, main

    rows = [{"question": f"Q{i}?", "category": category, "answer_type": form, "correct": correct, "image_id": "a"}
            for i, (category, form, correct) in enumerate([
                ("spatial", "yes_no", True), ("spatial", "yes_no", False), ("spatial", "choice", True),
                ("color", "color", False), ("spatial", "yes_no", False), ("spatial", "choice", True)])]
    table = form_table({"sft": rows})
    assert table.splitlines()[0] == "| evaluation | spatial: choice | spatial: yes_no |"  # color has one form
    assert table.splitlines()[2] == "| sft | 100.0% (2) | 33.3% (3) |"
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    main([str(tmp_path / "sft"), "--forms"])
    assert "| 100.0% (2) | 33.3% (3) |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="old: prediction rows without `answer_type`"):
        form_table({"old": [{k: v for k, v in row.items() if k != "answer_type"} for row in rows]})


def test_reasons_table_splits_reasoned_answers_by_what_went_wrong(tmp_path, capsys):
    """`--reasons`: of the reasoned yes/no spatial answers, how many state a true reason and how many conclude what
    their reason says, split by whether the two objects share their shape."""
    from datasets import Dataset

    from align.evaluation import main, prediction_rows, reasons_table

    one_shape = {"category": "spatial", "question": "Is the red square above the orange square?", "answer": "no",
                 "answer_type": "yes_no", "choices": [], "relation": "above"}
    two_shapes = {"category": "spatial", "question": "Is the red circle to the left of the blue square?",
                  "answer": "yes", "answer_type": "yes_no", "choices": [], "relation": "left_of"}
    color = {"category": "color", "question": "What color is the circle?", "answer": "red", "answer_type": "color",
             "choices": []}
    records = [one_shape, one_shape, two_shapes, two_shapes, color]
    answers = ["The red square is higher, so no.",  # false reason, not followed: right by luck
               "The orange square is higher, so no.",  # true, followed
               "The red circle is further left, so yes.",  # true, followed
               "yes",  # states no reason
               "red"]
    questions = Dataset.from_dict({"record": [json.dumps(r) for r in records], "image_id": [f"i{n}" for n in range(5)]})
    rows = prediction_rows(questions, answers)
    assert [row["relation"] for row in rows] == ["above", "above", "left_of", "left_of", None]
    table = reasons_table({"sft": rows}).splitlines()
    assert table[0].startswith("| evaluation | yes/no spatial | reasoned | reason true | yes/no follows the reason |")
    assert table[2] == "| sft | 4 | 3 | 66.7% (3) | 66.7% (3) | 50.0% (2) | 100.0% (1) | 33.3% (3) |"
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    main([str(tmp_path / "sft"), "--reasons"])
    assert table[2].removeprefix("| sft ") in capsys.readouterr().out
    with pytest.raises(ValueError, match="without `relation`"):
        reasons_table({"old": [{k: v for k, v in row.items() if k != "relation"} for row in rows]})


def test_count_table_by_true_number_and_near_misses(tmp_path, capsys):
    """`--counts`: count accuracy by the true number, and the share of wrong counts that state one number one away."""
    from align.evaluation import count_table, main

    answers = [("2", "2"), ("2", "3"), ("3", "1"), ("0", "0"), ("3", "There are 2."), ("0", "none")]
    rows = [{"question": f"How many things {i}?", "category": "count", "answer": answer, "prediction": prediction,
             "correct": answer == prediction, "image_id": "a"} for i, (answer, prediction) in enumerate(answers)]
    rows.append({"question": "What color?", "category": "color", "answer": "red", "prediction": "blue",
                 "correct": False, "image_id": "a"})
    table = count_table({"sft": rows}).splitlines()
    assert table[0] == "| evaluation | answer 0 | answer 2 | answer 3 | wrong answers one away |"
    # Wrong: 2 -> 3 (one away), 3 -> 1 (two away), 3 -> "There are 2." (one away), 0 -> "none" (no number).
    assert table[2] == "| sft | 50.0% (2) | 50.0% (2) | 0.0% (2) | 50.0% (4) |"
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    main([str(tmp_path / "sft"), "--counts"])
    assert table[2].removeprefix("| sft ") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "sft"), "--counts", "--forms"])


def test_demo_compares_dpo_and_rounds_with_sft(tmp_path):
    from align.demo import paired_against_sft

    categories = ["count", "spatial"] * 3
    answers = {"eval-sft": [0, 0, 1, 0, 1, 1], "eval-dpo": [0, 1, 1, 0, 1, 1], "rounds/round1/eval": [1, 1, 1, 1, 0, 1]}
    for folder, correct in answers.items():
        (tmp_path / folder).mkdir(parents=True)
        _prediction_file(tmp_path / folder / "predictions.jsonl", correct, categories)
    table = paired_against_sft(tmp_path, {"rounds": [{"round": 1}]})
    # DPO: one spatial question more; round 1: two spatial questions more, one count question more and one less.
    assert "| DPO (LoRA) − SFT | 6 | +16.7 ± 15.2 | 1 | 0 | +0.0 ± 0.0 | +33.3 ± 27.2 |" in table
    assert "| round 1 − SFT | 6 | +33.3 ± 30.4 | 3 | 1 | +0.0 ± 47.1 | +66.7 ± 27.2 |" in table


def test_text_regression_is_exact_for_cross_attention_and_sees_drift(tiny_parts):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion="cross_attention")
    _open_gates(vlm)  # even with open gates, text without images never reaches the adapters
    texts = CORPUS[:7]
    result = text_regression(vlm, processor, tiny_parts["llama"], texts, batch_size=3)
    assert result["documents"] == 7 and result["tokens"] > 7
    assert result["vlm_loss"] == result["base_loss"] and result["loss_diff"] == 0.0
    assert result["max_abs_logit_diff"] == 0.0 and result["vlm_perplexity"] == result["base_perplexity"] > 1

    with torch.no_grad():  # finetuning the LLM drifts it from the base
        vlm.model.language_model.layers[0].mlp.down_proj.weight.add_(0.05)
    drifted = text_regression(vlm, processor, tiny_parts["llama"], texts, batch_size=3)
    assert drifted["base_loss"] == result["base_loss"]
    assert drifted["loss_diff"] != 0.0 and drifted["max_abs_logit_diff"] > 1e-4


def test_load_model_for_eval_applies_an_adapter(tiny_parts, tmp_path):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    vlm.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    base, _ = load_run(tmp_path / "base")
    wrapped = _with_lora(base)  # records tmp_path/base as the adapter's base model
    wrapped.save_pretrained(tmp_path / "adapter")
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(tmp_path / "base")

    loaded, loaded_processor = load_run(tmp_path / "adapter")
    assert isinstance(loaded, PeftModel) and not loaded.training
    assert loaded_processor.num_image_tokens == processor.num_image_tokens
    batch = processor(images=[[Image.new("RGB", (32, 32), "red")]], text=["<image>What color?"], return_tensors="pt")
    with torch.no_grad():
        expected, plain, got = wrapped(**batch).logits, base(**batch).logits, loaded(**batch).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain)
    merged, _ = load_run(tmp_path / "adapter", merge=True)  # the same model, merged into its base
    assert not isinstance(merged, PeftModel) and not merged.training
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_run(tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "missing"))


def test_load_eval_questions_from_a_world_and_from_jsonl(tmp_path, world_split):
    build_world(tmp_path / "world", sizes={"test": 2})
    from_world = load_eval_questions(tmp_path / "world", split="test", n=5)
    assert len(from_world) == 5 and {"images", "prompt", "record", "category"} <= set(from_world.column_names)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_eval_questions(tmp_path / "world", split="validation")

    rows = question_rows(world_split, n=3)
    lines = []
    for index, row in enumerate(rows):
        image = tmp_path / f"image{index}.png"
        if index != 1:  # the second row's image is missing: the row is skipped, the records stay aligned
            row["images"][0].save(image)
        lines.append(json.dumps({"images": [image.name], "prompt": row["prompt"], "record": json.loads(row["record"])}))
    (tmp_path / "questions.jsonl").write_text("\n".join(lines) + "\n")
    loaded = load_eval_questions(tmp_path / "questions.jsonl")
    assert loaded["record"] == [rows["record"][0], rows["record"][2]]
    assert loaded["category"] == [rows["category"][0], rows["category"][2]]

    # `categories` keeps the questions of those categories, before the first n are taken.
    every = load_eval_questions(tmp_path / "world", split="test")
    counts = load_eval_questions(tmp_path / "world", split="test", categories=["count"])
    assert counts["record"] == [r for r, c in zip(every["record"], every["category"]) if c == "count"]
    assert load_eval_questions(tmp_path / "world", split="test", n=2, categories=["count"])["record"] == counts["record"][:2]
    with pytest.raises(ValueError, match=r"no questions of the categories \['weather'\]"):
        load_eval_questions(tmp_path / "world", split="test", categories=["weather"])


def _metrics(correct: dict[str, tuple[int, int]]) -> dict:
    return score_answers(
        [{"category": c, "question": "Q?", "answer": "2", "answer_type": "number"} for c, (_, n) in correct.items() for _ in range(n)],
        [("2" if i < k else "5") for _, (k, n) in correct.items() for i in range(n)],
    )


def test_markdown_tables():
    stage1 = _metrics({"count": (1, 4), "color": (0, 2)})
    sft = _metrics({"count": (3, 4), "color": (2, 2), "spatial": (1, 2)})
    table = category_table(sft).splitlines()
    assert table[0].startswith("| category | questions | correct | accuracy")
    assert table[2] == "| color | 2 | 2 | 100.0% | 0.0% |"  # the world's category order: color first
    assert table[-1] == "| **overall** | 8 | 6 | **75.0%** | 15.3% |"  # sqrt(.75 * .25 / 8) = 0.153

    board = scoreboard({"stage 1": stage1, "SFT": sft}).splitlines()
    assert board[0] == "| stage | questions | overall | color | count | spatial |"
    assert board[2] == "| stage 1 | 6 | 16.7% ± 15.2 | 0.0% | 25.0% | – |"
    assert board[3] == "| SFT | 8 | 75.0% ± 15.3 | 100.0% | 75.0% | 50.0% |"
    with pytest.raises(ValueError):
        scoreboard({})


def test_report_writes_markdown_and_png(tmp_path):
    stage1 = _metrics({"count": (1, 4), "color": (0, 2)})
    sft = _metrics({"count": (3, 4), "color": (2, 2)})
    state = {"log_history": [{"loss": 2.5, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.8, "step": 2}]}
    (tmp_path / "sft" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "sft" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    curves = {"stage 1": [{"loss": 3.0, "step": 5}, {"loss": 2.0, "step": 10}], "SFT": load_log_history(tmp_path / "sft")}
    curves["GRPO"] = [{"loss": 0.0, "reward": 0.5 + 0.1 * step, "kl": 0.001 * step, "step": step} for step in (1, 2, 3)]
    assert curves["SFT"] == state["log_history"] and load_log_history(tmp_path / "nothing") == []

    students = "| model | LLM parameters |\n|---|---:|\n| teacher | 1,000 |"
    paths = write_report(tmp_path / "run", {"stage 1": stage1, "SFT": sft}, curves, sections={"Students": students})
    report = paths["report"].read_text()
    assert "| SFT | 6 | 83.3% ± 15.2 |" in report and "![" in report
    assert report.rstrip().endswith("## Students\n\n" + students)
    assert "- **SFT**: 83.3% ± 15.2 on 6 questions; +66.7 points over stage 1" in report
    assert "training loss 2.500 → 1.500 over 2 steps" in report
    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
