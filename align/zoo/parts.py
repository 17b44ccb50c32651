"""Pretraining of the tiny parts the embedded default builds from: a SigLIP vision encoder and a Llama LLM.

Both are ordinary transformers checkpoints (`SiglipVisionModel`, `LlamaForCausalLM`) trained with the
objectives their real counterparts were trained with, so every later stage loads them by path exactly
as it would load `google/siglip-*` or `meta-llama/*`. Training runs on transformers' `Trainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    Trainer,
    TrainingArguments,
)


@dataclass
class SiglipPartConfig:
    """Size and training schedule of the tiny SigLIP encoder."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    text_hidden_size: int = 64
    text_layers: int = 2
    text_max_length: int = 64
    # With the patch-attribute loss, 400 steps leave shape at 82% from the object's patch, 600 reach 99% (README has the
    # figures); the part is shipped, so make demo does not pay for its steps.
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    # Weight of the patch-attribute loss next to SigLIP's (used when `pretrain_siglip` gets patch labels).
    patch_loss_weight: float = 10.0


@dataclass
class LlamaPartConfig:
    """Size and training schedule of the tiny Llama LLM (the default teacher-sized LLM)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    block_size: int = 128
    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    extra: dict = field(default_factory=dict)


def siglip_configs(cfg: SiglipPartConfig, tokenizer: PreTrainedTokenizerBase) -> SiglipConfig:
    """The dual-encoder config: the vision tower is the part, the text tower only serves the loss."""
    vocab_size, pad_token_id = len(tokenizer), tokenizer.pad_token_id
    bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    vision = SiglipVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
    )
    text = SiglipTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=4 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.text_max_length,
        projection_size=cfg.hidden_size,  # SigLIP compares text embeddings with the vision width
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


def siglip_image_processor(image_size: int) -> SiglipImageProcessor:
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


class _PairDataset(Dataset):
    def __init__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, patch_labels: torch.Tensor | None = None):
        self.pixel_values, self.input_ids, self.patch_labels = pixel_values, input_ids, patch_labels

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        row = {"pixel_values": self.pixel_values[i], "input_ids": self.input_ids[i]}
        if self.patch_labels is not None:
            row["patch_labels"] = self.patch_labels[i]
        return row


def _collate_pairs(rows):
    return {**{key: torch.stack([r[key] for r in rows]) for key in rows[0]}, "return_loss": True}


class _PatchSupervisedSiglipTrainer(Trainer):
    """SigLIP's sigmoid loss plus a dense auxiliary loss: linear heads (`model.patch_heads`, one per attribute) name,
    from a patch's output feature, the attributes of the object at that patch (cross-entropy over the labelled
    patches; -100 elsewhere).

    Why: the VLM reads the tower's patch grid, so each object's patches must say what the object is. A real SigLIP
    gets that from billions of pairs; 300 steps of the world's captions teach the tiny tower colors and places but no
    shapes (`python -m align.probe --encoder`: shape from the object's patch no better than a random-init tower),
    because in-batch negatives differ in their colors long before their shapes. The scene graph supervises it
    directly, as detection or region-caption data does for real encoders. `SiglipModel` computes only its own loss,
    so the auxiliary term is added here, on the vision tower's outputs it returns.
    """

    def __init__(self, *args, patch_loss_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.patch_loss_weight = patch_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("patch_labels")  # (batch, attributes, patches)
        outputs = model(**inputs)
        hidden = outputs.vision_model_output.last_hidden_state
        patch_loss = sum(
            torch.nn.functional.cross_entropy(head(hidden).transpose(1, 2), labels[:, k], ignore_index=-100)
            for k, head in enumerate(model.patch_heads)
        )
        if model.training and self.state.global_step % self.args.logging_steps == 0:
            self.log({"patch_loss": patch_loss.item()})  # next to the total loss in the log history
        loss = outputs.loss + self.patch_loss_weight * patch_loss
        return (loss, outputs) if return_outputs else loss


def encode_pairs(images: list[Image.Image], captions: list[str], tokenizer, image_processor, max_length: int):
    """Pixel tensors and fixed-length caption ids (SigLIP's text tower is trained on max-length padding)."""
    pixel_values = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    input_ids = tokenizer(
        captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )["input_ids"]
    return pixel_values, input_ids


def _training_args(output_dir: str, steps: int, batch_size: int, lr: float, seed: int, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **kwargs,
    )


def pretrain_siglip(
    images: list[Image.Image],
    captions: list[str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: SiglipPartConfig,
    output_dir: str,
    patch_labels: torch.Tensor | None = None,
    patch_classes: list[int] | None = None,
) -> tuple[SiglipModel, SiglipImageProcessor, list[dict]]:
    """Train a tiny SigLIP dual encoder with the pairwise sigmoid loss (arXiv:2303.15343).

    `patch_labels` (images x attributes x patches, class indices, -100 where no object is labelled), with the
    number of classes of each attribute in `patch_classes`, adds the patch-attribute loss of
    `_PatchSupervisedSiglipTrainer` at `cfg.patch_loss_weight`; its heads are dropped after training.

    Returns:
        The trained dual encoder, its image processor, and the trainer's log history.
    """
    patches = (cfg.image_size // cfg.patch_size) ** 2
    if patch_labels is not None:
        if patch_classes is None or patch_labels.shape != (len(images), len(patch_classes), patches):
            raise ValueError(f"patch_labels must have shape (images, attributes, patches) = ({len(images)}, "
                             f"{len(patch_classes or [])}, {patches}) with patch_classes naming each attribute's class "
                             f"count, got {tuple(patch_labels.shape)} and {patch_classes}")
        for k, count in enumerate(patch_classes):
            values = patch_labels[:, k][patch_labels[:, k] != -100]
            if len(values) and (values.min() < 0 or values.max() >= count):
                raise ValueError(f"patch_labels of attribute {k} hold class indices outside 0..{count - 1}")
    torch.manual_seed(cfg.seed)
    model = SiglipModel(siglip_configs(cfg, tokenizer))
    # SigLIP's recommended init: t' = log 10, b = -10, so the many negatives do not dominate early steps.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    processor = siglip_image_processor(cfg.image_size)
    pixel_values, input_ids = encode_pairs(images, captions, tokenizer, processor, cfg.text_max_length)
    # The patch labels are no argument of SiglipModel.forward: keep them in the batch for compute_loss.
    args = _training_args(output_dir, cfg.steps, cfg.batch_size, cfg.learning_rate, cfg.seed,
                          remove_unused_columns=patch_labels is None)
    dataset = _PairDataset(pixel_values, input_ids, patch_labels)
    if patch_labels is None:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate_pairs)
    else:
        model.patch_heads = torch.nn.ModuleList(torch.nn.Linear(cfg.hidden_size, n) for n in patch_classes)
        trainer = _PatchSupervisedSiglipTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=_collate_pairs,
            patch_loss_weight=cfg.patch_loss_weight,
        )
    trainer.train()
    if patch_labels is not None:
        del model.patch_heads  # not part of SigLIP: the saved dual encoder and tower are the plain architecture
    return model.eval(), processor, trainer.state.log_history


@torch.no_grad()
def retrieval_accuracy(
    model: SiglipModel,
    images: list[Image.Image],
    captions: list[str],
    tokenizer: PreTrainedTokenizerBase,
    image_processor,
    max_length: int,
    candidates: int = 100,
) -> float:
    """Image->caption top-1 accuracy, each image against groups of `candidates` captions (its own among them)."""
    model.eval()
    correct = total = 0
    for start in range(0, len(images) - candidates + 1, candidates):
        pixel_values, input_ids = encode_pairs(
            images[start : start + candidates], captions[start : start + candidates], tokenizer, image_processor, max_length
        )
        out = model(pixel_values=pixel_values, input_ids=input_ids)
        pred = out.logits_per_image.argmax(dim=-1)
        correct += (pred == torch.arange(len(pred))).sum().item()
        total += len(pred)
    if total == 0:
        raise ValueError(f"retrieval needs at least {candidates} image-caption pairs, got {len(images)}")
    return correct / total


def llama_config(cfg: LlamaPartConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **cfg.extra,
    )


def pack_documents(texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Tokenize documents as `<bos> text <eos>` (eos added unless present), concatenate, cut into full blocks."""
    eos = tokenizer.eos_token
    ids = tokenizer([t if t.endswith(eos) else t + eos for t in texts], add_special_tokens=False)["input_ids"]
    flat = np.fromiter((tok for doc in ids for tok in (tokenizer.bos_token_id, *doc)), dtype=np.int64)
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise ValueError(f"the corpus has {len(flat)} tokens, fewer than one block of {block_size}")
    return torch.from_numpy(flat[: n_blocks * block_size].reshape(n_blocks, block_size))


class _BlockDataset(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i]}


def pretrain_llama(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: LlamaPartConfig, output_dir: str
) -> tuple[LlamaForCausalLM, list[dict]]:
    """Train a tiny Llama (grouped-query attention) with next-token loss on packed documents."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    blocks = pack_documents(texts, tokenizer, cfg.block_size)
    trainer = Trainer(
        model=model,
        args=_training_args(output_dir, cfg.steps, cfg.batch_size, cfg.learning_rate, cfg.seed),
        train_dataset=_BlockDataset(blocks),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    return model.eval(), trainer.state.log_history


@torch.no_grad()
def perplexity(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int, batch_size: int = 32) -> float:
    """Token-level perplexity of `model` on packed held-out documents."""
    model.eval()
    blocks = pack_documents(texts, tokenizer, block_size)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        out = model(input_ids=batch, labels=batch)
        n = batch[:, 1:].numel()
        total_nll += out.loss.item() * n
        total_tokens += n
    return math.exp(total_nll / total_tokens)
