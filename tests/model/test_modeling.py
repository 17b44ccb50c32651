"""VLMConfig / VLMForConditionalGeneration: assembly from parts, prepend fusion, several towers, save/load, generate."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    LlamaConfig,
    SiglipVisionConfig,
)

from model import (
    VLMConfig,
    VLMForConditionalGeneration,
    pack_image_features,
    pack_pixel_values,
    unpack_image_features,
    unpack_pixel_values,
)

IMAGE_SIZES = {"siglip": 32, "clip": 48}


def build(parts, tokenizer, fusion="prepend", towers=("siglip",), llm="llama", **settings):
    torch.manual_seed(0)
    config = VLMConfig(fusion=fusion, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **settings)
    vision = [AutoModel.from_pretrained(parts[name]) for name in towers]
    return VLMForConditionalGeneration.from_parts(config, vision, AutoModelForCausalLM.from_pretrained(parts[llm])).eval()


def open_gates(model, value=1.0):
    """Make the cross-attention adapters matter (they start closed)."""
    with torch.no_grad():
        for adapter in model.model.cross_attention.values():
            adapter.attn_gate.fill_(value)
            adapter.mlp_gate.fill_(value)


def encode(tokenizer, model, text):
    """Token ids of `text`, each `<image>` expanded to the model's placeholders per image (the processor's job)."""
    image_id = model.config.image_token_id
    ids = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids.extend([token] * (model.config.num_image_tokens if token == image_id else 1))
    return ids


def left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def images(n, towers=("siglip",), seed=1):
    generator = torch.Generator().manual_seed(seed)
    per_tower = [torch.randn(n, 3, IMAGE_SIZES[t], IMAGE_SIZES[t], generator=generator) for t in towers]
    return pack_pixel_values(per_tower)


# --------------------------------------------------------------------------------------------------- config


def test_config_serialises_towers_and_derives_token_counts(tmp_path, tiny_parts, tiny_tokenizer):
    siglip = AutoConfig.from_pretrained(tiny_parts["siglip"])
    clip = AutoConfig.from_pretrained(tiny_parts["clip"])
    llama = AutoConfig.from_pretrained(tiny_parts["llama"])
    config = VLMConfig(vision_configs=[siglip, clip], text_config=llama, image_token_id=7)
    assert config.vision_config is config.vision_configs[0]
    assert config.get_text_config() is config.text_config
    assert [config.vision_tokens_per_image(i) for i in range(2)] == [16, 9]  # CLIP's CLS is not counted
    assert config.num_vision_tokens == config.num_image_tokens == 25
    assert VLMConfig(vision_configs=[siglip], text_config=llama, fusion="cross_attention").num_image_tokens == 1
    assert VLMConfig(vision_configs=[siglip], text_config=llama, pool=2).num_vision_tokens == 4
    eager = VLMConfig(vision_configs=[siglip, clip], text_config=llama, attn_implementation="eager")
    assert {c._attn_implementation for c in (*eager.vision_configs, eager.text_config)} == {"eager"}

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert [c["model_type"] for c in saved["vision_configs"]] == ["siglip_vision_model", "clip_vision_model"]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VLMConfig)
    assert [type(c).__name__ for c in loaded.vision_configs] == ["SiglipVisionConfig", "CLIPVisionConfig"]
    assert loaded.vision_configs[1].image_size == 48 and loaded.text_config.num_hidden_layers == 4
    assert loaded.num_vision_tokens == 25 and loaded.image_token_id == 7


def test_config_rejects_unknown_names_listing_the_supported_ones(tiny_parts):
    llama = AutoConfig.from_pretrained(tiny_parts["llama"])
    with pytest.raises(ValueError, match=r"unknown fusion 'late'.*cross_attention.*prepend"):
        VLMConfig(text_config=llama, fusion="late")
    with pytest.raises(ValueError, match=r"unknown projector 'qformer'.*attention.*mlp"):
        VLMConfig(text_config=llama, projector="qformer")
    with pytest.raises(ValueError, match="pool=2 does not divide the 3x3 patch grid of vision tower 1"):
        VLMConfig(vision_configs=[AutoConfig.from_pretrained(p) for p in (tiny_parts["siglip"], tiny_parts["clip"])],
                  text_config=llama, pool=2)


# --------------------------------------------------------------------------------------------------- prepend


def test_prepend_equals_llava_computed_by_hand(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer)
    ids = torch.tensor([encode(tiny_tokenizer, model, "Question: <image> What color is the square? Answer:")])
    pixel_values = images(1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values)
        patches = model.model.vision_towers[0](pixel_values).last_hidden_state
        visual = model.model.projectors[0](patches)
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = visual.reshape(-1, visual.shape[-1])
        reference = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    assert out.image_hidden_states.shape == (1, 16, 32)
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)


def test_labels_give_the_shifted_cross_entropy(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer)
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> a red circle.")])
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    out = model(input_ids=ids, pixel_values=images(1), labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_trl_fused_lm_head_reads_the_backbone(tiny_parts, tiny_tokenizer):
    """TRL's fused head calls `model.model(...)` for `last_hidden_state` and `get_output_embeddings()`."""
    from trl.trainer.utils import add_fused_lm_head

    model = build(tiny_parts, tiny_tokenizer)
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> Question: How many circles are there? Answer: two")])
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    pixel_values = images(1)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values, labels=labels).loss
        add_fused_lm_head(model)
        fused = model(input_ids=ids, pixel_values=pixel_values, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(fused.loss, expected, atol=1e-5, rtol=0)


def test_placeholder_mismatches_name_the_sample(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer)
    good = encode(tiny_tokenizer, model, "a <image> b")
    truncated = good[:-3]  # cuts into the 16 placeholders
    ids, mask = left_pad([good, truncated], tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="sample 1"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(2))
    ids, mask = left_pad([good, good], tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"placeholders for 2 images \(per sample: \[1, 1\]\) but 3 images"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(3))


@pytest.mark.parametrize(
    "fusion, towers, pool",
    [("prepend", ("siglip", "clip"), 1), ("cross_attention", ("siglip", "clip"), 1), ("prepend", ("siglip",), 2)],
)
def test_loss_from_cached_features_equals_loss_from_pixels(tiny_parts, tiny_tokenizer, fusion, towers, pool):
    model = build(tiny_parts, tiny_tokenizer, fusion=fusion, towers=towers, pool=pool, cross_attention_every=2)
    if fusion == "cross_attention":
        open_gates(model)
    rows = [encode(tiny_tokenizer, model, t) for t in ("<image> a red circle.", "two <image> and <image> blue")]
    ids, mask = left_pad(rows, tiny_tokenizer.pad_token_id)
    pixel_values = images(3, towers)
    with torch.no_grad():
        from_pixels = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, labels=ids)
        features = pack_image_features(model.model.get_vision_features(pixel_values))
        from_features = model(input_ids=ids, attention_mask=mask, image_features=features, labels=ids)
    torch.testing.assert_close(from_features.loss, from_pixels.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_features.logits, from_pixels.logits, atol=1e-5, rtol=0)


