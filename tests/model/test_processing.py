import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor
from trl.chat_template_utils import is_chat_template_stop_token_trained
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from model.processing_vlm import VLMProcessor

N = 4  # visual tokens per image in these tests


def _image(color, size=(20, 12), mode="RGB"):
    return Image.new(mode, size, color)


RED, GREEN, BLUE = _image((255, 0, 0)), _image((0, 255, 0)), _image((0, 0, 255))


@pytest.fixture(scope="module")
def siglip_ip():
    return SiglipImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def prepend(tiny_tokenizer, siglip_ip):
    return VLMProcessor(siglip_ip, tiny_tokenizer, num_image_tokens=N)


@pytest.fixture(scope="module")
def cross(tiny_tokenizer, siglip_ip):
    return VLMProcessor(siglip_ip, tiny_tokenizer, fusion="cross_attention")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prepend_expands_each_placeholder_and_flattens_images_in_sample_order(prepend, tiny_tokenizer, siglip_ip):
    texts = ["<image>How many?", "a <image> and <image> b"]
    out = prepend(images=[[RED], [GREEN, BLUE]], text=texts, padding=True, return_tensors="pt")
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    # Each placeholder became N copies, everything else tokenized as the text itself.
    expected = [_ids(tiny_tokenizer, t.replace("<image>", "<image>" * N)) for t in texts]
    for row, ids in enumerate(expected):
        length = len(ids)
        assert out["input_ids"][row, :length].tolist() == ids
        assert out["attention_mask"][row].sum() == length
    assert (out["input_ids"] == image_id).sum(dim=1).tolist() == [N, 2 * N]
    reference = siglip_ip([RED, GREEN, BLUE], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], reference)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}


def test_flat_and_nested_images_agree(prepend):
    texts = ["<image>x", "<image><image>y", "no image here"]
    nested = prepend(images=[[RED], [GREEN, BLUE], []], text=texts, padding=True, return_tensors="pt")
    flat = prepend(images=[RED, GREEN, BLUE], text=texts, padding=True, return_tensors="pt")
    for key in nested:
        torch.testing.assert_close(nested[key], flat[key])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(prepend, tiny_tokenizer, side):
    texts = ["<image>How many circles are there?", "<image>no"]
    out = prepend(images=[[RED], [GREEN]], text=texts, padding=True, padding_side=side, return_tensors="pt")
    short = len(_ids(tiny_tokenizer, texts[1].replace("<image>", "<image>" * N)))
    mask = out["attention_mask"][1]
    pad = tiny_tokenizer.pad_token_id
    if side == "left":
        assert mask[-short:].all() and not mask[:-short].any()
        assert (out["input_ids"][1, :-short] == pad).all()
    else:
        assert mask[:short].all() and not mask[short:].any()
        assert (out["input_ids"][1, short:] == pad).all()


def test_cross_attention_keeps_one_placeholder_and_returns_the_mask(cross, tiny_tokenizer):
    texts = ["<image>ab", "x <image> y <image> z"]
    out = cross(
        images=[[RED], [GREEN, BLUE]], text=texts, padding=True, padding_side="left",
        return_cross_attention_mask=True, return_tensors="pt",
    )
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert (out["input_ids"] == image_id).sum(dim=1).tolist() == [1, 2]
    mask = out["cross_attention_mask"]
    batch, length = out["input_ids"].shape
    assert mask.shape == (batch, length, 2)
    # By hand: token t sees image i iff image i's placeholder sits at or before t; sample 0 has no second image.
    for row in range(batch):
        positions = (out["input_ids"][row] == image_id).nonzero().flatten().tolist()
        for image in range(2):
            for t in range(length):
                expected = image < len(positions) and positions[image] <= t
                assert mask[row, t, image].item() == int(expected)
    # Off by default: TRL's prompt/completion collators would leave a returned mask stale (see the class doc).
    assert "cross_attention_mask" not in cross(images=[[RED]], text=["<image>a"], return_tensors="pt")


