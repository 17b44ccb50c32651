"""Build the embedded default: the shapes world, a tokenizer, and tiny pretrained parts.

    python -m align.zoo                      # builds into .cache/zoo (or $VLM_ALIGN_CACHE)
    python -m align.zoo --cache_dir DIR --force

Each part is written to its own folder as an ordinary Hugging Face checkpoint and marked valid by a
manifest written last, so a killed build redoes only the unfinished part and a rerun skips what is
built. The quality figures (encoder retrieval, LM perplexity, each against a random-init twin) are
printed and saved to `quality.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, HfArgumentParser, LlamaForCausalLM, SiglipModel

from align.paths import default_cache_dir
from align.world import SIZES, Scene, WorldConfig, build_world, object_documents, text_corpus
from model.parts import (
    LlamaPartConfig,
    SiglipPartConfig,
    llama_config,
    perplexity,
    pretrain_llama,
    pretrain_siglip,
    retrieval_accuracy,
    siglip_configs,
)
from model.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

MANIFEST = "zoo_manifest.json"
PARTS = ("world", "tokenizer", "siglip", "llama")


@dataclass
class ZooConfig:
    """What the default build makes; every field is a CLI flag of `python -m align.zoo`."""

    cache_dir: str | None = field(default=None, metadata={"help": "Output folder (default: .cache/zoo or $VLM_ALIGN_CACHE)."})
    seed: int = field(default=0, metadata={"help": "Seed of the world splits and of the parts' training."})
    train_images: int = field(default=4000, metadata={"help": "Images in the world's train split."})
    validation_images: int = field(default=200, metadata={"help": "Images in the validation split."})
    test_images: int = field(default=500, metadata={"help": "Images in the test split."})
    image_size: int = field(default=64, metadata={"help": "Rendered image side in pixels."})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size, special tokens included."})
    tokenizer_answer_lines: bool = field(
        default=False,
        metadata={"help": "Also train the tokenizer on each image's answers one per line, so answers at the start of "
                  "a chat turn become whole tokens (`tokenizer_documents`)."},
    )
    llm_object_documents: bool = field(
        default=False,
        metadata={"help": "Also pretrain the LLM on one short description-then-Q&A document per object "
                  "(`align.world.object_documents`), from which it learns to answer from its context."},
    )
    llm_captioned_chats: bool = field(
        default=False,
        metadata={"help": "Pretrain the LLM on the conversations with each image item replaced by the image's detailed "
                  "caption, rather than dropped: every answer then follows a description it can be read from, in "
                  "the place the visual tokens take in the VLM."},
    )
    siglip_steps: int = field(default=SiglipPartConfig.steps, metadata={"help": "SigLIP training steps."})
    siglip_patch_loss: float = field(
        default=SiglipPartConfig.patch_loss_weight,
        metadata={"help": "Weight of the patch-attribute loss next to SigLIP's (each object's patch names its color, "
                  "shape and size, from the scene graph); 0 trains on the captions alone."},
    )
    llama_steps: int = field(default=LlamaPartConfig.steps, metadata={"help": "Llama training steps."})
    llama_layers: int = field(default=LlamaPartConfig.num_layers, metadata={"help": "Llama decoder layers."})
    llama_hidden_size: int = field(default=LlamaPartConfig.hidden_size, metadata={"help": "Llama hidden size."})
    force: bool = field(default=False, metadata={"help": "Rebuild every part even if a valid one exists."})

    def __post_init__(self):
        for name in ("train_images", "validation_images", "test_images", "siglip_steps", "llama_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.siglip_patch_loss >= 0:
            raise ValueError(f"siglip_patch_loss must be >= 0, got {self.siglip_patch_loss}")
        if self.test_images < 100:
            raise ValueError(f"test_images must be at least 100 (retrieval ranks among 100 captions), got {self.test_images}")

    @property
    def root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def siglip(self) -> SiglipPartConfig:
        return SiglipPartConfig(
            image_size=self.image_size, steps=self.siglip_steps, seed=self.seed, patch_loss_weight=self.siglip_patch_loss
        )

    def llama(self) -> LlamaPartConfig:
        return LlamaPartConfig(
            steps=self.llama_steps, num_layers=self.llama_layers, hidden_size=self.llama_hidden_size,
            intermediate_size=3 * self.llama_hidden_size, seed=self.seed,
        )


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class _Part:
    """Builds into `<name>.partial` and renames it into place with its manifest, so only whole parts count."""

    def __init__(self, root: Path, name: str, fingerprint: str, force: bool):
        self.final, self.tmp, self.fingerprint = root / name, root / f"{name}.partial", fingerprint
        manifest = None if force else read_manifest(self.final)
        self.manifest = manifest if manifest and manifest.get("fingerprint") == fingerprint else None

    @property
    def valid(self) -> bool:
        return self.manifest is not None

    def start(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.t0 = time.time()
        return self.tmp

    def finish(self, quality: dict) -> dict:
        self.manifest = {"fingerprint": self.fingerprint, "seconds": round(time.time() - self.t0, 1), "quality": quality}
        (self.tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        shutil.rmtree(self.final, ignore_errors=True)
        self.tmp.rename(self.final)
        return self.manifest


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


def _siglip_part(cfg: ZooConfig, tokenizer_fingerprint: str) -> _Part:
    return _Part(cfg.root, "siglip", _fingerprint(tokenizer_fingerprint, asdict(cfg.siglip())), cfg.force)


def _llama_part(cfg: ZooConfig, tokenizer_fingerprint: str) -> _Part:
    # As for the tokenizer, the option enters the fingerprint only when on, so built zoos stay valid.
    extra = ("object-documents",) if cfg.llm_object_documents else ()
    extra += ("captioned-chats",) if cfg.llm_captioned_chats else ()
    return _Part(cfg.root, "llama", _fingerprint(tokenizer_fingerprint, asdict(cfg.llama()), *extra), cfg.force)


def _build_siglip(cfg: ZooConfig, part: _Part, world: datasets.DatasetDict, tokenizer) -> None:
    siglip_cfg = cfg.siglip()
    logger.info("pretraining the SigLIP encoder (%d steps)", siglip_cfg.steps)
    out = part.start()
    train = world["train"]
    images = [row[0] for row in train["images"]]
    patch_labels, patch_classes = None, None
    if siglip_cfg.patch_loss_weight > 0:
        patch_labels, patch_classes = object_patch_labels(train["scene"], WorldConfig(image_size=cfg.image_size), siglip_cfg)
    dual, image_processor, history = pretrain_siglip(
        images, list(train["caption_detailed"]), tokenizer, siglip_cfg, str(out / "trainer"),
        patch_labels=patch_labels, patch_classes=patch_classes,
    )
    shutil.rmtree(out / "trainer", ignore_errors=True)
    test = world["test"]
    test_images, test_captions = [row[0] for row in test["images"]], list(test["caption_detailed"])
    torch.manual_seed(siglip_cfg.seed)
    random_dual = SiglipModel(siglip_configs(siglip_cfg, tokenizer))
    args = (test_images, test_captions, tokenizer, image_processor, siglip_cfg.text_max_length)
    quality = {
        "retrieval_top1_of_100": retrieval_accuracy(dual, *args),
        "retrieval_top1_of_100_random_init": retrieval_accuracy(random_dual, *args),
        "final_train_loss": _last_loss(history),
    }
    # The vision tower alone is the part; the dual encoder is kept for retrieval-style scoring.
    dual.vision_model.save_pretrained(out)  # a SiglipVisionModel
    image_processor.save_pretrained(out)
    dual.save_pretrained(out / "dual")
    # What the patch grid says about each object (align.probe --encoder), against a random-init twin.
    from align.probe import OBJECT_ATTRIBUTES, encoder_object_probe

    objects = encoder_object_probe(str(out), train, images=min(600, len(train)))
    for key in ("trained", "random_init"):
        suffix = "" if key == "trained" else "_random_init"
        quality[f"object_probe{suffix}"] = {a: objects[key][a]["probe"] for a in OBJECT_ATTRIBUTES}
    quality["object_probe_majority"] = {a: objects["trained"][a]["majority"] for a in OBJECT_ATTRIBUTES}
    part.finish(quality)


def _build_llama(cfg: ZooConfig, part: _Part, world: datasets.DatasetDict, tokenizer) -> None:
    llama_cfg = cfg.llama()
    logger.info("pretraining the Llama LLM (%d steps)", llama_cfg.steps)
    out = part.start()
    documents = lm_documents(world, "train", tokenizer, objects=cfg.llm_object_documents, captioned_chats=cfg.llm_captioned_chats)
    model, history = pretrain_llama(documents, tokenizer, llama_cfg, str(out / "trainer"))
    shutil.rmtree(out / "trainer", ignore_errors=True)
    held_out = lm_documents(world, "test", tokenizer)
    torch.manual_seed(llama_cfg.seed)
    random_lm = LlamaForCausalLM(llama_config(llama_cfg, tokenizer))
    quality = {
        "test_perplexity": perplexity(model, tokenizer, held_out, llama_cfg.block_size),
        "test_perplexity_random_init": perplexity(random_lm, tokenizer, held_out, llama_cfg.block_size),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": _last_loss(history),
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    part.finish(quality)


def build_zoo(cfg: ZooConfig) -> dict:
    """Build (or reuse) world, tokenizer, SigLIP encoder and Llama LLM under `cfg.root`; return the quality figures."""
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}

    world_cfg = WorldConfig(image_size=cfg.image_size)
    sizes = {"train": cfg.train_images, "validation": cfg.validation_images, "test": cfg.test_images}
    part = _Part(root, "world", _fingerprint(asdict(world_cfg), sizes, cfg.seed), cfg.force)
    if not part.valid:
        logger.info("building the shapes world %s", sizes)
        out = part.start()
        build_world(str(out), sizes=sizes, config=world_cfg, seed=cfg.seed)
        part.finish({"images": sizes})
    report["world"] = part.manifest
    world = datasets.load_from_disk(str(root / "world"))

    # The default fingerprint is left as it was before `tokenizer_answer_lines` existed, so built zoos stay valid.
    extra = ("line-initial-answers",) if cfg.tokenizer_answer_lines else ()
    part = _Part(root, "tokenizer", _fingerprint(part.fingerprint, cfg.vocab_size, *extra), cfg.force)
    if not part.valid:
        logger.info("training a %d-token BPE tokenizer", cfg.vocab_size)
        out = part.start()
        documents = tokenizer_documents(world, "train", cfg.tokenizer_answer_lines)
        tokenizer = train_tokenizer(documents, vocab_size=cfg.vocab_size)
        tokenizer.save_pretrained(out)
        part.finish({"vocab_size": len(tokenizer)})
    report["tokenizer"] = part.manifest
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")

    siglip_part, llama_part = _siglip_part(cfg, part.fingerprint), _llama_part(cfg, part.fingerprint)
    if not siglip_part.valid:
        _build_siglip(cfg, siglip_part, world, tokenizer)
    if not llama_part.valid:
        _build_llama(cfg, llama_part, world, tokenizer)
    report["siglip"], report["llama"] = siglip_part.manifest, llama_part.manifest

    (root / "quality.json").write_text(json.dumps(report, indent=2))
    return report


def _last_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def _object_probe_row(quality: dict) -> list[str]:
    """The object probe's row, for zoos built since it was measured."""
    if "object_probe" not in quality:
        return []
    def triple(figures):
        return " / ".join(f"{figures[a]:.1%}" for a in ("color", "shape", "size"))
    return [
        f"| SigLIP encoder | object color / shape / size from its patch, linear probe (majority "
        f"{triple(quality['object_probe_majority'])}) | {triple(quality['object_probe'])} "
        f"| {triple(quality['object_probe_random_init'])} | |"
    ]


def format_quality(report: dict) -> str:
    """The quality figures as a small Markdown table."""
    sig, lm = report["siglip"]["quality"], report["llama"]["quality"]
    rows = [
        "| part | metric | trained | random init | build (s) |",
        "|---|---|---|---|---|",
        f"| SigLIP encoder | image->caption top-1 of 100 (test) | {sig['retrieval_top1_of_100']:.1%} "
        f"| {sig['retrieval_top1_of_100_random_init']:.1%} | {report['siglip']['seconds']} |",
        *_object_probe_row(sig),
        f"| Llama LLM ({lm['parameters'] / 1e6:.2f}M params) | perplexity (test) | {lm['test_perplexity']:.2f} "
        f"| {lm['test_perplexity_random_init']:.1f} | {report['llama']['seconds']} |",
    ]
    return "\n".join(rows)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (cfg,) = HfArgumentParser(ZooConfig).parse_args_into_dataclasses(args=argv)
    t0 = time.time()
    report = build_zoo(cfg)
    print(f"\nParts in {cfg.root} ({time.time() - t0:.0f} s this run)\n")
    print(format_quality(report))
    return report


if __name__ == "__main__":
    main()
