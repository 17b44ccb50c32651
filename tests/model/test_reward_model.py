"""`VLMForRewardModeling`: output shape, pooling at the last real token under either padding, the safetensors round
trip, Auto registration, `from_vlm` sharing the VLM's weights, and loading with the LLM in 4 bit."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from model import VLMForConditionalGeneration, VLMForRewardModeling, VLMProcessor
from model.reward_model import answer_tokens, last_token_indices, previous_columns
from tests.align.training_helpers import tiny_vlm
from tests.conftest import save_tiny_llama

CONVERSATIONS = [
    ("What color is the square?", "red"),
    ("How many circles are there?", "There are two circles, one of them at the top left."),
    ("Is there a purple triangle?", "no"),
]


@pytest.fixture(scope="module")
def vlms(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_model")
    return {
        fusion: tiny_vlm(root / fusion, tiny_parts["siglip"], tiny_parts["llama"], fusion)
        for fusion in ("prepend", "cross_attention")
    }


def conversation_texts(processor) -> list[str]:
    return [
        processor.apply_chat_template(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            tokenize=False,
        )
        for question, answer in CONVERSATIONS
    ]


def images(n: int) -> list[list[Image.Image]]:
    colors = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 0)]
    return [[Image.new("RGB", (32, 32), colors[i % len(colors)])] for i in range(n)]


def random_head(model: VLMForRewardModeling) -> VLMForRewardModeling:
    torch.manual_seed(0)
    with torch.no_grad():
        model.score.weight.normal_()
    return model.eval()


def test_last_token_indices_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_indices(mask).tolist() == [2, 4, 4, 0]


def test_new_head_scores_zero_and_logits_are_batch_by_one(vlms):
    model = VLMForRewardModeling.from_vlm(vlms["prepend"]).eval()
    processor = VLMProcessor.from_pretrained(vlms["prepend"])
    texts = conversation_texts(processor)
    batch = processor(images=images(3), text=texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model(**batch)
    assert isinstance(output, SequenceClassifierOutputWithPast)
    assert output.logits.shape == (3, 1) and output.cache is None
    assert torch.equal(output.logits, torch.zeros(3, 1))  # zero-initialised head
    assert model.config.num_labels == 1 and model.config.architectures == ["VLMForRewardModeling"]
    assert not any(name.startswith("lm_head") for name in model.state_dict())


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_left_and_right_padding_give_the_unpadded_score(vlms, fusion):
    model = random_head(VLMForRewardModeling.from_vlm(vlms[fusion]))
    processor = VLMProcessor.from_pretrained(vlms[fusion])
    texts, pictures = conversation_texts(processor), images(3)
    with torch.no_grad():
        alone = torch.cat([
            model(**processor(images=[p], text=[t], return_tensors="pt", add_special_tokens=False)).logits
            for t, p in zip(texts, pictures)
        ])
        padded = {
            side: model(
                **processor(
                    images=pictures, text=texts, padding=True, padding_side=side, return_tensors="pt",
                    add_special_tokens=False,
                )
            ).logits
            for side in ("left", "right")
        }
    assert alone.abs().min() > 1e-3  # a real, non-trivial score
    torch.testing.assert_close(padded["right"], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded["left"], alone, atol=1e-5, rtol=1e-5)


def test_score_is_read_at_the_last_real_token(vlms):
    """Changing the text after the pooled token (in the padding) changes nothing; changing the last token does."""
    model = random_head(VLMForRewardModeling.from_vlm(vlms["prepend"]))
    processor = VLMProcessor.from_pretrained(vlms["prepend"])
    batch = processor(images=images(3), text=conversation_texts(processor), padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        reference = model(**batch).logits
        garbled = batch["input_ids"].clone()
        garbled[batch["attention_mask"] == 0] = 5
        assert torch.equal(model(**{**batch, "input_ids": garbled}).logits, reference)
        last = last_token_indices(batch["attention_mask"])
        changed = batch["input_ids"].clone()
        changed[0, last[0]] = 7
        scores = model(**{**batch, "input_ids": changed}).logits
    assert scores[0] != reference[0]
    torch.testing.assert_close(scores[1:], reference[1:])


def test_save_and_load_round_trip_in_safetensors(vlms, tmp_path):
    model = random_head(VLMForRewardModeling.from_vlm(vlms["prepend"]))
    model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    assert not list((tmp_path / "rm").glob("*.bin"))
    for loaded in (
        VLMForRewardModeling.from_pretrained(tmp_path / "rm"),
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm"),
    ):
        assert type(loaded) is VLMForRewardModeling
        original, reloaded = model.state_dict(), loaded.state_dict()
        assert original.keys() == reloaded.keys()
        assert all(torch.equal(original[k], reloaded[k]) for k in original)


def test_from_vlm_shares_the_backbone(vlms):
    vlm = VLMForConditionalGeneration.from_pretrained(vlms["prepend"])
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    reward = VLMForRewardModeling.from_vlm(vlm)
    assert reward.model is vlm.model  # shared, not copied
    assert all(torch.equal(before[k], v) for k, v in reward.model.state_dict().items())  # and not re-initialised
    assert torch.equal(reward.score.weight, torch.zeros_like(reward.score.weight))
    assert vlm.config.num_labels != 1 or vlm.config.architectures != ["VLMForRewardModeling"]  # VLM config untouched
    with torch.no_grad():
        next(reward.model.projectors.parameters()).add_(1.0)
    assert any(not torch.equal(before[k], v) for k, v in vlm.model.state_dict().items())  # one set of weights

    from_folder = VLMForRewardModeling.from_vlm(vlms["prepend"])
    saved = VLMForConditionalGeneration.from_pretrained(vlms["prepend"]).model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in from_folder.model.state_dict().items())
    with pytest.raises(ValueError, match="loading options only with a folder"):
        VLMForRewardModeling.from_vlm(vlm, dtype=torch.float32)


def test_loads_with_the_llm_in_4bit(tiny_parts, tiny_tokenizer, tmp_path):
    # bitsandbytes quantises in blocks of 64 inputs: the LLM needs hidden size >= 64.
    llama64 = save_tiny_llama(tmp_path / "llama64", tiny_tokenizer, hidden_size=64, num_layers=2)
    vlm = tiny_vlm(tmp_path / "vlm64", tiny_parts["siglip"], llama64)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = VLMForRewardModeling.from_vlm(vlm, quantization_config=quantization)
    import bitsandbytes as bnb

    linears = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(kind is bnb.nn.Linear4bit for name, kind in linears.items() if ".language_model.layers." in name)
    assert all(kind is torch.nn.Linear for name, kind in linears.items() if ".language_model." not in name)
    assert linears["score"] is torch.nn.Linear
    processor = VLMProcessor.from_pretrained(vlm)
    batch = processor(images=images(3), text=conversation_texts(processor), padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert model(**batch).logits.shape == (3, 1)


def test_answer_tokens_follow_the_last_turn_opening():
    """The likelihood feature's answer: the real tokens after the last occurrence of the turn-opening ids."""
    ids = torch.tensor([[5, 7, 8, 1, 7, 8, 2, 3, 0], [7, 8, 4, 4, 7, 8, 9, 0, 0]])
    mask = torch.tensor([[1] * 8 + [0], [1] * 7 + [0, 0]])
    assert answer_tokens(ids, mask, [7, 8]).long().tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0]]
    assert previous_columns(ids)[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"rows \[1\] hold no answer_start_ids"):
        answer_tokens(ids, mask, [1, 7])
    # Padding never opens a turn: a match that runs into padding does not count.
    with pytest.raises(ValueError, match="hold no answer_start_ids"):
        answer_tokens(torch.tensor([[3, 7, 8]]), torch.tensor([[1, 1, 0]]), [7, 8])