def test_non_rgb_images_are_converted(prepend, siglip_ip):
    gray = _image(128, mode="L")
    palette = _image(0, mode="P")
    palette.putpalette([10, 200, 30] * 256)
    transparent = _image((0, 0, 0, 0), mode="RGBA")
    array_gray = np.full((12, 20), 128, dtype=np.uint8)
    out = prepend(images=[gray, palette, transparent, array_gray], text=["<image>" * 4], return_tensors="pt")
    expected = siglip_ip(
        [_image((128, 128, 128)), _image((10, 200, 30)), _image((255, 255, 255)), _image((128, 128, 128))],
        return_tensors="pt",
    )["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected)


def test_images_from_bytes_and_paths(prepend, tmp_path):
    buffer = io.BytesIO()
    RED.save(buffer, format="PNG")
    path = tmp_path / "red.png"
    RED.save(path)
    out = prepend(images=[buffer.getvalue(), str(path)], text=["<image><image>"], return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"][0], out["pixel_values"][1])


def test_undecodable_image_names_the_sample(prepend, tmp_path):
    with pytest.raises(ValueError, match="sample 1: cannot decode image"):
        prepend(images=[[RED], [b"not an image"]], text=["<image>a", "<image>b"])
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="sample 0: cannot decode image"):
        prepend(images=[[str(missing)]], text=["<image>a"])


def test_image_count_mismatch_names_the_sample(prepend):
    with pytest.raises(ValueError, match="sample 1: the text has 2 <image> placeholder"):
        prepend(images=[[RED], [GREEN]], text=["<image>a", "<image><image>b"])
    with pytest.raises(ValueError, match="sample 0: the text has 1 <image> placeholder.*0 image"):
        prepend(text=["<image>a"])
    with pytest.raises(ValueError, match="3 images for 2 <image> placeholders"):
        prepend(images=[RED, GREEN, BLUE], text=["<image>a", "<image>b"])


def test_truncation_never_cuts_image_tokens(prepend, tiny_tokenizer):
    texts = ["<image>a red circle and two blue squares.", "<image><image>ab"]
    # Cutting text after the image tokens is fine...
    out = prepend(images=[[RED], [GREEN, BLUE]], text=texts, truncation=True, max_length=2 * N + 1, padding=True)
    assert all(len(ids) == 2 * N + 1 for ids in out["input_ids"])
    # ...cutting into them is an error that names the sample, never a silent mismatch.
    with pytest.raises(ValueError, match="sample 1: .*max_length=6"):
        prepend(images=[[RED], [GREEN, BLUE]], text=texts, truncation=True, max_length=6)


def test_text_only_and_images_only(prepend, siglip_ip):
    text_only = prepend(text=["plain text", "more"], padding=True, return_tensors="pt")
    assert set(text_only) == {"input_ids", "attention_mask"}
    expected = siglip_ip([RED, GREEN, BLUE], return_tensors="pt")["pixel_values"]
    for images in ([RED, GREEN, BLUE], [[RED], [GREEN, BLUE]]):
        torch.testing.assert_close(prepend(images=images, return_tensors="pt")["pixel_values"], expected)


def test_image_token_must_be_in_the_vocabulary(tiny_tokenizer, siglip_ip):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        VLMProcessor(siglip_ip, tiny_tokenizer, image_token="<img>")
    with pytest.raises(ValueError, match="supported"):
        VLMProcessor(siglip_ip, tiny_tokenizer, fusion="late")


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
]


def _with_image(conversation, image):
    user = {**conversation[0], "content": [{"type": "image", "image": image}, *conversation[0]["content"][1:]]}
    return [user, *conversation[1:]]


