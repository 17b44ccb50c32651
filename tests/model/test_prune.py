"""Structured pruning: importance scores on cases with a known answer, every axis giving a consistent checkpoint that
`from_pretrained` loads and runs (Llama, Qwen2, prepend and cross-attention VLMs), the target search, the errors."""

import json
import math

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from model import VLMForConditionalGeneration, VLMProcessor
from model.build import build_vlm
from model.prune import (
    PLAN_FILE,
    PruneArguments,
    PruneSizes,
    PruneTarget,
    block_importance,
    calibration_blocks,
    calibration_loss,
    collect_activation_stats,
    count_params,
    head_importance,
    hidden_channel_importance,
    kv_group_importance,
    layout_for,
    llm_entries,
    main,
    make_parser,
    mlp_channel_importance,
    prune_model,
    read_calibration_texts,
    remap_cross_attention_adapters,
    save_student,
)
from tests.conftest import CORPUS

TEXTS = sorted(set(CORPUS))
HEAD_DIM = 8  # the tiny LLMs: hidden 32, 4 query heads, 2 KV heads
IMAGE = Image.new("RGB", (32, 32), (255, 0, 0))


def load_llm(tiny_parts, name="llama"):
    path = tiny_parts[name]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def prune(model, tokenizer, **target):
    return prune_model(model, tokenizer, TEXTS, PruneTarget(**target), block_size=32)


def stats_of(model, tokenizer):
    blocks = calibration_blocks(TEXTS, tokenizer, block_size=32)
    return collect_activation_stats(model.model, layout_for(model.config), blocks)


def layer(model, index):
    return model.model.layers[index]


def reload_and_run(student, processing, report, folder, model_class=AutoModelForCausalLM, **inputs):
    """Save the student, load it back with no missing/unexpected keys, check the logits, generate."""
    save_student(student, processing, report, str(folder))
    loaded, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((folder / PLAN_FILE).read_text())["sizes"] == report["sizes"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, student(**inputs).logits)
    generated = loaded.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    return loaded


def text_inputs(tokenizer):
    return dict(tokenizer(["Question: How many circles are there?"], return_tensors="pt"))


def student_non_embedding_params(student):
    embeddings = ("embed_tokens", "lm_head")
    return sum(p.numel() for name, p in student.named_parameters() if not any(e in name for e in embeddings))


# --------------------------------------------------------------------------------------------- importance


def test_identity_layer_has_the_lowest_block_importance_and_is_dropped_first(tiny_parts):
    model, tokenizer = load_llm(tiny_parts)
    with torch.no_grad():  # the layer then adds nothing to the residual stream: output == input
        layer(model, 2).self_attn.o_proj.weight.zero_()
        layer(model, 2).mlp.down_proj.weight.zero_()
    scores, metrics = block_importance(stats_of(model, tokenizer))
    assert metrics["least_important_layer"] == 2 and int(scores.argmin()) == 2
    assert abs(float(scores[2])) < 1e-6 and (scores[[0, 1, 3]] > 1e-4).all()

    student, report = prune(model, tokenizer, num_layers=3)
    assert report["kept"]["layers"] == [0, 1, 3] and report["metrics"]["dropped_layers"] == [2]
    assert torch.equal(layer(student, 2).mlp.up_proj.weight, layer(model, 3).mlp.up_proj.weight)


def test_mlp_channel_with_forced_high_activation_ranks_top_and_a_dead_one_last(tiny_parts):
    model, tokenizer = load_llm(tiny_parts)
    with torch.no_grad():
        layer(model, 1).mlp.up_proj.weight[5] *= 50
        layer(model, 1).mlp.up_proj.weight[7] = 0
    scores, metrics = mlp_channel_importance(stats_of(model, tokenizer))
    assert int(scores[1].argmax()) == 5 and int(scores[1].argmin()) == 7 and float(scores[1, 7]) == 0
    assert metrics["mlp_dead_channels"] == 1

    student, report = prune(model, tokenizer, intermediate_size=1)
    assert report["kept"]["mlp_channels"] == [1, 1, 1, 1]
    assert torch.equal(layer(student, 1).mlp.down_proj.weight, layer(model, 1).mlp.down_proj.weight[:, 5:6])
    assert torch.equal(layer(student, 1).mlp.gate_proj.weight, layer(model, 1).mlp.gate_proj.weight[5:6])


