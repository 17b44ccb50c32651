"""The tiny parts' training text and labels, from the shapes world: the LLM's documents, the tokenizer's text, and
the patch labels of SigLIP's patch-attribute loss."""

from __future__ import annotations

import json

import datasets
import torch

from align.world import SIZES, Scene, WorldConfig, object_documents, text_corpus
from align.zoo.parts import SiglipPartConfig


def lm_documents(
    world: datasets.DatasetDict, split: str, tokenizer=None, objects: bool = False, captioned_chats: bool = False
) -> list[str]:
    """Plain-text documents (captions, Q&A lines; with `objects`, also `object_documents`) and, given a tokenizer,
    the conversations in its chat format without their image items (with `captioned_chats`, each image item
    replaced by the image's detailed caption and a newline): the LLM learns the world's language and the chat
    markers, not the images."""
    part = world[split]
    docs = text_corpus(part) + (object_documents(part) if objects else [])
    if tokenizer is not None:
        for messages, caption in zip(part["messages"], part["caption_detailed"]):
            image = [{"type": "text", "text": caption + "\n"}] if captioned_chats else []
            text_only = [
                {"role": m["role"], "content": [c for item in m["content"] for c in (image if item["type"] == "image" else [item])]}
                for m in messages
            ]
            rendered = tokenizer.apply_chat_template(text_only, tokenize=False)
            docs.append(rendered.removeprefix(tokenizer.bos_token or "").rstrip("\n"))
    return docs


def tokenizer_documents(world: datasets.DatasetDict, split: str, answer_lines: bool = False) -> list[str]:
    """The tokenizer's training text: the LM documents and, with `answer_lines`, each image's answers one per line.

    In the chat format an answer starts a line (after `<|assistant|>\n`), where byte-level BPE sees a word without
    its leading space; the LM documents hold answers only after "Answer: ", so no merge covers line-initial words and
    the default tokenizer spells every answer in pieces ("b", "lu", "e"; "y" starts both "yes" and "yellow").
    """
    documents = text_corpus(world[split])
    if answer_lines:
        documents += ["\n".join(r["answer"] for r in json.loads(qs)) for qs in world[split]["questions"]]
    return documents


def object_patch_labels(scenes: list[str], world: WorldConfig, cfg: SiglipPartConfig) -> tuple[torch.Tensor, list[int]]:
    """Patch labels for SigLIP's patch-attribute loss: for each image, each object's color, shape and size (indices
    into the world's lists) at the patch holding a pixel inside its shape (the patch `align.probe --encoder` reads),
    -100 at every other patch. Returns the labels (images x 3 x patches) and the class count of each attribute."""
    from align.probe import object_patch

    values = {"color": list(world.colors), "shape": list(world.shapes), "size": list(SIZES)}
    labels = torch.full((len(scenes), len(values), (cfg.image_size // cfg.patch_size) ** 2), -100, dtype=torch.long)
    for i, scene_json in enumerate(scenes):
        scene = Scene.from_json(scene_json)
        for obj in scene.objects:
            patch = object_patch(obj, scene.image_size, cfg.image_size, cfg.patch_size)
            for k, (name, names) in enumerate(values.items()):
                labels[i, k, patch] = names.index(getattr(obj, name))
    return labels, [len(names) for names in values.values()]


def patch_position_labels(images: int, cfg: SiglipPartConfig) -> tuple[torch.Tensor, list[int]]:
    """Patch labels of where each patch is, for the patch-attribute loss: every patch's column and row in the grid
    (images x 2 x patches), the same for every image, and the class count of each (the grid's side).

    SigLIP's loss and the object targets never ask where a patch is, and training washes its position embeddings out
    of the output (`align.probe --encoder`: the column of an object's patch at 23% against the random-init twin's
    41%); a VLM then finds two named objects among its visual tokens but cannot compare their places. Asking each
    patch its own place keeps it, as detection and segmentation data keep it in real towers."""
    grid = cfg.image_size // cfg.patch_size
    index = torch.arange(grid * grid)
    labels = torch.stack([index % grid, index // grid]).expand(images, -1, -1).clone()
    return labels, [grid, grid]
