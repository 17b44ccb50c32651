import pytest
from transformers import AutoTokenizer

from align.zoo.tokenizer import IMAGE_TOKEN, train_tokenizer

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles are there?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    {"role": "user", "content": [{"type": "text", "text": "What color is the square?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
]


def test_round_trip_and_special_tokens(tiny_tokenizer, tmp_path):
    text = "a large red circle at the top left, a small blue square."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    for name in ("pad_token", "bos_token", "eos_token", "unk_token"):
        assert getattr(tiny_tokenizer, name) is not None
    # The image placeholder is one token, never split by BPE.
    image_ids = tiny_tokenizer(f"x{IMAGE_TOKEN}y", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in image_ids
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=False) == tiny_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_chat_template_renders_trl_messages(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<s><|user|>\n<image>How many circles are there?<|end|>\n<|assistant|>\ntwo<|end|>\n"
        "<|user|>\nWhat color is the square?<|end|>\n<|assistant|>\nblue<|end|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    # String content (TRL's text-only format) renders the same way.
    assert tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == "<s><|user|>\nhi<|end|>\n"


def test_assistant_mask_covers_answers_and_end_of_turn(tiny_tokenizer):
    out = tiny_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant_text = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    # The answer and the end-of-turn token the model must emit to stop; the newline after it is the template's.
    assert assistant_text == "two<|end|>blue<|end|>"


def test_vocab_size_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], vocab_size=100)