def test_zeroed_kv_group_ranks_last_and_goes_with_its_query_heads(tiny_parts):
    model, tokenizer = load_llm(tiny_parts)
    with torch.no_grad():  # KV group 0 of layer 0 outputs nothing, so its query heads 0 and 1 are silent
        layer(model, 0).self_attn.v_proj.weight[:HEAD_DIM] = 0
    stats = stats_of(model, tokenizer)
    heads, _ = head_importance(stats)
    groups, _ = kv_group_importance(heads, 2)
    assert heads[0, :2].abs().max() == 0 and (heads[0, 2:] > 0).all() and int(groups[0].argmin()) == 0
    torch.testing.assert_close(groups, heads[:, 0::2] + heads[:, 1::2])

    student, report = prune(model, tokenizer, num_key_value_heads=1)
    assert report["sizes"]["num_attention_heads"] == 2  # two query heads per KV group, as in the teacher
    assert report["kept"]["kv_groups"][0] == [1] and report["kept"]["heads"][0] == [2, 3]
    attention, teacher = layer(student, 0).self_attn, layer(model, 0).self_attn
    assert torch.equal(attention.k_proj.weight, teacher.k_proj.weight[HEAD_DIM:])
    assert torch.equal(attention.q_proj.weight, teacher.q_proj.weight[2 * HEAD_DIM :])
    assert torch.equal(attention.o_proj.weight, teacher.o_proj.weight[:, 2 * HEAD_DIM :])


def test_hidden_channels_silenced_by_every_norm_rank_last(tiny_parts):
    model, tokenizer = load_llm(tiny_parts)
    silenced = [3, 10, 17, 30]
    keep = [c for c in range(32) if c not in silenced]
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight[silenced] = 0
    scores, _ = hidden_channel_importance(stats_of(model, tokenizer))
    assert (scores[silenced] == 0).all() and (scores[keep] > 0).all()

    # 28: the hidden size stays a multiple of the 4 query heads (transformers' LlamaConfig requires it).
    student, report = prune(model, tokenizer, hidden_size=28)
    assert report["kept"]["hidden_channels"] == 28
    assert torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight[:, keep])
    assert torch.equal(layer(student, 0).mlp.down_proj.weight, layer(model, 0).mlp.down_proj.weight[keep])


# ---------------------------------------------------------------------------------------- shapes and loading


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_full_size_keeps_the_logits_identical(tiny_parts, llm):
    model, tokenizer = load_llm(tiny_parts, llm)
    student, report = prune(model, tokenizer, target_params=1.0)
    assert report["sizes"] == report["teacher_sizes"]
    inputs = text_inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(student(**inputs).logits, model(**inputs).logits)


AXES = {
    "depth": dict(num_layers=2),
    "mlp": dict(intermediate_size=40),
    "kv_groups": dict(num_key_value_heads=1),
    "heads_in_group": dict(num_attention_heads=2),
    "hidden": dict(hidden_size=24),
    "target": dict(target_params=0.375),
}


@pytest.mark.parametrize("axis", sorted(AXES))
@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_each_axis_gives_a_consistent_checkpoint_that_loads_and_runs(tiny_parts, tmp_path, llm, axis):
    model, tokenizer = load_llm(tiny_parts, llm)
    student, report = prune(model, tokenizer, **AXES[axis])
    sizes, config = report["sizes"], student.config
    for name, value in AXES[axis].items():
        if name != "target_params":
            assert sizes[name] == value
    assert (config.num_hidden_layers, config.intermediate_size, config.hidden_size) == (
        sizes["num_layers"], sizes["intermediate_size"], sizes["hidden_size"]
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        sizes["num_attention_heads"], sizes["num_key_value_heads"], HEAD_DIM
    )
    assert len(student.model.layers) == sizes["num_layers"]
    if llm == "qwen2":
        assert len(config.layer_types) == sizes["num_layers"]
    attention, mlp = layer(student, 0).self_attn, layer(student, 0).mlp
    hidden, intermediate = sizes["hidden_size"], sizes["intermediate_size"]
    q_rows, kv_rows = sizes["num_attention_heads"] * HEAD_DIM, sizes["num_key_value_heads"] * HEAD_DIM
    assert attention.q_proj.weight.shape == (q_rows, hidden) and attention.k_proj.weight.shape == (kv_rows, hidden)
    assert attention.o_proj.weight.shape == (hidden, q_rows) and mlp.down_proj.weight.shape == (hidden, intermediate)
    if llm == "qwen2":
        assert attention.q_proj.bias.shape == (q_rows,) and attention.v_proj.bias.shape == (kv_rows,)
        assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert student_non_embedding_params(student) == report["params_after"]["llm_non_embedding"]
    assert student.num_parameters() == report["params_after"]["model"] == report["params_after"]["llm"]
    reload_and_run(student, tokenizer, report, tmp_path / "student", **text_inputs(tokenizer))


def test_target_params_search_keeps_the_candidate_with_the_lowest_calibration_loss(tiny_parts):
    model, tokenizer = load_llm(tiny_parts)
    student, report = prune(model, tokenizer, target_params=0.375)
    before = report["params_before"]["llm_non_embedding"]
    entries = llm_entries(model, layout_for(model.config), "model.", "lm_head.")
    # One candidate per depth that can reach the target (one layer at full width is 0.25 of the four).
    assert [c["num_layers"] for c in report["search"]] == [4, 3, 2]
    for candidate in report["search"]:
        sizes = PruneSizes(**{k: v for k, v in candidate.items() if k != "calibration_perplexity"})
        one_channel = sizes.num_layers * 3 * 32
        assert 0.375 * before - one_channel < count_params(entries, sizes, HEAD_DIM) <= 0.375 * before
        assert (sizes.num_attention_heads, sizes.num_key_value_heads) == (4, 2)  # attention kept whole
    best = min(report["search"], key=lambda c: c["calibration_perplexity"])
    assert report["sizes"] == {k: v for k, v in best.items() if k != "calibration_perplexity"}
    assert report["params_after"]["llm_non_embedding"] == student_non_embedding_params(student)
    teacher_count = count_params(entries, PruneSizes.of(model.config), HEAD_DIM)
    assert teacher_count == student_non_embedding_params(model) == before
    blocks = calibration_blocks(TEXTS, tokenizer, block_size=32)
    assert calibration_loss(student, blocks) == pytest.approx(math.log(best["calibration_perplexity"]))


def test_fixed_depth_share_and_a_target_only_fewer_kv_groups_reach(tiny_parts):
    model, tokenizer = load_llm(tiny_parts)
    _, report = prune(model, tokenizer, target_params=0.375, depth_share=0.5)
    assert report["search"] is None and report["sizes"]["num_layers"] == round(4 * 0.375**0.5)
    _, report = prune(model, tokenizer, target_params=0.375, depth_share=1.0)  # depth only
    assert report["sizes"] == {**report["teacher_sizes"], "num_layers": 2}
    # One layer with both KV groups (3072 attention weights) is over 0.05 of 37152: one group must go.
    _, report = prune(model, tokenizer, target_params=0.05, depth_share=1.0 - 1e-9)
    assert (report["sizes"]["num_layers"], report["sizes"]["num_key_value_heads"]) == (1, 1)
    assert report["params_after"]["llm_non_embedding"] <= 0.05 * report["params_before"]["llm_non_embedding"]


# ------------------------------------------------------------------------------------------------------ VLMs


def vlm_inputs(processor):
    return dict(processor(images=[[IMAGE]], text=["<image>What color is the square?"], return_tensors="pt"))


def test_prepend_vlm_prunes_its_llm_and_keeps_the_vision_side(tiny_parts, tmp_path):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion="prepend")
    target = PruneTarget(target_params=0.5, depth_share=0.5)
    student, report = prune_model(vlm, processor.tokenizer, TEXTS, target, block_size=32)
    sizes = report["sizes"]
    text_config = student.config.text_config
    assert (text_config.num_hidden_layers, text_config.intermediate_size, text_config.num_key_value_heads) == (
        sizes["num_layers"], sizes["intermediate_size"], sizes["num_key_value_heads"]
    )
    assert sizes["num_layers"] == 3 and sizes["intermediate_size"] < 64
    assert report["params_after"]["llm_non_embedding"] <= 0.5 * report["params_before"]["llm_non_embedding"]
    teacher_state = vlm.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(("model.vision_towers.", "model.projectors.")):
            assert torch.equal(value, teacher_state[key])
    loaded = reload_and_run(
        student, processor, report, tmp_path / "student", VLMForConditionalGeneration, **vlm_inputs(processor)
    )
    assert isinstance(VLMProcessor.from_pretrained(str(tmp_path / "student")), VLMProcessor)
    assert loaded.config.text_config.head_dim == HEAD_DIM

    heads, _ = prune_model(vlm, processor.tokenizer, TEXTS, PruneTarget(num_key_value_heads=1), block_size=32)
    assert heads.model.language_model.layers[0].self_attn.k_proj.weight.shape == (HEAD_DIM, 32)
    with torch.no_grad():
        assert heads(**vlm_inputs(processor)).logits.isfinite().all()
    with pytest.raises(ValueError, match="hidden_size"):
        prune_model(vlm, processor.tokenizer, TEXTS, PruneTarget(hidden_size=24), block_size=32)


def test_cross_attention_adapter_slots_follow_the_kept_layers():
    assert remap_cross_attention_adapters(4, [2, 3], every=2) == {1: 3}
    assert remap_cross_attention_adapters(4, [0, 1], every=2) == {1: 1}
    assert remap_cross_attention_adapters(8, [0, 1, 2, 3, 5, 6], every=4) == {3: 3}
    assert remap_cross_attention_adapters(8, list(range(8)), every=4) == {3: 3, 7: 7}


def test_cross_attention_vlm_depth_pruning_moves_the_adapters(tiny_parts, tmp_path):
    vlm, processor = build_vlm(
        tiny_parts["siglip"], tiny_parts["llama"], fusion="cross_attention", cross_attention_every=2
    )
    assert sorted(vlm.model.cross_attention.keys()) == ["1", "3"]
    with torch.no_grad():  # distinct open gates, to tell the adapters apart and make the images matter
        for key, adapter in vlm.model.cross_attention.items():
            nn.init.constant_(adapter.attn_gate, 0.1 * int(key))
            nn.init.constant_(adapter.mlp_gate, 0.1 * int(key))
        for dropped in vlm.model.language_model.layers[:2]:  # identity layers: depth pruning drops them
            dropped.mlp.down_proj.weight.zero_()
            dropped.self_attn.o_proj.weight.zero_()
    student, report = prune_model(vlm, processor.tokenizer, TEXTS, PruneTarget(num_layers=2), block_size=32)
    assert report["kept"]["layers"] == [2, 3] and report["cross_attention_adapters"] == {"1": 3}
    assert sorted(student.model.cross_attention.keys()) == ["1"]
    assert student.config.cross_attention_layers() == [1]
    assert student.model.cross_attention["1"].attn_gate.item() == pytest.approx(0.3)
    teacher_adapter = vlm.model.cross_attention["3"].state_dict()
    for key, value in student.model.cross_attention["1"].state_dict().items():
        assert torch.equal(value, teacher_adapter[key])
    reload_and_run(
        student, processor, report, tmp_path / "student", VLMForConditionalGeneration, **vlm_inputs(processor)
    )

    with pytest.raises(ValueError, match="intermediate_size"):
        prune_model(vlm, processor.tokenizer, TEXTS, PruneTarget(intermediate_size=32), block_size=32)
    with pytest.raises(ValueError, match="no decoder layers"):
        prune_model(vlm, processor.tokenizer, TEXTS, PruneTarget(target_params=0.1), block_size=32)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("target", "parameter"),
    [
        (dict(target_params=0.0), "target_params"),
        (dict(target_params=1.5), "target_params"),
        (dict(target_params=0.001), "target_params"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(num_layers=5), "num_layers"),
        (dict(num_attention_heads=3), "num_attention_heads"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(target_params=0.5, num_layers=2), "target_params"),
        (dict(), "target_params"),
    ],
)
def test_bad_targets_are_clear_errors(tiny_parts, target, parameter):
    model, tokenizer = load_llm(tiny_parts)
    with pytest.raises(ValueError, match=parameter):
        prune(model, tokenizer, **target)


def test_bad_arguments_and_unknown_architectures_are_clear_errors(tmp_path, tiny_tokenizer):
    common = dict(teacher="t", output="o", calibration_file="c")
    for fields, parameter in [
        (dict(target_params=0.0), "target_params"),
        (dict(target_params=2.0), "target_params"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(), "target_params"),
    ]:
        with pytest.raises(ValueError, match=parameter):
            PruneArguments(**common, **fields)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tiny_tokenizer)))
    with pytest.raises(ValueError, match="unknown architecture"):
        prune(gpt2, tiny_tokenizer, num_layers=1)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_a_loadable_student_with_its_tokenizer_and_plan(tiny_parts, tmp_path):
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    plain = tmp_path / "calibration.txt"
    plain.write_text("\n".join(TEXTS) + "\n\n")
    assert read_calibration_texts(str(calibration)) == read_calibration_texts(str(plain)) == TEXTS

    output = tmp_path / "student"
    argv = ["--teacher", tiny_parts["llama"], "--calibration_file", str(calibration), "--target_params", "0.375",
            "--output", str(output), "--block_size", "32"]
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    main(args)
    plan = json.loads((output / PLAN_FILE).read_text())
    assert plan["teacher"] == tiny_parts["llama"] and len(plan["importance"]["depth"]) == 4
    kept_layers = plan["kept"]["layers"]
    assert kept_layers == sorted(kept_layers) and len(kept_layers) == plan["sizes"]["num_layers"]
    student, info = AutoModelForCausalLM.from_pretrained(str(output), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.num_parameters() == plan["params_after"]["model"]
    teacher_vocab = AutoTokenizer.from_pretrained(tiny_parts["llama"]).get_vocab()
    assert AutoTokenizer.from_pretrained(str(output)).get_vocab() == teacher_vocab
