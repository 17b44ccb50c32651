"""Build the embedded default: the shapes world, a tokenizer, tiny pretrained parts and a base VLM that sees.

    python -m align.zoo                      # installs the shipped parts into .cache/zoo (or $VLM_ALIGN_CACHE)
    python -m align.zoo --force              # trains every part here instead (about an hour on 2 CPU cores)
    python -m align.zoo --force --ship       # ... and ships the result (maintainers, after changing a part's code)

Each part is written to its own folder as an ordinary Hugging Face checkpoint and marked valid by a
manifest written last, so a killed build redoes only the unfinished part and a rerun skips what is
built. A part's fingerprint covers its settings, the fingerprints of the parts it is built from and the code that
builds it (`code_fingerprint`: parsed code, so comments and docstrings do not count). The parts are shipped with
the package (`align/default_parts/`, safetensors with a manifest of checksums); a part whose shipped fingerprint
matches this code and these settings is installed from there instead of trained, any other is trained here.

The parts: `world` (generated, never shipped: it takes seconds), `tokenizer`, `siglip`, `llama`, and `base`, a
prepend-fusion VLM from SigLIP and the LLM through the pretraining stages a real VLM goes through, each a run of
`recipes/pretrain.py` (`BASE_STAGES`): adapter pretraining on captions with the LLM frozen
(`recipes/configs/tiny/pretrain.yaml`), then grounded pretraining, the LLM training too, on the captions and every
question of the world's training images (`pretrain_grounded.yaml`), then annealing, a second pass weighted to what
the first leaves behind (`pretrain_anneal.yaml`, as Llama 3.2's last pretraining stage). Post-training starts from
`base`. The quality figures (encoder retrieval and object probe, LM perplexity, each against a
random-init twin; the base VLM's held-out accuracy per question category) are printed and saved to
`quality.json`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import logging
import platform
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import torch
import transformers
import trl
import yaml
from transformers import AutoTokenizer, HfArgumentParser, LlamaForCausalLM, SiglipModel

from align.paths import REPO_ROOT, SHIPPED_PARTS, default_cache_dir
from align.pipeline import RECIPES, Step, run_step
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
PARTS = ("world", "tokenizer", "siglip", "llama", "base")
SHIPPED = ("tokenizer", "siglip", "llama", "base")  # the world is generated in seconds; the rest is shipped
# The code each part is built by: modules (dotted), repository files (paths) or single functions ("module:name").
WORLD_CODE = ("align.world.scene", "align.world.render", "align.world.language", "align.world.dataset")
TOKENIZER_CODE = ("model.tokenizer", "align.zoo:tokenizer_documents")
SIGLIP_CODE = ("model.parts", "align.zoo:object_patch_labels", "align.probe:object_patch")
LLAMA_CODE = ("model.parts", "align.zoo:lm_documents")
BASE_CODE = (
    "model.build", "model.chat_template", "model.configuration_vlm", "model.cross_attention", "model.feature_cache",
    "model.modeling_vlm", "model.pretrain", "model.processing_vlm", "model.projectors", "model.stages",
    "align.captioning", "recipes/pretrain.py",
)
# The base VLM's pretraining runs of recipes/pretrain.py, in order, each from the previous one's output.
BASE_STAGES = (
    ("stage1", RECIPES / "configs" / "tiny" / "pretrain.yaml"),
    ("grounded", RECIPES / "configs" / "tiny" / "pretrain_grounded.yaml"),
    ("anneal", RECIPES / "configs" / "tiny" / "pretrain_anneal.yaml"),
)


@dataclass
class ZooConfig:
    """What the default build makes; every field is a CLI flag of `python -m align.zoo`."""

    cache_dir: str | None = field(default=None, metadata={"help": "Output folder (default: .cache/zoo or $VLM_ALIGN_CACHE)."})
    seed: int = field(default=0, metadata={"help": "Seed of the world splits and of the parts' training."})
    train_images: int = field(
        default=20000,
        metadata={"help": "Images in the world's train split (grounded pretraining needs many distinct scenes to bind a "
                  "question's object to its patches rather than memorise scenes)."},
    )
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
    base: bool = field(
        default=True,
        metadata={"help": "Also build the base VLM (stage 1, then grounded pretraining, through recipes/pretrain.py)."},
    )
    base_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Steps of each of the base VLM's pretraining runs, in order (default: each config's).",
                  "nargs": "+"},
    )
    base_eval_questions: int = field(
        default=600, metadata={"help": "Held-out test questions the base VLM's quality figures are measured on."}
    )
    force: bool = field(
        default=False, metadata={"help": "Train every part here, even where a built or a shipped one matches."}
    )
    ship: bool = field(
        default=False,
        metadata={"help": "Copy the built parts into align/default_parts with their checksums (maintainers: after "
                  "a part's code or settings changed and `--force` rebuilt it)."},
    )

    def __post_init__(self):
        for name in ("train_images", "validation_images", "test_images", "siglip_steps", "llama_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.base_eval_questions < 1:
            raise ValueError(f"base_eval_questions must be positive, got {self.base_eval_questions}")
        if self.base_steps is not None and (len(self.base_steps) != len(BASE_STAGES) or min(self.base_steps) <= 0):
            raise ValueError(f"base_steps must give {len(BASE_STAGES)} positive step counts ({', '.join(n for n, _ in BASE_STAGES)}), "
                             f"got {self.base_steps}")
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


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _source(entry: str) -> str:
    if entry.endswith(".py"):
        return (REPO_ROOT / entry).read_text()
    module, _, name = entry.partition(":")
    if name:
        return inspect.getsource(getattr(importlib.import_module(module), name))
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"no module {module!r} to fingerprint")
    return Path(spec.origin).read_text()


def code_fingerprint(*entries: str) -> str:
    """Fingerprint of the code that builds a part: modules (`"model.parts"`), repository files
    (`"recipes/pretrain.py"`) or single functions (`"align.zoo:lm_documents"`), as parsed, so comments, docstrings
    and layout do not count and any change in what the code does does."""
    dumps = [ast.dump(_without_docstrings(ast.parse(textwrap.dedent(_source(e)))))
             for e in entries]
    return hashlib.sha256("\n".join(dumps).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest, by path relative to it."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST
    }


def build_environment() -> dict:
    """What a build ran with; the same code and settings rebuild a part bit for bit on the same library versions and
    thread count (torch's CPU kernels reduce in a thread-dependent order)."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "datasets": datasets.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


class _Part:
    """Builds into `<name>.partial` and renames it into place with its manifest, so only whole parts count; a part
    shipped with a matching fingerprint is installed from `SHIPPED_PARTS` instead (unless `force`)."""

    def __init__(self, root: Path, name: str, fingerprint: str, force: bool):
        self.name, self.fingerprint = name, fingerprint
        self.final, self.tmp = root / name, root / f"{name}.partial"
        manifest = None if force else read_manifest(self.final)
        self.manifest = manifest if manifest and manifest.get("fingerprint") == fingerprint else None
        if self.manifest is None and not force and name in SHIPPED:
            self.manifest = self._install_shipped()

    @property
    def valid(self) -> bool:
        return self.manifest is not None

    def _install_shipped(self) -> dict | None:
        shipped = SHIPPED_PARTS / self.name
        manifest = read_manifest(shipped)
        if manifest is None:
            return None
        if manifest["fingerprint"] != self.fingerprint:
            logger.info("the shipped %s part was built from other code or settings (fingerprint %s, here %s): "
                        "building it here", self.name, manifest["fingerprint"], self.fingerprint)
            return None
        found = file_checksums(shipped)
        for path, checksum in manifest["files"].items():
            if found.get(path) != checksum:
                raise ValueError(f"shipped part {self.name}: {shipped / path} is missing or does not match its checksum "
                                 f"in {shipped / MANIFEST} (a Git LFS pointer or a damaged checkout?)")
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.copytree(shipped, self.tmp)
        shutil.rmtree(self.final, ignore_errors=True)
        self.tmp.rename(self.final)
        logger.info("installed the shipped %s part (built in %s s)", self.name, manifest.get("seconds"))
        return manifest

    def start(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.t0 = time.time()
        return self.tmp

    def finish(self, quality: dict) -> dict:
        self.manifest = {
            "fingerprint": self.fingerprint, "seconds": round(time.time() - self.t0, 1), "quality": quality,
            "built_with": build_environment(),
        }
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
    fingerprint = _fingerprint(tokenizer_fingerprint, asdict(cfg.siglip()), code_fingerprint(*SIGLIP_CODE))
    return _Part(cfg.root, "siglip", fingerprint, cfg.force)


def _llama_part(cfg: ZooConfig, tokenizer_fingerprint: str) -> _Part:
    extra = ("object-documents",) if cfg.llm_object_documents else ()
    extra += ("captioned-chats",) if cfg.llm_captioned_chats else ()
    fingerprint = _fingerprint(tokenizer_fingerprint, asdict(cfg.llama()), code_fingerprint(*LLAMA_CODE), *extra)
    return _Part(cfg.root, "llama", fingerprint, cfg.force)


def _base_overrides(cfg: ZooConfig) -> list[dict]:
    """Command-line overrides of the base VLM's pretraining runs (the parts and world of this zoo), one per stage."""
    overrides = []
    for index, _ in enumerate(BASE_STAGES):
        stage = {"world_path": cfg.root / "world", "seed": cfg.seed}
        if index == 0:
            stage.update(vision=cfg.root / "siglip", text=cfg.root / "llama", eval_captions=0)
        if cfg.base_steps is not None:
            stage["max_steps"] = cfg.base_steps[index]
        overrides.append(stage)
    return overrides


def _base_part(cfg: ZooConfig, siglip: _Part, llama: _Part) -> _Part:
    configs = [yaml.safe_load(path.read_text()) for _, path in BASE_STAGES]
    overrides = [{k: v for k, v in o.items() if k not in ("vision", "text", "world_path")} for o in _base_overrides(cfg)]
    fingerprint = _fingerprint(siglip.fingerprint, llama.fingerprint, configs, overrides, code_fingerprint(*BASE_CODE))
    return _Part(cfg.root, "base", fingerprint, cfg.force)


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


def _build_base(cfg: ZooConfig, part: _Part) -> None:
    """The base VLM: `recipes/pretrain.py` with each config of `BASE_STAGES`, each run from the previous one's output
    and in a process of its own as a user runs them; then `recipes/evaluate.py` on held-out questions. The runs'
    folders (`base.work/`) are kept until the part is whole, so a killed build continues with the unfinished run."""
    out = part.start()
    work = cfg.root / "base.work"
    previous, steps = None, {}
    for (name, config), overrides in zip(BASE_STAGES, _base_overrides(cfg)):
        if previous is not None:
            overrides["model_name_or_path"] = previous
        metrics = run_step(Step(name, "pretrain.py", config, {**overrides, "feature_cache_dir": work / "features"}),
                           work, tag="zoo")
        previous, steps[name] = work / name, metrics["global_step"]
    evaluation = run_step(Step("eval", "evaluate.py", RECIPES / "configs" / "tiny" / "evaluate.yaml", {
        "model_name_or_path": previous, "world_path": cfg.root / "world", "num_questions": cfg.base_eval_questions,
        "base_llm": cfg.root / "llama"}), work, tag="zoo")
    keep = shutil.ignore_patterns("checkpoint-*", "runs", "rejects*.jsonl", "feature_cache", "README.md")
    shutil.copytree(previous, out, ignore=keep, dirs_exist_ok=True)
    quality = {
        "steps": steps, "rows": metrics["rows"]["train"], "eval_questions": evaluation["total"],
        "accuracy": evaluation["accuracy"],
        **{key: value for key, value in evaluation.items() if key.startswith(("accuracy_", "total_"))},
        "text_perplexity": evaluation.get("text_vlm_perplexity"), "base_llm_perplexity": evaluation.get("text_base_perplexity"),
    }
    part.finish(quality)
    shutil.rmtree(work, ignore_errors=True)


def ship(cfg: ZooConfig) -> list[str]:
    """Copy the built parts of `cfg.root` into `SHIPPED_PARTS`, each with its manifest and the checksums of its files
    (SigLIP's dual encoder, kept for the retrieval figure, and the trainer's pickled `training_args.bin` are left
    out: the settings are in `config.yaml`). Returns the names shipped."""
    shipped = []
    for name in SHIPPED:
        source = cfg.root / name
        manifest = read_manifest(source)
        if manifest is None:
            raise ValueError(f"no built {name} part in {cfg.root} to ship: build the zoo first")
        target, staging = SHIPPED_PARTS / name, SHIPPED_PARTS / f"{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("dual", "training_args.bin", MANIFEST))
        _strip_build_paths(staging, cfg.root)
        manifest = {**manifest, "files": file_checksums(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        shipped.append(name)
    return shipped


def _strip_build_paths(folder: Path, root: Path) -> None:
    """Rewrite the building machine's absolute paths in a part's text files (configs, metrics, card) as paths
    relative to the repository (or `<zoo>` for a zoo outside it): a shipped part names no machine's folders."""
    root = root.resolve()
    zoo = str(root.relative_to(REPO_ROOT)) if root.is_relative_to(REPO_ROOT) else "<zoo>"
    for path in folder.rglob("*"):
        if path.suffix in (".json", ".yaml", ".md") and path.is_file():
            text = path.read_text()
            stripped = text.replace(str(root), zoo).replace(f"{REPO_ROOT}/", "")
            if stripped != text:
                path.write_text(stripped)


def part_fingerprints(cfg: ZooConfig) -> dict[str, str]:
    """The fingerprint every part of `cfg` has with this code, without building anything."""
    sizes = {"train": cfg.train_images, "validation": cfg.validation_images, "test": cfg.test_images}
    world = _fingerprint(asdict(WorldConfig(image_size=cfg.image_size)), sizes, cfg.seed, code_fingerprint(*WORLD_CODE))
    tokenizer = _tokenizer_fingerprint(cfg, world)
    siglip, llama = _siglip_part(replace(cfg, force=True), tokenizer), _llama_part(replace(cfg, force=True), tokenizer)
    base = _base_part(replace(cfg, force=True), siglip, llama)
    return {"world": world, "tokenizer": tokenizer, "siglip": siglip.fingerprint, "llama": llama.fingerprint,
            "base": base.fingerprint}


def _tokenizer_fingerprint(cfg: ZooConfig, world_fingerprint: str) -> str:
    extra = ("line-initial-answers",) if cfg.tokenizer_answer_lines else ()
    return _fingerprint(world_fingerprint, cfg.vocab_size, code_fingerprint(*TOKENIZER_CODE), *extra)


def build_zoo(cfg: ZooConfig) -> dict:
    """Build (or reuse) world, tokenizer, SigLIP encoder and Llama LLM under `cfg.root`; return the quality figures."""
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}

    world_cfg = WorldConfig(image_size=cfg.image_size)
    sizes = {"train": cfg.train_images, "validation": cfg.validation_images, "test": cfg.test_images}
    world_fingerprint = _fingerprint(asdict(world_cfg), sizes, cfg.seed, code_fingerprint(*WORLD_CODE))
    part = _Part(root, "world", world_fingerprint, cfg.force)
    if not part.valid:
        logger.info("building the shapes world %s", sizes)
        out = part.start()
        build_world(str(out), sizes=sizes, config=world_cfg, seed=cfg.seed)
        part.finish({"images": sizes})
    report["world"] = part.manifest
    world = datasets.load_from_disk(str(root / "world"))

    part = _Part(root, "tokenizer", _tokenizer_fingerprint(cfg, part.fingerprint), cfg.force)
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
    if cfg.base:
        base_part = _base_part(cfg, siglip_part, llama_part)
        if not base_part.valid:
            logger.info("pretraining the base VLM (stage 1, then grounded pretraining)")
            _build_base(cfg, base_part)
        report["base"] = base_part.manifest

    (root / "quality.json").write_text(json.dumps(report, indent=2))
    if cfg.ship:
        logger.info("shipped %s to %s", ", ".join(ship(cfg)), SHIPPED_PARTS)
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
    if "base" in report:
        base = report["base"]["quality"]
        categories = [key.removeprefix("accuracy_") for key in base if key.startswith("accuracy_")]
        figures = ", ".join(f"{c} {base[f'accuracy_{c}']:.1%}" for c in categories)
        rows.append(
            f"| base VLM ({' + '.join(str(n) for n in base['steps'].values())} steps) | held-out accuracy, "
            f"{base['eval_questions']} questions (test): {figures} | {base['accuracy']:.1%} | | {report['base']['seconds']} |"
        )
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
