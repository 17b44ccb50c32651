"""Cross-attention fusion: zero-gated adapters leave the base LLM intact; images count once the gates open."""

import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

from model import VLMConfig, VLMForConditionalGeneration, freeze_for_stage
from model.cross_attention import (
    GatedCrossAttentionBlock,
    derive_cross_attention_mask,
    prepare_cross_attention_inputs,
)


def build(parts, tokenizer, llm="llama", every=2):
    torch.manual_seed(0)
    config = VLMConfig(fusion="cross_attention", cross_attention_every=every,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    siglip = AutoModel.from_pretrained(parts["siglip"])
    return VLMForConditionalGeneration.from_parts(config, [siglip], AutoModelForCausalLM.from_pretrained(parts[llm]))


def batch(tokenizer, texts):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def pixels(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_derived_mask_lets_each_token_see_the_images_placed_before_it():
    image = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([
        [[0, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1]],
        [[0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 0]],
    ])
    assert torch.equal(derive_cross_attention_mask(image), expected)
    assert derive_cross_attention_mask(image, num_images=3).shape == (2, 6, 3)


def test_rows_that_see_no_image_get_exactly_zero_and_no_nan():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2))
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.mlp_gate.fill_(1.0)
    hidden = torch.randn(1, 3, 16, requires_grad=True)
    mask = torch.tensor([[[0], [1], [0]]])  # only the middle token may see the (single) image
    inputs = prepare_cross_attention_inputs(torch.randn(1, 4, 16), mask, tokens_per_image=4, dtype=torch.float32,
                                            adapters=None, layers=frozenset())
    out = block(hidden, inputs)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(hidden.grad).all()
    assert torch.equal(out[:, [0, 2]], hidden[:, [0, 2]])
    assert not torch.allclose(out[:, 1], hidden[:, 1])


def test_llm_state_dict_keys_are_those_of_the_plain_llm(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"]).model
    assert model.model.language_model.state_dict().keys() == plain.state_dict().keys()
    assert sorted(model.model.cross_attention.keys()) == ["1", "3"]  # before every 2nd of 4 layers


def test_zero_gates_make_the_model_the_base_llm_even_with_images(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"]).eval()
    ids, mask = batch(tiny_tokenizer, ["<image> a red circle.", "Question: <image> two <image>"])
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        text_only = model(input_ids=ids, attention_mask=mask).logits
        with_images = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(3)).logits
    torch.testing.assert_close(text_only, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_images, expected, atol=1e-5, rtol=0)


def test_trained_adapters_change_only_what_comes_after_an_image(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"]).eval()
    freeze_for_stage(model, "align")  # projectors and adapters only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_ids, train_mask = batch(tiny_tokenizer, ["<image> a red circle.", "<image> two blue squares."])
    model.train()
    for _ in range(3):
        loss = model(input_ids=train_ids, attention_mask=train_mask, pixel_values=pixels(2), labels=train_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(a.attn_gate.abs().item() > 1e-3 for a in model.model.cross_attention.values())

    # sample 0 has no image, sample 1 has one after "Question:"
    ids, mask = batch(tiny_tokenizer, ["Question: How many circles are there?", "Question: <image> two"])
    image_position = (ids[1] == model.config.image_token_id).nonzero().item()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        text_only = model(input_ids=ids, attention_mask=mask).logits
        with_image = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits
    torch.testing.assert_close(text_only, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_image[0], expected[0], atol=1e-5, rtol=0)  # the sample without an image
    torch.testing.assert_close(with_image[1, :image_position], expected[1, :image_position], atol=1e-5, rtol=0)
    assert (with_image[1, image_position:] - expected[1, image_position:]).abs().max() > 1e-3


def test_explicit_mask_overrides_the_derived_one(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer).eval()
    with torch.no_grad():
        for adapter in model.model.cross_attention.values():
            adapter.attn_gate.fill_(1.0)
            adapter.mlp_gate.fill_(1.0)
    ids, mask = batch(tiny_tokenizer, ["<image> a red circle."])
    derived = derive_cross_attention_mask(ids == model.config.image_token_id)
    with torch.no_grad():
        implicit = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits
        explicit = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1), cross_attention_mask=derived).logits
        blocked = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1),
                        cross_attention_mask=torch.zeros_like(derived)).logits
        text_only = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(explicit, implicit)
    torch.testing.assert_close(blocked, text_only, atol=1e-5, rtol=0)
    assert (implicit - text_only).abs().max() > 1e-3


def test_qwen2_decoder_takes_adapters_too(tiny_parts, tiny_tokenizer):
    model = build(tiny_parts, tiny_tokenizer, llm="qwen2", every=4).eval()
    assert list(model.model.cross_attention.keys()) == ["3"]
    with torch.no_grad():
        model.model.cross_attention["3"].attn_gate.fill_(1.0)
    ids, mask = batch(tiny_tokenizer, ["a <image> red circle."])
    with torch.no_grad():
        with_image = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits
        text_only = model(input_ids=ids, attention_mask=mask).logits
    assert (with_image - text_only).abs().max() > 1e-3