def test_pooling_averages_2x2_patch_blocks(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, pool=2)
    features = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 32)  # 4x4 grid, value = patch index
    projected = model.model.project_vision_features([features])
    # top-left 2x2 block of a 4x4 grid holds patches 0, 1, 4, 5
    block_means = torch.tensor([2.5, 4.5, 10.5, 12.5]).view(1, 4, 1).expand(1, 4, 32)
    torch.testing.assert_close(projected, model.model.projectors[0](block_means))


# --------------------------------------------------------------------------------------------------- several towers


def test_pack_and_unpack_are_inverse(tiny_parts):
    config = VLMConfig(
        vision_configs=[AutoConfig.from_pretrained(tiny_parts[t]) for t in ("siglip", "clip")],
        text_config=AutoConfig.from_pretrained(tiny_parts["llama"]),
    )
    siglip, clip = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)
    packed = pack_pixel_values([siglip, clip])
    assert packed.shape == (2, 3 * 32 * 32 + 3 * 48 * 48)
    unpacked = unpack_pixel_values(config, packed)
    assert torch.equal(unpacked[0], siglip) and torch.equal(unpacked[1], clip)
    features = [torch.randn(2, 16, 32), torch.randn(2, 9, 24)]
    packed_features = pack_image_features(features)
    assert packed_features.shape == (2, 16 * 32 + 9 * 24)
    assert all(torch.equal(a, b) for a, b in zip(unpack_image_features(config, packed_features), features))
    with pytest.raises(ValueError, match="packed pixel_values must be"):
        unpack_pixel_values(config, packed[:, :-1])
    with pytest.raises(ValueError, match="2 vision towers"):
        unpack_pixel_values(config, siglip)


