"""Tokenizers shaped like real LLMs' (Llama 3, Qwen2/ChatML): their role markers and their own chat templates,
which render string content only and know no image placeholder."""

import copy

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STYLES = {
    "llama3": (LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]),
}


def styled_from_tiny(tiny_tokenizer, style):
    """The project's tiny tokenizer given a real LLM's role markers and chat template."""
    template, markers = STYLES[style]
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": markers}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer


def bare_llm_tokenizer(corpus, style="llama3"):
    """A byte-level BPE tokenizer with a real LLM's markers but no image token and no pad token (like Llama 3)."""
    template, markers = STYLES[style]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", *markers]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", model_max_length=1024
    )
    tokenizer.add_special_tokens({"extra_special_tokens": markers}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer
