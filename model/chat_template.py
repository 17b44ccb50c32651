"""Chat templates that render image items for LLM tokenizers that were never taught about images.

A real LLM tokenizer (Llama 3, Qwen2, OLMo) has no image placeholder token, and its chat template
either drops `{"type": "image"}` content items or fails on list content. `prepare_vlm_tokenizer` adds
the placeholder as a special token and swaps in a template that renders image items, keeps the
LLM's own role markers where it has them, and wraps assistant content in `{% generation %}` blocks
so that TRL's `assistant_only_loss` (`return_assistant_tokens_mask=True`) finds the assistant turns.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"

_PROBE_CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]


def _content(image_token: str) -> str:
    """Jinja for `message['content']`: a string, or a list of image/text items (images become `image_token`)."""
    image_literal = image_token.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- elif message['content'] is defined and message['content'] is not none -%}"
        "{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{{{{- '{image_literal}' -}}}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )


def _template(bos: str, header: str, end_of_turn: str, after_turn: str, generation_prompt: str, image_token: str) -> str:
    """A template `bos (header content end_of_turn after_turn)* [generation_prompt]`.

    `header` is Jinja for the role marker; the assistant's content and end-of-turn marker sit in a
    `{% generation %}` block because the model must learn to emit the marker to stop.
    """
    content = _content(image_token)
    return (
        bos
        + "{%- for message in messages -%}"
        + header
        + "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
        + content
        + end_of_turn
        + "{%- endgeneration -%}"
        + "{%- else -%}"
        + content
        + end_of_turn
        + "{%- endif -%}"
        + after_turn
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + generation_prompt
        + "{%- endif -%}"
    )


def _llama3(image_token: str) -> str:
    return _template(
        bos="{{- bos_token -}}",
        header="{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}",
        end_of_turn="{{- '<|eot_id|>' -}}",
        after_turn="",
        generation_prompt="{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}",
        image_token=image_token,
    )


def _chatml(image_token: str) -> str:
    return _template(
        bos="",
        header="{{- '<|im_start|>' + message['role'] + '\n' -}}",
        end_of_turn="{{- '<|im_end|>' -}}",
        after_turn="{{- '\n' -}}",
        generation_prompt="{{- '<|im_start|>assistant\n' -}}",
        image_token=image_token,
    )


def _generic(image_token: str) -> str:
    return _template(
        bos="{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}",
        header="{{- '<|' + message['role'] + '|>\n' -}}",
        end_of_turn="{{- eos_token -}}",
        after_turn="{{- '\n' -}}",
        generation_prompt="{{- '<|assistant|>\n' -}}",
        image_token=image_token,
    )


# Style name -> (template builder, marker tokens whose presence identifies the style, end-of-turn token).
# An end-of-turn token of None means the tokenizer's eos token ends a turn.
CHAT_STYLES = {
    "llama3": (_llama3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "chatml": (_chatml, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "generic": (_generic, (), None),
}


def _template_string(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template


def detect_chat_style(tokenizer: PreTrainedTokenizerBase) -> str:
    """Name of the chat style whose role markers the tokenizer uses: "llama3", "chatml" or "generic".

    The markers are looked for in the tokenizer's chat template, then in its vocabulary (a base
    checkpoint often has the markers but no template).
    """
    template = _template_string(tokenizer) or ""
    vocab = tokenizer.get_vocab()
    for style, (_, markers, _) in CHAT_STYLES.items():
        if markers and all(marker in template for marker in markers):
            return style
    for style, (_, markers, _) in CHAT_STYLES.items():
        if markers and all(marker in vocab for marker in markers):
            return style
    return "generic"


def vlm_chat_template(style: str, image_token: str = IMAGE_TOKEN) -> str:
    """The chat template of `style` that renders `{"type": "image"}` items as `image_token`.

    Args:
        style: one of `CHAT_STYLES` ("llama3", "chatml", "generic").
        image_token: the placeholder written for each image item.

    Returns:
        A Jinja chat template in TRL's message format with `{% generation %}` blocks and `add_generation_prompt`.
    """
    if style not in CHAT_STYLES:
        raise ValueError(f"unknown chat style {style!r}; supported: {sorted(CHAT_STYLES)}")
    return CHAT_STYLES[style][0](image_token)


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase, style: str | None = None) -> str | None:
    """The token that ends an assistant turn in the tokenizer's chat style (its eos token for the generic style)."""
    style = style or detect_chat_style(tokenizer)
    return CHAT_STYLES[style][2] or tokenizer.eos_token


def renders_images(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> bool:
    """Whether the tokenizer's chat template writes `image_token` for an `{"type": "image"}` content item."""
    if _template_string(tokenizer) is None:
        return False
    try:
        rendered = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False)
    except Exception:  # a template that cannot render list content raises all kinds of Jinja/Python errors
        return False
    return image_token in rendered


def prepare_vlm_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> list[str]:
    """Make an LLM tokenizer ready for a VLM: image token, image-aware chat template, pad token.

    A tokenizer whose template already renders image items (like `align.zoo.tokenizer`'s) keeps its template.
    Otherwise the template is replaced by `vlm_chat_template(detect_chat_style(tokenizer))`. A missing pad
    token is set to the eos token (padding positions are masked by the attention mask, never trained).

    Args:
        tokenizer: the LLM's tokenizer, modified in place.
        image_token: the image placeholder; added as an extra special token when missing.

    Returns:
        The tokens added to the vocabulary (resize the LLM's embeddings when non-empty).
    """
    added = []
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
        added.append(image_token)
    if not renders_images(tokenizer, image_token):
        tokenizer.chat_template = vlm_chat_template(detect_chat_style(tokenizer), image_token)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return added
