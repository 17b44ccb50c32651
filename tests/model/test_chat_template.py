import copy

import pytest
from trl.chat_template_utils import is_chat_template_stop_token_trained

from model.chat_template import (
    CHAT_STYLES,
    detect_chat_style,
    end_of_turn_token,
    prepare_vlm_tokenizer,
    renders_images,
    vlm_chat_template,
)
from tests.conftest import CORPUS
from tests.model.llm_styles import bare_llm_tokenizer, styled_from_tiny

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
]

EXPECTED = {
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>How many?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ntwo<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "two<|eot_id|>",
    ),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>How many?<|im_end|>\n"
        "<|im_start|>assistant\ntwo<|im_end|>\n",
        "<|im_start|>assistant\n",
        "two<|im_end|>",
    ),
}


def _assistant_text(tokenizer, conversation):
    out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])


def test_project_tokenizer_is_kept_as_it_is(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    template = tokenizer.chat_template
    assert renders_images(tokenizer)
    assert prepare_vlm_tokenizer(tokenizer) == []
    assert tokenizer.chat_template == template
    assert len(tokenizer) == len(tiny_tokenizer)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_llm_template_is_replaced_keeping_its_role_markers(tiny_tokenizer, style):
    tokenizer = styled_from_tiny(tiny_tokenizer, style)
    # The LLM's own template cannot render image items (it concatenates or trims list content).
    assert not renders_images(tokenizer)
    assert detect_chat_style(tokenizer) == style

    assert prepare_vlm_tokenizer(tokenizer) == []  # the tiny tokenizer already holds <image>
    full, generation_prompt, assistant = EXPECTED[style]
    assert renders_images(tokenizer)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == full
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(generation_prompt)
    assert full.startswith(prompt)  # the prompt is a prefix of prompt + completion, as TRL's DPO collator needs
    assert _assistant_text(tokenizer, CONVERSATION) == assistant
    assert end_of_turn_token(tokenizer) in assistant
    assert is_chat_template_stop_token_trained(tokenizer)


def test_generic_fallback_for_unknown_markers(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert detect_chat_style(tokenizer) == "generic"
    assert not renders_images(tokenizer)
    prepare_vlm_tokenizer(tokenizer)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)
    assert rendered == "<s><|system|>\nBe brief.<|end|>\n<|user|>\n<image>How many?<|end|>\n<|assistant|>\ntwo<|end|>\n"
    assert _assistant_text(tokenizer, CONVERSATION) == "two<|end|>"


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_image_and_pad_tokens_are_added_when_missing(style):
    tokenizer = bare_llm_tokenizer(CORPUS, style)
    size = len(tokenizer)
    assert tokenizer.pad_token is None and "<image>" not in tokenizer.get_vocab()

    assert prepare_vlm_tokenizer(tokenizer) == ["<image>"]
    assert len(tokenizer) == size + 1
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer("a<image><image>b", add_special_tokens=False)["input_ids"].count(image_id) == 2
    assert tokenizer.pad_token == tokenizer.eos_token
    assert detect_chat_style(tokenizer) == style
    assert "<image>How many?" in tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Idempotent: a second call adds nothing and keeps the template.
    template = tokenizer.chat_template
    assert prepare_vlm_tokenizer(tokenizer) == []
    assert tokenizer.chat_template == template


def test_style_is_detected_from_the_vocabulary_without_a_template():
    tokenizer = bare_llm_tokenizer(CORPUS, "chatml")
    tokenizer.chat_template = None
    assert detect_chat_style(tokenizer) == "chatml"
    prepare_vlm_tokenizer(tokenizer)
    assert tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False).startswith("<|im_start|>user\n<image>")


def test_unknown_style_lists_the_supported_ones():
    with pytest.raises(ValueError, match="supported") as error:
        vlm_chat_template("mistral")
    for style in CHAT_STYLES:
        assert style in str(error.value)
