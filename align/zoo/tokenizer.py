"""A small byte-level BPE tokenizer trained locally, saved as a transformers fast tokenizer.

The embedded default world has no hub to fetch a tokenizer from, so it trains one on its own text
with the `tokenizers` library. The result is an ordinary `PreTrainedTokenizerFast` with pad/bos/eos,
an image placeholder token and a chat template in TRL's message format.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model.chat_template import vlm_chat_template

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "<|end|>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS)

# The chat template: the generic style of `model.chat_template` (what a VLM built on an LLM without one of its own
# gets), in TRL's message format with assistant turns in {% generation %} blocks for `assistant_only_loss`.
CHAT_TEMPLATE = vlm_chat_template("generic", IMAGE_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`.

    Args:
        texts: training documents.
        vocab_size: target vocabulary size, special tokens included (a few hundred to ~1k for the world).
        min_frequency: minimum pair frequency for a merge.

    Returns:
        A `PreTrainedTokenizerFast` with pad/bos/eos/unk, the image placeholder, role markers and the
        chat template set; it adds no special tokens on its own (the chat template writes bos).
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} for byte-level BPE, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *ROLE_TOKENS]})
    fast.chat_template = CHAT_TEMPLATE
    return fast
