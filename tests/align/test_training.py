"""The post-training library: what LoRA and QLoRA touch, what trains, assistant-only labels, skipped rows, loading
a run's output, and the DPO reference log-probs precomputed for vision data."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from trl import DPOConfig, SFTConfig, SFTTrainer

from align.data import REJECTS_FILE, log_rejects, rejects_summary, world_preference_rows, world_sft_rows
from align.dpo import REF_COLUMNS, DPOScriptArguments, SharedPrefixModel, dpo_trainer, preference_dataset
from align.sft import SFTScriptArguments, checked, sft_dataset
from align.training import (
    VLMModelConfig,
    check_launch,
    linear_counts,
    load_model,
    load_trained,
    load_vlm,
    prepare_for_training,
    resolve_checkpoint,
)
from tests.align.training_helpers import (
    preference_rows_with_bad_ones,
    sft_rows_with_bad_ones,
    tiny_vlm,
    tiny_world,
)
from tests.conftest import save_tiny_llama

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def vlms(tiny_parts, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    # bitsandbytes' CPU 4-bit kernel needs in_features >= 64, so the QLoRA model's LLM is 64 wide.
    llama64 = save_tiny_llama(root / "llama64", tiny_tokenizer, hidden_size=64)
    return {
        "prepend": tiny_vlm(root / "prepend", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention": tiny_vlm(root / "cross", tiny_parts["siglip"], tiny_parts["llama"], "cross_attention"),
        "cross_attention64": tiny_vlm(root / "cross64", tiny_parts["siglip"], llama64, "cross_attention"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("world"), images=8)


@pytest.fixture(scope="module")
def world_train(world):
    return datasets.load_from_disk(world)["train"]


def _training_args(tmp_path, config=SFTConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=5e-3, lr_scheduler_type="constant",
        report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, max_length=None, seed=0,
    )
    return config(**{**settings, **overrides})


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model):
    after = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, after[name].detach())}


# ---------------------------------------------------------------------------------------------------------------
# What LoRA and QLoRA touch
# ---------------------------------------------------------------------------------------------------------------


def test_lora_targets_only_the_llm_projections(vlms):
    args = VLMModelConfig(model_name_or_path=vlms["cross_attention"], use_peft=True, lora_r=4)
    model, _ = load_vlm(args.model_name_or_path, args)
    peft_config = prepare_for_training(model, args)
    layers = model.config.text_config.num_hidden_layers
    peft = get_peft_model(model, peft_config)

    adapted = {name.split(".lora_A.")[0] for name, _ in peft.named_parameters() if ".lora_A." in name}
    # The SigLIP tower and the cross-attention adapters have q_proj/v_proj/out_proj too: none of them is adapted.
    assert len(adapted) == layers * len(PROJECTIONS)
    assert all(".language_model.layers." in name and name.split(".")[-1] in PROJECTIONS for name in adapted)
    assert args.lora_modules_to_save == ["projectors", "cross_attention"]  # the stage's parts, recorded in the config

    trainable = {name for name, p in peft.named_parameters() if p.requires_grad}
    assert any(".projectors.modules_to_save." in name for name in trainable)
    assert any(".cross_attention.modules_to_save." in name for name in trainable)
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert not any("vision_towers" in name for name in trainable)


def test_stage_decides_what_else_trains_under_lora(vlms):
    for stage, expected in (("align", ["projectors"]), ("prealign", ["vision_towers", "projectors"])):
        args = VLMModelConfig(model_name_or_path=vlms["prepend"], use_peft=True, stage=stage)
        model, _ = load_vlm(args.model_name_or_path, args)
        assert prepare_for_training(model, args).modules_to_save == expected


def test_model_config_validation():
    with pytest.raises(ValueError, match="use_peft"):
        VLMModelConfig(model_name_or_path="x", load_in_4bit=True)
    with pytest.raises(ValueError, match="unknown stage"):
        VLMModelConfig(model_name_or_path="x", stage="everything")


def test_qlora_quantizes_only_the_llm(vlms, caplog):
    import bitsandbytes as bnb

    args = VLMModelConfig(
        model_name_or_path=vlms["cross_attention64"], use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
    )
    with caplog.at_level(logging.INFO, logger="align.training"):
        model, _ = load_vlm(args.model_name_or_path, args)
    llm_linears = model.config.text_config.num_hidden_layers * len(PROJECTIONS)
    counts = linear_counts(model)
    assert counts["language_model"] == {"4bit": llm_linears, "full_precision": 0}
    for component in ("vision_towers", "projectors", "cross_attention", "lm_head"):
        assert counts[component]["4bit"] == 0 and counts[component]["full_precision"] > 0, component
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    assert model.model.projectors[0].linear_1.weight.dtype == torch.float32
    full = sum(c["full_precision"] for c in counts.values())
    assert f"{llm_linears} linears of the LLM quantized to NF4 with double quantization; {full} kept in full" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------------


def test_sft_labels_cover_only_the_assistant_turns(vlms, world_train, tmp_path):
    args = VLMModelConfig(model_name_or_path=vlms["prepend"], use_peft=True)
    model, processor = load_vlm(args.model_name_or_path, args)
    rows = world_sft_rows(world_train).select(range(3))
    trainer = SFTTrainer(
        model=model, args=_training_args(tmp_path, assistant_only_loss=True), train_dataset=rows,
        processing_class=processor, peft_config=prepare_for_training(model, args),
    )
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    ids, labels = batch["input_ids"], batch["labels"]
    assert (labels[ids == processor.image_token_id] == -100).all()
    decode = processor.tokenizer.decode
    for row, messages in enumerate(rows["messages"]):
        trained = (labels[row] != -100).int()
        starts = (torch.diff(trained, prepend=torch.tensor([0])) == 1).nonzero().flatten().tolist()
        ends = (torch.diff(trained, append=torch.tensor([0])) == -1).nonzero().flatten().tolist()
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        assert len(starts) == len(answers)  # one labelled span per assistant turn, nothing else
        for start, end, answer in zip(starts, ends, answers):
            assert decode(ids[row, start : end + 1]).strip().startswith(answer)
        prompt_text = decode(ids[row][trained == 0])
        for message in messages:
            if message["role"] == "user":
                assert message["content"][-1]["text"] in prompt_text


def test_lora_sft_trains_adapters_and_projector_only_and_its_output_loads(vlms, world_train, tmp_path):
    args = VLMModelConfig(model_name_or_path=vlms["prepend"], use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    model, processor = load_vlm(args.model_name_or_path, args)
    rows = world_sft_rows(world_train).select(range(4))
    trainer = SFTTrainer(
        model=model, args=_training_args(tmp_path, max_steps=8, assistant_only_loss=True), train_dataset=rows,
        processing_class=processor, peft_config=prepare_for_training(model, args),
    )
    before = _snapshot(trainer.model)
    trainer.train()
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert _changed(before, trainer.model) == trainable
    assert any("lora_B" in name for name in trainable) and any(".projectors.modules_to_save." in name for name in trainable)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-2:]) < sum(losses[:2])  # the four conversations are being learned

    trainer.save_model(tmp_path / "out")
    batch = trainer.data_collator([rows[0]])
    batch.pop("labels")
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
        loaded = load_trained(tmp_path / "out")(**batch).logits
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)

    # A later stage (DPO after SFT) starts from the merged weights, kept in <out>/merged: its own adapter's base
    # must hold the SFT delta, not the SFT run's base.
    continued = load_model(str(tmp_path / "out"), VLMModelConfig(model_name_or_path=str(tmp_path / "out")))
    assert Path(continued.name_or_path) == tmp_path / "out" / "merged"
    with torch.no_grad():
        torch.testing.assert_close(continued.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-4)

    # Whether the stage merges (the first to start from this output) or finds the merged folder made, the global
    # RNG after loading is the same, so its own new adapter starts from the same weights after `set_seed`.
    draws = []
    for remove_merged in (True, False):
        if remove_merged:
            shutil.rmtree(tmp_path / "out" / "merged")
        torch.manual_seed(0)
        load_model(str(tmp_path / "out"), VLMModelConfig(model_name_or_path=str(tmp_path / "out")))
        draws.append(torch.rand(4))
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_full_finetune_trains_the_llm_and_projector_not_the_tower(vlms, world_train, tmp_path):
    args = VLMModelConfig(model_name_or_path=vlms["prepend"], stage="finetune")
    model, processor = load_vlm(args.model_name_or_path, args)
    assert prepare_for_training(model, args) is None
    trainer = SFTTrainer(
        model=model, args=_training_args(tmp_path, max_steps=2, learning_rate=1e-3, assistant_only_loss=True),
        train_dataset=world_sft_rows(world_train).select(range(4)), processing_class=processor,
    )
    before = _snapshot(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert any(name.startswith("model.language_model.layers.") for name in changed)
    assert any(name.startswith("model.projectors.") for name in changed)
    assert not any(name.startswith("model.vision_towers.") for name in changed)


# ---------------------------------------------------------------------------------------------------------------
# Data: the default mixture, skipped rows, empty data
# ---------------------------------------------------------------------------------------------------------------


def test_default_sft_data_mixes_world_conversations_and_refusals(world, tmp_path):
    args = SFTScriptArguments(world_path=world, refusal_weight=0.5, caption_weight=0.25)
    data = sft_dataset(args, str(tmp_path), seed=0)
    sources = data["source"]
    assert len(data) == 14 and sources.count("conversations") == 8  # 8 images: shares 8 : 4 : 2
    assert sources.count("refusals") == 4 and sources.count("captions") == 2
    assert (tmp_path / REJECTS_FILE).read_text() == ""


def test_spatial_reasoning_reaches_the_sft_conversations_and_the_preference_pairs(world, tmp_path):
    texts = lambda rows, key: [m["content"][0]["text"] for ms in rows[key] for m in ms if m["role"] == "assistant"]  # noqa: E731
    plain = sft_dataset(SFTScriptArguments(world_path=world, refusal_weight=0.0), str(tmp_path / "a"), seed=0)
    reasoned = sft_dataset(SFTScriptArguments(world_path=world, refusal_weight=0.0, spatial_reasoning=True),
                           str(tmp_path / "b"), seed=0)
    changed = [(a, b) for a, b in zip(texts(plain, "messages"), texts(reasoned, "messages")) if a != b]
    assert changed and all(b.endswith(f", so {a}.") for a, b in changed)
    pairs = preference_dataset(DPOScriptArguments(world_path=world, pairs_per_image=8, spatial_reasoning=True),
                               str(tmp_path / "c"), seed=0)
    assert any(", so " in text for text in texts(pairs, "chosen"))
    aimed = preference_dataset(DPOScriptArguments(world_path=world, pairs_per_image=8, spatial_reasoning=True,
                                                  conclusion_pairs=1.0, pair_categories=["spatial"]),
                               str(tmp_path / "d"), seed=0)
    assert set(aimed["category"]) == {"spatial"}
    flipped = [(c, r) for c, r in zip(texts(aimed, "chosen"), texts(aimed, "rejected")) if ", so " in c]
    assert flipped and all(c.rpartition(" ")[0] == r.rpartition(" ")[0] for c, r in flipped)
    with pytest.raises(ValueError, match="set spatial_reasoning true"):
        DPOScriptArguments(world_path=world, conclusion_pairs=0.5)
    with pytest.raises(ValueError, match="pair_categories must name some of"):
        DPOScriptArguments(world_path=world, pair_categories=["colour"])


def test_bad_rows_are_skipped_counted_and_written(tmp_path, caplog):
    path, expected = sft_rows_with_bad_ones(tmp_path / "sft")
    args = SFTScriptArguments(datasets=[{"path": path, "format": "trl"}])
    data = sft_dataset(args, str(tmp_path / "run"), seed=0)
    assert len(data) == 8
    assert rejects_summary(tmp_path / "run" / REJECTS_FILE) == expected
    with caplog.at_level(logging.INFO, logger="align.training"):
        log_rejects(tmp_path / "run" / REJECTS_FILE, len(data))
    assert "skipped 4 rows" in caplog.text and "1 corrupt image" in caplog.text and "trained on 8" in caplog.text

    path, expected = preference_rows_with_bad_ones(tmp_path / "pairs")
    pairs = preference_dataset(DPOScriptArguments(datasets=[{"path": path}]), str(tmp_path / "dpo"), seed=0)
    assert len(pairs) == 8
    assert rejects_summary(tmp_path / "dpo" / REJECTS_FILE) == expected


def test_empty_or_all_bad_data_is_a_clear_error(tmp_path):
    empty = datasets.Dataset.from_dict({"images": [], "messages": []})
    with pytest.raises(ValueError, match="empty"):
        checked(empty, "sft", "my data", str(tmp_path), True)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"images": ["missing.png"], "messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "hello"}]}\n')
    with pytest.raises(ValueError, match="no usable rows"):
        sft_dataset(SFTScriptArguments(datasets=[{"path": str(path)}]), str(tmp_path / "run"), seed=0)
    with pytest.raises(ValueError, match="no shapes world"):
        sft_dataset(SFTScriptArguments(world_path=str(tmp_path / "nowhere")), str(tmp_path / "run"), seed=0)


def test_processes_that_did_not_join_a_process_group_are_refused(tmp_path, monkeypatch):
    args = _training_args(tmp_path)
    check_launch(args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--use_cpu true"):
        check_launch(args)


def test_resolve_checkpoint(tmp_path):
    assert resolve_checkpoint(None, str(tmp_path)) is None  # nothing to continue: from the start
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint("last", str(tmp_path))
    for step in (2, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 10):  # checkpoint-12 was cut short by a kill: no trainer state
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert Path(resolve_checkpoint("last", str(tmp_path))).name == "checkpoint-10"
    assert not (tmp_path / "checkpoint-12").exists()
    # Unset: a rerun continues from the newest complete checkpoint; "false" trains from the start.
    assert Path(resolve_checkpoint(None, str(tmp_path))).name == "checkpoint-10"
    assert resolve_checkpoint("false", str(tmp_path)) is None
    assert resolve_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ValueError, match="was not written whole"):
        resolve_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# DPO: reference log-probs precomputed for vision data
# ---------------------------------------------------------------------------------------------------------------


def _dpo(vlm_path, pairs, tmp_path, precompute, steps=2, feature_cache_dir=None):
    args = VLMModelConfig(model_name_or_path=vlm_path, use_peft=True, lora_r=8, lora_dropout=0.0)
    model, processor = load_vlm(vlm_path, args)
    config = _training_args(
        tmp_path, config=DPOConfig, max_steps=steps, precompute_ref_log_probs=precompute, learning_rate=1e-2
    )
    return dpo_trainer(
        model, config, pairs, processor, peft_config=prepare_for_training(model, args), feature_cache_dir=feature_cache_dir
    )


def _sequence_logps(model, batch):
    """Summed log-probs of the completion tokens, computed from the full logits (not TRL's fused head)."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    logps = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def test_precomputed_reference_logps_equal_the_reference_forward(vlms, world_train, tmp_path):
    pairs = world_preference_rows(world_train, per_image=1).select(range(4))
    trainer = _dpo(vlms["prepend"], pairs, tmp_path / "pre", precompute=True)
    assert trainer.precompute_ref_logps and trainer.args.precompute_ref_log_probs
    # TRL's collator repeats each pair's image for chosen and rejected; the towers encode it once.
    assert trainer.images_encoded == len(pairs)
    data = trainer.train_dataset
    assert set(REF_COLUMNS) <= set(data.column_names)

    # By hand, one pair at a time (no padding), through the policy with its adapters disabled.
    collator = trainer.data_collator.collator
    for index in range(len(pairs)):
        batch = collator([dict(pairs[index])])
        with torch.no_grad(), trainer.model.disable_adapter():
            chosen, rejected = _sequence_logps(trainer.model, batch)
        assert data[index]["ref_chosen_logps"] == pytest.approx(chosen.item(), rel=1e-4, abs=1e-4)
        assert data[index]["ref_rejected_logps"] == pytest.approx(rejected.item(), rel=1e-4, abs=1e-4)

    # Training reads them: the same steps as with TRL's on-the-fly reference forward.
    trainer.train()
    on_the_fly = _dpo(vlms["prepend"], pairs, tmp_path / "live", precompute=False)
    assert not on_the_fly.precompute_ref_logps
    encoded = on_the_fly.images_encoded
    on_the_fly.train()
    batch = on_the_fly.args.per_device_train_batch_size
    assert on_the_fly.images_encoded - encoded == 2 * 2 * batch  # 2 steps, policy + reference, one per pair
    for key in ("loss", "rewards/chosen", "rewards/rejected"):
        precomputed = [log[key] for log in trainer.state.log_history if key in log]
        live = [log[key] for log in on_the_fly.state.log_history if key in log]
        assert len(precomputed) == 2 and precomputed == pytest.approx(live, abs=1e-4), key
    assert trainer.state.log_history[1]["rewards/margins"] != 0  # the second step really compared to the reference


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_one_forward_per_pair_gives_the_separate_forwards_log_probs(vlms, world_train, tmp_path, fusion):
    """Chosen and rejected packed behind their shared image and prompt (`SharedPrefixModel`) score every completion
    token as TRL's two separate rows do, within 1e-5 in float32, under LoRA with the adapters on and off, for both
    fusions; each pair's image goes through the tower once."""
    pairs = world_preference_rows(world_train, per_image=2).select(range(6))
    trainer = _dpo(vlms[fusion], pairs, tmp_path, precompute=False)
    model = trainer.model
    if fusion == "cross_attention":  # open the zero-initialised gates so that the images matter
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "gate" in name:
                    parameter.fill_(0.5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # non-zero LoRA B, so adapters on and off differ
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    batch = trainer.data_collator([dict(pairs[i]) for i in range(len(pairs))])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mask = batch["completion_mask"][:, 1:].bool()
    for adapters in (True, False):
        context = torch.no_grad() if adapters else model.disable_adapter()
        with torch.no_grad(), context:
            separate = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
            encoded = trainer.images_encoded
            shared = SharedPrefixModel(model, batch)(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
            assert trainer.images_encoded - encoded == len(set(pairs["image_id"]))  # each distinct image once
        assert shared.log_probs.shape == separate.log_probs.shape
        torch.testing.assert_close(shared.log_probs[mask], separate.log_probs[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(shared.entropy[mask], separate.entropy[mask], rtol=0, atol=1e-5)
        assert (shared.log_probs[~mask] == 0).all()
    other = batch["input_ids"].clone()
    other[len(pairs), 1] += 1  # the first rejected row no longer starts with its chosen row's prompt
    assert SharedPrefixModel(model, {**batch, "input_ids": other}).packed is None


def test_dpo_with_one_forward_per_pair_trains_as_trl(vlms, world_train, tmp_path, monkeypatch):
    """Two DPO steps, the reference precomputed, with one forward per pair and with TRL's two rows: the same losses
    and margins."""
    import align.dpo

    pairs = world_preference_rows(world_train, per_image=1).select(range(4))
    logs = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(align.dpo, "pack_pairs", lambda batch: None)
        trainer = _dpo(vlms["prepend"], pairs, tmp_path / str(shared), precompute=True)
        trainer.train()
        logs[shared] = [log[k] for log in trainer.state.log_history if "loss" in log for k in ("loss", "rewards/margins")]
    assert logs[True] == pytest.approx(logs[False], abs=1e-4)
    assert logs[True][3] != 0  # the second step's margin: the policy moved away from its reference


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_padding_free_sft_batch_gives_the_padded_loss(vlms, world_train, fusion):
    """A batch flattened into one row (positions restarting per sample, no padding) gives the padded batch's loss
    within 1e-5 in float32, for both fusions."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from align.sft import PaddingFreeVisionCollator

    model, processor = load_vlm(vlms[fusion], VLMModelConfig(model_name_or_path=vlms[fusion]))
    if fusion == "cross_attention":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "gate" in name:
                    parameter.fill_(0.5)
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    rows = [dict(r) for r in world_sft_rows(world_train).select(range(4))]
    padded = collator([dict(r) for r in rows])
    flat = PaddingFreeVisionCollator(
        collator, image_token_id=model.config.image_token_id, cross_attention=fusion == "cross_attention"
    )([dict(r) for r in rows])
    assert flat["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert "attention_mask" not in flat and flat["position_ids"][0, 0] == 0
    with torch.no_grad():
        expected = model(**padded, use_cache=False).loss
        got = model(**flat, use_cache=False).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Without the restarts (one long sequence) the samples would see each other: a different loss.
    with torch.no_grad():
        leaky = model(**{**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}, use_cache=False).loss
    assert abs(leaky - expected) > 1e-4


def test_dpo_on_cached_features_runs_no_tower_and_trains_as_on_pixels(vlms, world_train, tmp_path):
    pairs = world_preference_rows(world_train, per_image=2).select(range(8))
    logs = {}
    for cached in (True, False):
        trainer = _dpo(vlms["prepend"], pairs, tmp_path / str(cached), precompute=True,
                       feature_cache_dir=str(tmp_path / "features") if cached else None)
        tower = trainer.accelerator.unwrap_model(trainer.model).get_base_model().model.vision_towers[0]
        calls = []
        hook = tower.register_forward_hook(lambda module, args, output, calls=calls: calls.append(args[0].shape[0]))
        try:
            trainer.train()
        finally:
            hook.remove()
        assert (calls == []) == cached  # on cached features no tower runs in training
        logs[cached] = [log[k] for log in trainer.state.log_history if "loss" in log for k in ("loss", "rewards/margins")]
    assert logs[True] == pytest.approx(logs[False], abs=1e-5)
    assert len(list((tmp_path / "features").rglob("shard-*.npy"))) == 1


def test_one_dataset_on_the_command_line(tmp_path):
    """--dataset_path (or TRL's --dataset_name) is a one-entry mixture; a name that is not a local path is refused."""
    from trl import TrlParser

    from align.data import MixtureSource
    from align.data.mixture import WorldDataArguments
    from align.sft import SFTScriptArguments

    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    (config,) = TrlParser((SFTScriptArguments,)).parse_args_and_config(
        ["--dataset_path", str(data), "--dataset_format", "trl", "--image_root", str(tmp_path)]
    )
    assert config.datasets == [MixtureSource(path=str(data), format="trl", split="train", image_root=str(tmp_path))]
    assert WorldDataArguments(dataset_name=str(data)).datasets[0].path == str(data)
    with pytest.raises(ValueError, match="either `datasets`"):
        WorldDataArguments(dataset_path=str(data), datasets=[{"path": str(data)}])
    with pytest.raises(ValueError, match=r"'HuggingFaceM4/ChartQA' is not a local file or folder \(it looks like a Hub"):
        WorldDataArguments(dataset_name="HuggingFaceM4/ChartQA")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        WorldDataArguments(dataset_path=str(data), dataset_format="csv")


def test_the_sampling_stages_and_evaluation_take_dataset_name_as_a_local_path(tmp_path):
    from align.grpo import GRPOScriptArguments
    from tests.align.training_helpers import load_recipe

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("{}\n")
    assert GRPOScriptArguments(dataset_name=str(prompts)).dataset_path == str(prompts)
    evaluate = load_recipe("evaluate").EvaluateArguments
    assert evaluate(output_dir=str(tmp_path), dataset_name=str(prompts)).dataset_path == str(prompts)
    with pytest.raises(ValueError, match="looks like a Hub dataset name"):
        evaluate(output_dir=str(tmp_path), dataset_name="lmms-lab/ChartQA")
