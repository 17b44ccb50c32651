"""BitNet b1.58 BitLinear: ternary weights, 8-bit activations, straight-through training, ternary VLM save/load."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from model import BitLinear, VLMConfig, VLMForConditionalGeneration, ternarize_
from model.ternary import int8_activations, ternary_weight


def bit_linear(seed=0, in_features=16, out_features=8):
    torch.manual_seed(seed)
    return BitLinear.from_linear(nn.Linear(in_features, out_features))


def test_effective_weight_is_one_scale_times_minus_one_zero_or_one():
    layer = bit_linear()
    ternary, scale = ternary_weight(layer.weight)
    assert set(ternary.unique().tolist()) <= {-1.0, 0.0, 1.0} and len(ternary.unique()) == 3
    torch.testing.assert_close(scale, layer.weight.abs().mean())  # absmean, one per tensor
    effective = layer.effective_weight()
    assert len((effective / scale).round().unique()) == 3
    torch.testing.assert_close(effective, ternary * scale)
    # rounding to the nearest level: |w / scale| < 0.5 -> 0, above -> +-1
    torch.testing.assert_close(ternary, (layer.weight / scale).round().clamp(-1, 1))


def test_activations_are_8bit_per_token():
    x = torch.randn(3, 5, 64)
    quantised = int8_activations(x)
    scale = 127 / x.abs().amax(dim=-1, keepdim=True)
    levels = quantised * scale
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # integers after rescaling
    assert levels.abs().max() <= 127.0001
    assert ((quantised - x).abs() <= 0.5 / scale + 1e-6).all()  # within half a step of each token's grid


def test_forward_uses_quantised_weights_and_activations():
    layer = bit_linear()
    x = torch.randn(4, 16)
    ternary, scale = ternary_weight(layer.weight)
    expected = F.linear(int8_activations(x), ternary * scale, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-3)


def test_straight_through_gradient_reaches_the_latent_weights():
    layer = bit_linear()
    x = torch.randn(4, 16)
    grad_out = torch.randn(4, 8)
    layer(x).backward(grad_out)
    # STE: d/dW of the latent weight equals the gradient w.r.t. the effective weight
    torch.testing.assert_close(layer.weight.grad, grad_out.T @ int8_activations(x))
    x_leaf = x.clone().requires_grad_(True)
    layer(x_leaf).backward(grad_out)
    torch.testing.assert_close(x_leaf.grad, grad_out @ layer.effective_weight().detach())


def test_training_steps_move_the_latent_weights_and_learn():
    layer = bit_linear(in_features=8, out_features=4)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    torch.manual_seed(1)
    x, target = torch.randn(64, 8), torch.randn(64, 4)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert not torch.equal(layer.weight, before)
    assert losses[-1] < losses[0]


def test_ternarize_replaces_decoder_linears_only(tiny_parts):
    llm = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"])
    keys = llm.state_dict().keys()
    q_proj = llm.model.layers[0].self_attn.q_proj.weight
    replaced = ternarize_(llm.model.layers)
    assert len(replaced) == 4 * 7  # q, k, v, o, gate, up, down per layer
    assert all(isinstance(m, BitLinear) for n, m in llm.model.layers.named_modules() if isinstance(m, nn.Linear))
    assert type(llm.lm_head) is nn.Linear and type(llm.model.embed_tokens) is nn.Embedding
    assert llm.model.layers[0].self_attn.q_proj.weight is q_proj  # parameters taken over, not copied
    assert llm.state_dict().keys() == keys


def test_ternary_vlm_round_trips_through_save_and_load(tmp_path, tiny_parts, tiny_tokenizer):
    torch.manual_seed(0)
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    config = VLMConfig(ternary=True, image_token_id=image_id)
    siglip = AutoModel.from_pretrained(tiny_parts["siglip"])
    model = VLMForConditionalGeneration.from_parts(config, [siglip], AutoModelForCausalLM.from_pretrained(tiny_parts["llama"]))
    assert isinstance(model.model.language_model.layers[2].mlp.down_proj, BitLinear)
    assert type(model.model.projectors[0].linear_1) is nn.Linear and type(model.lm_head) is nn.Linear

    ids = torch.tensor([[1] + [image_id] * 16 + [30, 31, 32]])
    pixel_values = torch.randn(1, 3, 32, 32)
    model.train()
    loss = model(input_ids=ids, pixel_values=pixel_values, labels=ids).loss
    loss.backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.ternary and isinstance(loaded.model.language_model.layers[2].mlp.down_proj, BitLinear)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).logits
        got = loaded(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_lora_wraps_bitlinear_layers(tiny_parts):
    from peft import LoraConfig, get_peft_model

    llm = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"])
    ternarize_(llm.model.layers)
    peft_model = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, BitLinear)
    peft_model(input_ids=torch.tensor([[1, 30, 31]]), labels=torch.tensor([[1, 30, 31]])).loss.backward()
    assert q_proj.lora_B["default"].weight.grad is not None
