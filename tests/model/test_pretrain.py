"""Adapter pretraining's data path: cached features give the pixel loss, the cache is invalidated by what it depends
on, a stage that trains the towers never reads it, and bad rows are set aside."""

import json

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from torch import nn
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from align.data import RejectReport
from model.build import build_vlm
from model.feature_cache import image_hash
from model.pretrain import (
    CORRUPT_IMAGE,
    IMAGE_COUNT,
    MISSING_IMAGE,
    TextMixCollator,
    encode_documents,
    encode_images,
    feature_fingerprint,
    fit_feature_statistics,
    load_or_build_vlm,
    mix_text_rows,
    prepare_image_rows,
    prepare_stage_data,
    resolve_feature_cache,
    text_row_document,
    vision_collator,
)
from model.stages import freeze_for_stage

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
MESSAGES_FEATURE = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
FEATURES = Features({"images": List(Image()), "messages": MESSAGES_FEATURE, "image_id": Value("string")})


def _image(rgb, size=16):
    image = PILImage.new("RGB", (size, size), rgb)
    image.putpixel((1, 1), (255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))  # not a flat colour: bicubic resizing sees an edge
    return image


def _messages(caption, images=1):
    return [
        {"role": "user", "content": [{"type": "image", "text": None}] * images + [{"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def _dataset(images=None, captions=None):
    images = images or [[_image(rgb)] for rgb in COLORS.values()]
    captions = captions or [f"a {color} square." for color in COLORS]
    return Dataset.from_dict(
        {"images": images, "messages": [_messages(c, len(i)) for c, i in zip(captions, images)],
         "image_id": [f"img-{i}" for i in range(len(images))]},
        features=FEATURES,
    )


def _open_gates(vlm):
    # The zero-initialised gates make cross-attention ignore the images; open them so the features matter.
    if vlm.model.cross_attention is not None:
        for block in vlm.model.cross_attention.values():
            nn.init.constant_(block.attn_gate, 0.5)
            nn.init.constant_(block.mlp_gate, 0.5)


class TowerCalls:
    """Counts forward calls of the vision towers."""

    def __init__(self, vlm):
        self.calls = 0
        self.handles = [tower.register_forward_hook(self._hook) for tower in vlm.model.vision_towers]

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    "fusion,towers", [("prepend", ["siglip"]), ("cross_attention", ["siglip"]), ("prepend", ["siglip", "clip"])]
)
def test_cached_features_give_the_pixel_loss(tiny_parts, tmp_path, fusion, towers):
    vlm, processor = build_vlm([tiny_parts[t] for t in towers], tiny_parts["llama"], fusion=fusion)
    _open_gates(vlm)
    freeze_for_stage(vlm, "align")
    dataset = _dataset()
    data = prepare_stage_data(dataset, vlm, processor, "align", cache_dir=tmp_path, assistant_only_loss=True)
    assert data.use_feature_cache and data.prepared.encoded == len(dataset)
    # The training rows hold image hashes only: nothing is decoded per batch.
    assert data.train_dataset.features["images"] == List(Value("string"))
    assert data.train_dataset[0]["images"] == [image_hash(dataset[0]["images"][0])]

    examples = [data.train_dataset[i] for i in range(len(dataset))]
    cached = data.data_collator(examples)
    pixels = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" not in cached and "image_features" not in pixels
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(cached[key], pixels[key]), key
    assert (cached["labels"] != -100).sum() < cached["attention_mask"].sum()  # assistant tokens only

    calls = TowerCalls(vlm)
    with torch.no_grad():
        cached_loss = vlm(**cached).loss
        assert calls.calls == 0  # the towers never run on the cached path
        pixel_loss = vlm(**pixels).loss
    calls.remove()
    torch.testing.assert_close(cached_loss, pixel_loss, rtol=0, atol=1e-5)


def test_training_on_cached_features_moves_only_the_adapters(tiny_parts, tmp_path):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], fusion="cross_attention")
    freeze_for_stage(vlm, "align")
    data = prepare_stage_data(_dataset(), vlm, processor, "align", cache_dir=tmp_path / "cache", assistant_only_loss=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, max_length=None,
        assistant_only_loss=True, activation_checkpointing=False, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=vlm, args=args, train_dataset=data.train_dataset, data_collator=data.data_collator,
        processing_class=processor,
    )
    before = {name: p.detach().clone() for name, p in vlm.named_parameters()}
    calls = TowerCalls(vlm)
    trainer.train()
    calls.remove()
    assert calls.calls == 0
    changed = {name for name, p in vlm.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed and all(name.startswith(("model.projectors.", "model.cross_attention.")) for name in changed)
    assert any(".attn_gate" in name for name in changed)  # the gates opened


def test_fingerprint_and_cache_follow_weights_preprocessing_layer_and_images(tiny_parts, tmp_path):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    dataset = _dataset()
    first = prepare_stage_data(dataset, vlm, processor, "align", cache_dir=tmp_path)
    assert first.prepared.encoded == 4
    assert prepare_stage_data(dataset, vlm, processor, "align", cache_dir=tmp_path).prepared.encoded == 0

    base = feature_fingerprint(vlm, processor)
    vlm.config.vision_feature_layer = -2
    assert feature_fingerprint(vlm, processor) != base
    vlm.config.vision_feature_layer = -1
    processor.image_processor.image_mean = [0.4, 0.4, 0.4]
    assert feature_fingerprint(vlm, processor) != base
    processor.image_processor.image_mean = [0.5, 0.5, 0.5]
    assert feature_fingerprint(vlm, processor) == base

    # Changed encoder weights: a new cache, every image encoded again, with the new encoder's features.
    with torch.no_grad():
        vlm.model.vision_towers[0].embeddings.patch_embedding.weight.mul_(1.1)
    again = prepare_stage_data(dataset, vlm, processor, "align", cache_dir=tmp_path)
    assert again.prepared.cache.dir != first.prepared.cache.dir and again.prepared.encoded == 4
    fresh = encode_images(vlm, processor, [row[0] for row in dataset["images"]])
    keys = [key for keys in again.prepared.dataset["image_hashes"] for key in keys]
    torch.testing.assert_close(again.prepared.cache.get(keys), fresh)

    # A changed image: only that one is encoded.
    images = [row for row in dataset["images"]]
    edited = images[2][0].copy()
    edited.putpixel((5, 5), (1, 2, 3))
    images[2] = [edited]
    changed = prepare_stage_data(_dataset(images=images), vlm, processor, "align", cache_dir=tmp_path)
    assert changed.prepared.encoded == 1
    torch.testing.assert_close(changed.prepared.cache.get([image_hash(edited)]), encode_images(vlm, processor, [edited]))


def test_a_stage_that_trains_the_towers_never_reads_the_cache(tiny_parts, tmp_path):
    with pytest.raises(ValueError, match=r"use_feature_cache=true.*prealign"):
        resolve_feature_cache("true", "prealign")
    with pytest.raises(ValueError, match="use_feature_cache must be one of"):
        resolve_feature_cache("sometimes", "align")
    assert resolve_feature_cache("auto", "prealign") is False
    assert resolve_feature_cache(True, "finetune") is True
    assert resolve_feature_cache("false", "align") is False

    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    data = prepare_stage_data(_dataset(), vlm, processor, "prealign", use_feature_cache="auto", cache_dir=tmp_path)
    assert not data.use_feature_cache and data.data_collator is None and data.prepared.cache is None
    assert isinstance(data.train_dataset.features["images"].feature, Image)  # pixels, for TRL's own collator
    assert not any(tmp_path.iterdir())


def test_bad_rows_are_set_aside_and_listed(tmp_path):
    good = [[_image(rgb)] for rgb in COLORS.values()]
    rows = good[:2] + [
        [{"bytes": None, "path": str(tmp_path / "gone.png")}],  # missing file
        [{"bytes": b"not an image at all", "path": None}],  # corrupt bytes
        [None],  # no image data
        [_image((9, 9, 9)), _image((8, 8, 8))],  # two images for one placeholder
    ] + good[2:]
    captions = [f"caption {i}" for i in range(len(rows))]
    messages = [_messages(c) for c in captions]
    dataset = Dataset.from_dict(
        {"images": rows, "messages": messages, "image_id": [f"img-{i}" for i in range(len(rows))]}, features=FEATURES
    )
    prepared = prepare_image_rows(dataset)
    assert prepared.total == 8 and len(prepared.dataset) == 4
    assert prepared.dataset["image_id"] == ["img-0", "img-1", "img-6", "img-7"]
    assert [(r["row"], r["id"], r["reason"]) for r in prepared.rejects] == [
        (2, "img-2", MISSING_IMAGE), (3, "img-3", CORRUPT_IMAGE), (4, "img-4", MISSING_IMAGE), (5, "img-5", IMAGE_COUNT),
    ]
    assert "skipped 4 of 8 rows" in prepared.summary()
    # A shuffled dataset (an indices mapping, as every training mixture): the same rows and hashes as add_column
    # after flatten_indices gives, gathered without rewriting each row.
    shuffled = dataset.shuffle(seed=0)
    fast = prepare_image_rows(shuffled).dataset
    usable = set(prepared.dataset["image_id"])
    slow = shuffled.select([i for i, image_id in enumerate(shuffled["image_id"]) if image_id in usable]).flatten_indices()
    slow = slow.add_column("image_hashes", fast["image_hashes"], feature=fast.features["image_hashes"])
    assert fast.features == slow.features and fast.with_format("arrow")[:].equals(slow.with_format("arrow")[:])
    by_id = dict(zip(prepared.dataset["image_id"], prepared.dataset["image_hashes"]))
    assert fast["image_hashes"] == [by_id[image_id] for image_id in fast["image_id"]]
    RejectReport("images", prepared.total, prepared.rejects).write(tmp_path / "out" / "rejects.jsonl")
    lines = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(line)["reason"] for line in lines] == [r["reason"] for r in prepared.rejects]

    with pytest.raises(ValueError, match="empty"):
        prepare_image_rows(dataset.select([]))
    with pytest.raises(ValueError, match="no usable rows: all 2 rows"):
        prepare_image_rows(dataset.select([2, 3]))


def test_load_or_build_needs_exactly_one_source(tiny_parts, tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_or_build_vlm()
    with pytest.raises(ValueError, match="both"):
        load_or_build_vlm(str(tmp_path), vision=[tiny_parts["siglip"]], text=tiny_parts["llama"])
    with pytest.raises(ValueError, match="needs both vision and text"):
        load_or_build_vlm(vision=[tiny_parts["siglip"]])
    vlm, processor = load_or_build_vlm(vision=[tiny_parts["siglip"]], text=tiny_parts["llama"], fusion="cross_attention")
    vlm.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    loaded, _ = load_or_build_vlm(str(tmp_path / "vlm"))
    assert loaded.config.fusion == "cross_attention"


def test_cache_command_fills_the_cache_training_reads(tiny_parts, tmp_path):
    from datasets import DatasetDict

    from model.pretrain import cache_features_main

    vlm, processor = build_vlm([tiny_parts["siglip"], tiny_parts["clip"]], tiny_parts["llama"])
    vlm.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    dataset = _dataset()
    DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "data"))
    argv = ["--model", str(tmp_path / "vlm"), "--dataset", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache")]
    assert cache_features_main(argv).encoded == 4
    # The fingerprint survives save and load: training on the saved VLM finds every image cached.
    loaded, loaded_processor = load_or_build_vlm(str(tmp_path / "vlm"))
    data = prepare_stage_data(dataset, loaded, loaded_processor, "align", cache_dir=tmp_path / "cache")
    assert data.prepared.encoded == 0 and len(data.prepared.cache) == 4


@pytest.mark.parametrize("stage", ["align", "full"])
def test_feature_statistics_are_fitted_on_the_training_images(tiny_parts, tmp_path, stage):
    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    freeze_for_stage(vlm, stage)
    # the first image again in the second row: counted once
    pictures = [_image(rgb) for rgb in COLORS.values()]
    dataset = _dataset(images=[[pictures[0]], [pictures[0]], [pictures[1]], [pictures[2]]])
    data = prepare_stage_data(dataset, vlm, processor, stage, cache_dir=tmp_path)
    assert data.use_feature_cache == (stage == "align")
    report = fit_feature_statistics(vlm, processor, data, max_images=3)
    # the first three distinct images, every patch vector of each
    features = encode_images(vlm, processor, pictures[:3]).reshape(-1, 32)
    mean, std, count = vlm.model.projectors.feature_statistics(0)
    assert report["images"] == 3 and count == report["towers"][0]["patches"] == features.shape[0]
    torch.testing.assert_close(mean, features.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, features.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    assert vlm.model.projectors.standardized
    with pytest.raises(ValueError, match="max_images"):
        fit_feature_statistics(vlm, processor, data, max_images=0)


DOCUMENTS = ["a red circle left of a blue square.", "Question: How many circles are there? Answer: 2",
             "three green triangles."]


def test_text_rows_are_added_as_the_asked_fraction():
    images = _dataset()
    mixed = mix_text_rows(images, DOCUMENTS, 0.5, seed=0)
    documents = [text_row_document(row) for row in mixed]
    assert len(mixed) == 2 * len(images) and sum(doc is not None for doc in documents) == len(images)
    # Drawn without replacement first: each document once before any twice.
    assert sorted(doc for doc in documents if doc is not None)[:3] == sorted(DOCUMENTS)
    assert all(row["images"] == [] for row, doc in zip(mixed, documents) if doc is not None)
    assert mix_text_rows(images, DOCUMENTS, 0.0) is images
    with pytest.raises(ValueError, match="no non-empty document"):
        mix_text_rows(images, ["", "  "], 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        mix_text_rows(images, DOCUMENTS, 1.0)


@pytest.mark.parametrize("fusion,cached", [("prepend", True), ("cross_attention", True), ("cross_attention", False)])
def test_a_mixed_batch_gives_each_row_what_it_gives_alone(tiny_parts, tmp_path, fusion, cached):
    """Image rows and text-only rows in one batch: each image row's logits are those of the image rows batched
    alone, each text row's those of the LLM on `<bos> text <eos>` alone, and only text tokens and assistant tokens
    are labels."""
    from transformers import AutoModelForCausalLM

    vlm, processor = build_vlm([tiny_parts["siglip"]], tiny_parts["llama"], fusion=fusion)
    _open_gates(vlm)
    vlm.eval()
    freeze_for_stage(vlm, "finetune")
    data = prepare_stage_data(dataset := _dataset(), vlm, processor, "finetune", use_feature_cache=str(cached).lower(),
                              cache_dir=tmp_path, assistant_only_loss=True)
    image_collator = data.data_collator or vision_collator(processor, assistant_only_loss=True)
    collator = TextMixCollator(image_collator, processor.tokenizer, max_length=64)
    mixed = mix_text_rows(data.train_dataset, DOCUMENTS[:2], 2 / 6, seed=1)
    examples = [mixed[i] for i in range(len(mixed))]
    is_text = [text_row_document(example) is not None for example in examples]
    assert sum(is_text) == 2 and len(dataset) == 4
    batch = collator(examples)
    alone = image_collator([example for example, text in zip(examples, is_text) if not text])
    texts = encode_documents(processor.tokenizer, [text_row_document(e) for e in examples if text_row_document(e)], 64)

    n, width = alone["input_ids"].shape
    assert batch["input_ids"].shape[0] == 6
    torch.testing.assert_close(batch["labels"][:n, :width], alone["labels"], rtol=0, atol=0)
    assert (batch["labels"][:n, width:] == -100).all() and (batch["attention_mask"][:n, width:] == 0).all()
    for row, ids in enumerate(texts, start=n):
        assert batch["input_ids"][row, : len(ids)].tolist() == ids == batch["labels"][row, : len(ids)].tolist()
        assert (batch["labels"][row, len(ids):] == -100).all() and batch["attention_mask"][row].sum() == len(ids)

    llm = AutoModelForCausalLM.from_pretrained(tiny_parts["llama"]).eval()
    with torch.no_grad():
        together = vlm(**batch).logits
        images_alone = vlm(**alone).logits
        mask = alone["attention_mask"].bool()
        torch.testing.assert_close(together[:n, :width][mask], images_alone[mask], rtol=0, atol=1e-5)
        for row, ids in enumerate(texts, start=n):
            expected = llm(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(together[row, : len(ids)], expected, rtol=0, atol=1e-5)
    # A batch of text rows only, and one of image rows only (the image collator's batch unchanged).
    text_only = collator([e for e, text in zip(examples, is_text) if text])
    assert text_only["input_ids"].shape[0] == 2 and "image_features" not in text_only and "pixel_values" not in text_only
    only_images = collator([e for e, text in zip(examples, is_text) if not text])
    assert all(torch.equal(only_images[key], alone[key]) for key in alone if torch.is_tensor(alone[key]))