def test_chat_template_assistant_mask_survives_image_expansion(prepend, tiny_tokenizer):
    out = prepend.apply_chat_template(
        [_with_image(CONVERSATION, RED), _with_image(CONVERSATION, GREEN)],
        tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False},
    )
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert (out["input_ids"] == image_id).sum(dim=1).tolist() == [N, N]
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    masked = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert tiny_tokenizer.decode(masked) == "two<|end|>"
    assert is_chat_template_stop_token_trained(prepend)


def test_trl_sft_collator(prepend, tiny_tokenizer):
    collator = DataCollatorForVisionLanguageModeling(prepend, max_length=64, assistant_only_loss=True)
    batch = collator([
        {"images": [RED], "messages": [{"role": "user", "content": "How many circles?"}, {"role": "assistant", "content": "two"}]},
        {"images": [GREEN, BLUE], "messages": [{"role": "user", "content": "Same?"}, {"role": "assistant", "content": "no"}]},
    ])
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [N, 2 * N]
    assert batch["pixel_values"].shape[0] == 3
    # Only the assistant answers (and their end-of-turn) are trained; image tokens never are.
    trained = [tiny_tokenizer.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert trained == ["two<|end|>", "no<|end|>"]


def test_trl_sft_collator_standard_and_prompt_completion(prepend, tiny_tokenizer):
    # Standard format: the text carries the placeholders; every kwarg TRL passes (pad_to_multiple_of, truncation...).
    collator = DataCollatorForVisionLanguageModeling(prepend, max_length=64, pad_to_multiple_of=8)
    batch = collator([{"images": [RED], "text": "<image>a red circle"}, {"images": [], "text": "no image"}])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["pixel_values"].shape[0] == 1
    # Prompt-completion: only the completion is trained, the prompt (and its image tokens) never.
    collator = DataCollatorForVisionLanguageModeling(prepend, completion_only_loss=True)
    batch = collator([
        {"images": [RED], "prompt": [{"role": "user", "content": "Color?"}], "completion": [{"role": "assistant", "content": "red"}]},
        {"images": [BLUE], "prompt": [{"role": "user", "content": "Which color?"}], "completion": [{"role": "assistant", "content": "blue"}]},
    ])
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [N, N]
    trained = [tiny_tokenizer.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert trained == ["red<|end|>\n", "blue<|end|>\n"]


def test_trl_dpo_collator_keeps_pixel_values_for_chosen_and_rejected(cross, prepend, tiny_tokenizer):
    examples = [
        {"images": [RED], "prompt": [{"role": "user", "content": "Color?"}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
        {"images": [GREEN], "prompt": [{"role": "user", "content": "Which color is it?"}],
         "chosen": [{"role": "assistant", "content": "green"}], "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    for processor, per_image in ((prepend, N), (cross, 1)):
        batch = DataCollatorForVisionPreference(processor)([{**e} for e in examples])
        # The batch is [chosen..., rejected...]; images are repeated in that order.
        assert batch["pixel_values"].shape[0] == 4
        torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][2])
        assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [per_image] * 4
        # Every key that reaches the forward is aligned with the concatenated prompt + completion.
        assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "pixel_values"}


def test_save_and_reload_with_several_image_processors(tiny_tokenizer, siglip_ip, tmp_path):
    clip_ip = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    processor = VLMProcessor(
        siglip_ip, tiny_tokenizer, num_image_tokens=7, extra_vision_processors=[clip_ip], return_cross_attention_mask=True
    )
    processor.save_pretrained(tmp_path)
    reloaded = VLMProcessor.from_pretrained(tmp_path)
    assert (reloaded.num_image_tokens, reloaded.fusion, reloaded.image_token) == (7, "prepend", "<image>")
    assert reloaded.return_cross_attention_mask
    assert [type(p).__name__ for p in reloaded.image_processors] == [type(p).__name__ for p in processor.image_processors]
    assert reloaded.extra_vision_processors[0].crop_size["height"] == 48
    assert reloaded.image_processor.size["height"] == 32
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    assert reloaded.tokenizer("a <image> b")["input_ids"] == tiny_tokenizer("a <image> b")["input_ids"]