def test_two_towers_concatenate_their_tokens_and_all_train(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, towers=("siglip", "clip")).train()
    assert model.config.num_image_tokens == 25
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> a red circle.")])
    pixel_values = images(1, ("siglip", "clip"))
    out = model(input_ids=ids, pixel_values=pixel_values, labels=ids)
    assert out.image_hidden_states.shape == (1, 25, 32)
    # CLIP's tokens follow SigLIP's, CLS dropped
    clip_pixels = unpack_pixel_values(model.config, pixel_values)[1]
    clip_patches = model.model.vision_towers[1](clip_pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(out.image_hidden_states[:, 16:], model.model.projectors[1](clip_patches))
    out.loss.backward()
    for part in (*model.model.vision_towers, *model.model.projectors):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_attention_projector_runs_blocks_at_the_vision_width(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, towers=("siglip", "clip"), projector="attention", projector_depth=3)
    clip_projector = model.model.projectors[1]
    assert len(clip_projector.blocks) == 3 and clip_projector.blocks[0].qkv.in_features == 24
    assert clip_projector.proj.out_features == 32
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> a red circle.")])
    out = model(input_ids=ids, pixel_values=images(1, ("siglip", "clip")), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert clip_projector.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_resampler_gives_its_queries_as_tokens_and_attends_to_each_patch(tmp_path, tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, towers=("siglip", "clip"), projector="resampler", projector_queries=3,
                  projector_depth=2, pool=1, cross_attention_every=2)
    assert model.config.num_image_tokens == 3 + 3  # the queries of each tower, whatever its patch grid
    siglip_projector = model.model.projectors[0]
    assert siglip_projector.position.shape == (1, 16, 32) and len(siglip_projector.blocks) == 2
    assert siglip_projector.queries.abs().max() > 0  # initialised, not left empty
    # each query reads every patch: changing one patch moves all three tokens of that tower and none of the other's
    features = [torch.randn(1, 16, 32), torch.randn(1, 9, 24)]
    edited = [features[0].clone(), features[1]]
    edited[0][0, 5] += 1.0
    with torch.no_grad():
        before, after = model.model.project_vision_features(features), model.model.project_vision_features(edited)
    assert before.shape == (1, 6, 32)
    assert ((after - before)[0, :3].abs().amax(-1) > 0).all() and torch.equal(after[0, 3:], before[0, 3:])
    with pytest.raises(ValueError, match="built for 16 patches per image, got 4"):
        siglip_projector(torch.randn(1, 4, 32))

    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> a red circle.")])
    model.train()
    out = model(input_ids=ids, pixel_values=images(1, ("siglip", "clip")), labels=ids)
    out.loss.backward()
    assert siglip_projector.queries.grad.abs().sum() > 0 and siglip_projector.position.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_queries == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.project_vision_features(features), before, atol=0, rtol=0)


@pytest.mark.parametrize("settings, message", [
    (dict(projector="resampler", projector_queries=0), "projector_queries must be >= 1"),
    (dict(projector="resampler", projector_depth=0), "projector_depth must be >= 1 for the resampler"),
])
def test_resampler_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        VLMConfig(**settings)


# --------------------------------------------------------------------------------------------------- build, save, load


def test_from_parts_reuses_the_pretrained_weights(tiny_parts, tiny_tokenizer):
    siglip = AutoModel.from_pretrained(tiny_parts["siglip"])
    llm = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"])
    config = VLMConfig(image_token_id=tiny_tokenizer.convert_tokens_to_ids("<image>"))
    model = VLMForConditionalGeneration.from_parts(config, [siglip], llm)
    assert model.model.vision_towers[0] is siglip and model.model.language_model is llm.model
    assert model.lm_head is llm.lm_head
    assert not hasattr(siglip, "head")  # the unused pooling head is dropped
    ids = torch.tensor([[1, 30, 31, 32]])
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_builds_from_config_through_the_auto_classes():
    config = VLMConfig(
        vision_configs=[SiglipVisionConfig(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2)],
        text_config=LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_id=5,
        fusion="cross_attention",
        cross_attention_every=1,
    )
    model = AutoModelForImageTextToText.from_config(config)
    assert type(model) is VLMForConditionalGeneration
    assert sorted(model.model.cross_attention.keys()) == ["0", "1"]
    assert not hasattr(model.model.vision_towers[0], "head") and not config.vision_config.vision_use_head
    assert all(a.attn_gate.item() == 0 and a.mlp_gate.item() == 0 for a in model.model.cross_attention.values())
    out = model(input_ids=torch.tensor([[1, 5, 2, 3]]), pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 4, 64)


def test_vision_feature_layer_picks_a_hidden_state(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, towers=("siglip", "clip"), vision_feature_layer=-2)
    pixel_values = images(2, ("siglip", "clip"))
    features = model.model.get_vision_features(pixel_values)
    for tower, tower_pixels, got in zip(model.model.vision_towers, unpack_pixel_values(model.config, pixel_values), features):
        hidden = tower(tower_pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(got, hidden[:, -got.shape[1]:])  # CLIP's CLS dropped
    assert [f.shape[1] for f in features] == [16, 9]


def test_sdpa_is_the_default_attention(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, towers=("siglip", "clip"))
    assert model.config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert all(t.config._attn_implementation == "sdpa" for t in model.model.vision_towers)


@pytest.mark.parametrize("fusion, llm", [("prepend", "qwen2"), ("cross_attention", "llama"), ("cross_attention", "qwen2")])
def test_save_and_load_give_identical_logits(tmp_path, tiny_parts, tiny_tokenizer, fusion, llm):
    model = build(tiny_parts, tiny_tokenizer, fusion=fusion, llm=llm, cross_attention_every=2)
    if fusion == "cross_attention":
        open_gates(model, 0.5)
    rows = [encode(tiny_tokenizer, model, t) for t in ("<image> a red circle.", "Question: <image> two")]
    ids, mask = left_pad(rows, tiny_tokenizer.pad_token_id)
    pixel_values = images(2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "vlm_align" and "auto_map" not in saved

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is VLMForConditionalGeneration
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits
        got = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if llm == "qwen2":  # Qwen2 ties its head to the input embeddings: stored once, tied again on load
        with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_gradient_checkpointing_gives_the_same_gradients(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, fusion="cross_attention", cross_attention_every=2).train()
    open_gates(model, 0.5)
    ids = torch.tensor([encode(tiny_tokenizer, model, "a <image> red circle.")])

    def gradients():
        model.zero_grad()
        model(input_ids=ids, pixel_values=images(1), labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.model.language_model.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any("cross_attention" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_4bit_load_quantises_only_the_llm(tmp_path, tiny_parts, tiny_tokenizer):
    from bitsandbytes.nn import Linear4bit

    build(tiny_parts, tiny_tokenizer, fusion="cross_attention", cross_attention_every=2).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, quantization_config=quantization)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = name.split(".")[1] if name.startswith("model.") else name
            kinds.setdefault(part, set()).add(isinstance(module, Linear4bit))
    assert kinds == {"language_model": {True}, "vision_towers": {False}, "projectors": {False},
                     "cross_attention": {False}, "lm_head": {False}}
    open_gates(model, 0.5)
    ids = torch.tensor([encode(tiny_tokenizer, model, "a <image> red circle.")])
    out = model(input_ids=ids, pixel_values=images(1), labels=ids)
    out.loss.backward()  # adapters train on top of the 4-bit LLM (QLoRA-style)
    assert torch.isfinite(out.loss) and model.model.cross_attention["1"].attn_gate.grad is not None


# --------------------------------------------------------------------------------------------------- generation


def _greedy_without_cache(model, ids, mask, pixel_values, steps):
    """Reference decoding: re-run the whole sequence with the images at every step."""
    logits = []
    for _ in range(steps):
        step = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=False).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, logits


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_generate_encodes_images_once_and_matches_full_recompute(tiny_parts, tiny_tokenizer, fusion):
    model = build(tiny_parts, tiny_tokenizer, fusion=fusion, cross_attention_every=2)
    if fusion == "cross_attention":
        open_gates(model)
    calls = []
    model.model.vision_towers[0].register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> Question: What color is the square? Answer:")])
    mask = torch.ones_like(ids)
    pixel_values = images(1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=5,
                             min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert len(calls) == 1
        expected_ids, expected_logits = _greedy_without_cache(model, ids, mask, pixel_values, 5)
    assert torch.equal(out.sequences, expected_ids)
    for got, expected in zip(out.logits, expected_logits):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():  # without a cache the images are passed (and encoded) at every step
        uncached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=5,
                                  min_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(uncached, expected_ids)


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_batched_generation_equals_one_by_one(tiny_parts, tiny_tokenizer, fusion):
    model = build(tiny_parts, tiny_tokenizer, fusion=fusion, cross_attention_every=2)
    if fusion == "cross_attention":
        open_gates(model)
    prompts = ["<image> Question: What color is the square? Answer:", "Is there <image> a purple <image> triangle?"]
    rows = [encode(tiny_tokenizer, model, p) for p in prompts]
    pixel_values = images(3)
    per_prompt_images = [pixel_values[:1], pixel_values[1:]]
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        ids, mask = left_pad(rows, tiny_tokenizer.pad_token_id)
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **settings)
        for index, (row, pixels) in enumerate(zip(rows, per_prompt_images)):
            single = model.generate(input_ids=torch.tensor([row]), pixel_values=pixels, **settings)
            assert batched.sequences[index, -5:].tolist() == single.sequences[0, -5:].tolist()
            for got, expected in zip(batched.logits, single.logits):
                torch.testing.assert_close(got[index], expected[0], atol=1e-4, rtol=0)


def test_deepcopy_keeps_adapters_separate(tiny_parts, tiny_tokenizer):
    """TRL builds reference models by deepcopy: the copy's hooks must run the copy's adapters."""
    model = build(tiny_parts, tiny_tokenizer, fusion="cross_attention", cross_attention_every=2)
    reference = copy.deepcopy(model)
    open_gates(model)
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> a red circle.")])
    with torch.no_grad():
        text_only_logits = reference(input_ids=ids).logits
        ref_logits = reference(input_ids=ids, pixel_values=images(1)).logits
        logits = model(input_ids=ids, pixel_values=images(1)).logits
    torch.testing.assert_close(ref_logits, text_only_logits)  # the copy's gates are still closed
    assert (logits - ref_logits).abs().max() > 1e-4


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_generate_from_cached_features_equals_generate_from_pixels(tiny_parts, tiny_tokenizer, fusion):
    model = build(tiny_parts, tiny_tokenizer, fusion=fusion, towers=("siglip", "clip"), cross_attention_every=2)
    if fusion == "cross_attention":
        open_gates(model)
    calls = []
    for tower in model.model.vision_towers:
        tower.register_forward_hook(lambda *args: calls.append(1))
    rows = [encode(tiny_tokenizer, model, p) for p in ("<image> Answer:", "two <image> and <image> blue")]
    ids, mask = left_pad(rows, tiny_tokenizer.pad_token_id)
    pixel_values = images(3, ("siglip", "clip"))
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        features = pack_image_features(model.model.get_vision_features(pixel_values))
        calls.clear()
        from_features = model.generate(input_ids=ids, attention_mask=mask, image_features=features, **settings)
        assert calls == []
        from_pixels = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **settings)
    assert torch.equal(from_features, from_pixels)


def test_requested_dtype_reaches_every_part(tmp_path, tiny_parts, tiny_tokenizer):
    build(tiny_parts, tiny_tokenizer, fusion="cross_attention", towers=("siglip", "clip")).save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([encode(tiny_tokenizer, model, "a <image> red circle.")])
    out = model(input_ids=ids, pixel_values=images(1, ("siglip", "clip")), labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_peft_modules_to_save_copies_are_the_ones_that_run(tiny_parts, tiny_tokenizer):
    """LoRA on the LLM + fully trained projectors/adapters, the usual PEFT recipe for a VLM."""
    from peft import LoraConfig, get_peft_model

    model = build(tiny_parts, tiny_tokenizer, fusion="cross_attention", cross_attention_every=2)
    peft_model = get_peft_model(model, LoraConfig(
        r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)", modules_to_save=["projectors", "cross_attention"]
    ))
    adapters = model.model.cross_attention
    for block in adapters.modules_to_save["default"].values():
        with torch.no_grad():
            block.attn_gate.fill_(1.0)  # only the trained copy opens; the original stays closed
    ids = torch.tensor([encode(tiny_tokenizer, model, "<image> a red circle.")])
    pixel_values = images(1)
    with torch.no_grad():
        text_only = peft_model(input_ids=ids).logits
        with_image = peft_model(input_ids=ids, pixel_values=pixel_values).logits
        with peft_model.disable_adapter():  # the reference model of DPO: original adapters, closed gates
            reference = peft_model(input_ids=ids, pixel_values=pixel_values).logits
    assert (with_image - text_only).abs().max() > 1e-3
    torch.testing.assert_close(reference, text_only, atol=1e-5, rtol=0)
    peft_model(input_ids=ids, pixel_values=pixel_values, labels=ids).loss.backward()
    assert adapters.modules_to_save["default"]["1"].q_proj.weight.grad is not None
    assert model.model.projectors.modules_to_save["default"][0].linear_1.weight.grad is not None
    assert adapters.original_module["1"].q_proj.weight.grad is None


# --------------------------------------------------------------------------------------------------- standardisation


def test_feature_standardisation_is_identity_until_set_then_applies_per_tower(tmp_path, tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, towers=("siglip", "clip"))
    projectors = model.model.projectors
    assert not projectors.standardized
    features = model.model.get_vision_features(images(2, ("siglip", "clip")))
    with torch.no_grad():
        raw = model.model.project_vision_features(features)
        width = features[0].shape[-1]
        mean, std = torch.linspace(-1, 1, width), torch.linspace(0.5, 2, width)
        projectors.set_feature_statistics(0, mean, std, count=10)
        assert not projectors.standardized  # the second tower is still the identity
        standardised = model.model.project_vision_features(features)
    # tower 1's tokens are untouched; tower 0's are its projector on the pooled standardised features
    siglip_tokens = features[0].shape[1]
    torch.testing.assert_close(standardised[:, siglip_tokens:], raw[:, siglip_tokens:])
    expected = projectors[0]((features[0] - mean) / std)
    torch.testing.assert_close(standardised[:, :siglip_tokens], expected.detach())

    projectors.set_feature_statistics(1, torch.zeros(features[1].shape[-1]), torch.ones(features[1].shape[-1]), count=3)
    assert projectors.standardized
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.model.projectors.feature_statistics(0)[2] == 10
    torch.testing.assert_close(loaded.model.projectors.feature_statistics(0)[1], std)


@pytest.mark.parametrize(
    "mean, std, message",
    [(torch.zeros(3), torch.ones(3), "shape"), (torch.zeros(32), torch.zeros(32), "positive std"),
     (torch.full((32,), float("nan")), torch.ones(32), "finite")],
)
def test_feature_statistics_are_checked(tiny_parts, tiny_tokenizer, mean, std, message):
    model = build(tiny_parts, tiny_tokenizer)
    with pytest.raises(ValueError, match=message):
        model.model.projectors.set_feature_statistics(0, mean, std, count=1)


def test_checkpoint_without_statistics_loads_as_identity(tmp_path, tiny_parts, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    model = build(tiny_parts, tiny_tokenizer)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".feature_" not in k}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    mean, std, count = loaded.model.projectors.feature_statistics(0)
    assert count == 0 and torch.equal(mean, torch.zeros_like(mean)) and torch.equal(std, torch.ones_like(std))
    pixel_values = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_features(pixel_values), model.get_image_features(pixel_values))


def test_resetting_statistics_reads_no_buffer_value(tiny_parts, tiny_tokenizer):
    # A statistic missing from a checkpoint is uninitialised memory when transformers resets it: NaN must not matter.
    projectors = build(tiny_parts, tiny_tokenizer).model.projectors
    for name in ("feature_mean_0", "feature_std_0", "feature_count_0"):
        getattr(projectors, name).fill_(float("nan"))
    projectors.reset_feature_statistics()
    mean, std, count = projectors.feature_statistics(0)
    assert count == 0 and torch.equal(mean, torch.zeros_like(mean)) and torch.equal(std, torch.ones_like(std))
