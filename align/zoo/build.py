"""The zoo's build: what each part is trained from and how, part by part, with its quality figures."""


from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import torch
import yaml
from transformers import AutoTokenizer, HfArgumentParser, LlamaForCausalLM, SiglipModel

from align.paths import SHIPPED_PARTS, default_cache_dir
from align.pipeline import RECIPES, Step, run_step
from align.world import WorldConfig, build_world
from align.zoo.documents import lm_documents, object_patch_labels, patch_position_labels, tokenizer_documents
from align.zoo.manifest import (
    MANIFEST,
    Part,
    code_fingerprint,
    file_checksums,
    read_manifest,
    settings_fingerprint,
    ship,
)
from align.zoo.parts import (
    LlamaPartConfig,
    SiglipPartConfig,
    llama_config,
    perplexity,
    pretrain_llama,
    pretrain_siglip,
    retrieval_accuracy,
    siglip_configs,
)
from align.zoo.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

PARTS = ("world", "tokenizer", "siglip", "llama", "base")
# The code each part is built by: modules (dotted), repository files (paths) or single functions ("module:name").
WORLD_CODE = ("align.world.scene", "align.world.render", "align.world.language", "align.world.dataset")
TOKENIZER_CODE = ("align.zoo.tokenizer", "model.chat_template", "align.zoo.documents:tokenizer_documents")
SIGLIP_CODE = ("align.zoo.parts", "align.zoo.documents:object_patch_labels", "align.world.geometry:object_patch")
POSITION_CODE = "align.zoo.documents:patch_position_labels"  # with --siglip_patch_positions
LLAMA_CODE = ("align.zoo.parts", "align.zoo.documents:lm_documents")
BASE_CODE = (
    "model.build", "model.chat_template", "model.configuration_vlm", "model.cross_attention", "model.feature_cache",
    "model.modeling_vlm", "model.pretrain", "model.processing_vlm", "model.projectors", "model.stages",
    "align.captioning", "align.pretraining", "recipes/pretrain.py",
)
# The base VLM's pretraining runs of recipes/pretrain.py, in order, each from the previous one's output.
BASE_STAGES = (
    ("stage1", RECIPES / "configs" / "tiny" / "pretrain.yaml"),
    ("grounded", RECIPES / "configs" / "tiny" / "pretrain_grounded.yaml"),
    ("anneal", RECIPES / "configs" / "tiny" / "pretrain_anneal.yaml"),
    ("spatial", RECIPES / "configs" / "tiny" / "pretrain_spatial.yaml"),
    ("reasoning", RECIPES / "configs" / "tiny" / "pretrain_reasoning.yaml"),
    ("conclusions", RECIPES / "configs" / "tiny" / "pretrain_conclusions.yaml"),
    ("counting", RECIPES / "configs" / "tiny" / "pretrain_counting.yaml"),
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
    siglip_patch_positions: bool = field(
        default=False,
        metadata={"help": "The patch-attribute loss also asks every patch its own column and row in the grid, so the "
                  "tower's output keeps where each patch is (trained on the other targets alone, it loses it): "
                  "`align.zoo.documents.patch_position_labels`. Off in the shipped parts (README: spatial)."},
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
    base_continue: bool = field(
        default=False,
        metadata={"help": "Build the base VLM from the shipped one, running only the pretraining runs of BASE_STAGES it "
                  "has not been through (maintainers, after appending a run): refused unless the shipped base is "
                  "what the first runs build with this code and these settings, so the result is the whole build's."},
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
        if self.siglip_patch_positions and self.siglip_patch_loss == 0:
            raise ValueError("siglip_patch_positions needs the patch-attribute loss (siglip_patch_loss > 0), got "
                             "siglip_patch_loss 0")
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
























def _siglip_part(cfg: ZooConfig, tokenizer_fingerprint: str) -> Part:
    # The option's code counts only where it is used, so the shipped parts (built without it) keep their fingerprint.
    extra = ("patch-positions", code_fingerprint(POSITION_CODE)) if cfg.siglip_patch_positions else ()
    fingerprint = settings_fingerprint(tokenizer_fingerprint, asdict(cfg.siglip()), code_fingerprint(*SIGLIP_CODE), *extra)
    return Part(cfg.root, "siglip", fingerprint, cfg.force)


def _llama_part(cfg: ZooConfig, tokenizer_fingerprint: str) -> Part:
    extra = ("object-documents",) if cfg.llm_object_documents else ()
    extra += ("captioned-chats",) if cfg.llm_captioned_chats else ()
    fingerprint = settings_fingerprint(tokenizer_fingerprint, asdict(cfg.llama()), code_fingerprint(*LLAMA_CODE), *extra)
    return Part(cfg.root, "llama", fingerprint, cfg.force)


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


def _base_fingerprint(cfg: ZooConfig, siglip: Part, llama: Part, stages: int = len(BASE_STAGES)) -> str:
    """The base VLM's fingerprint; with `stages`, that of a base built by the first `stages` runs of `BASE_STAGES`."""
    configs = [yaml.safe_load(path.read_text()) for _, path in BASE_STAGES[:stages]]
    overrides = [{k: v for k, v in o.items() if k not in ("vision", "text", "world_path")}
                 for o in _base_overrides(cfg)[:stages]]
    return settings_fingerprint(siglip.fingerprint, llama.fingerprint, configs, overrides, code_fingerprint(*BASE_CODE))


def _base_part(cfg: ZooConfig, siglip: Part, llama: Part) -> Part:
    return Part(cfg.root, "base", _base_fingerprint(cfg, siglip, llama), cfg.force)


def _build_siglip(cfg: ZooConfig, part: Part, world: datasets.DatasetDict, tokenizer) -> None:
    siglip_cfg = cfg.siglip()
    logger.info("pretraining the SigLIP encoder (%d steps)", siglip_cfg.steps)
    out = part.start()
    train = world["train"]
    images = [row[0] for row in train["images"]]
    patch_labels, patch_classes = None, None
    if siglip_cfg.patch_loss_weight > 0:
        patch_labels, patch_classes = object_patch_labels(train["scene"], WorldConfig(image_size=cfg.image_size), siglip_cfg)
        if cfg.siglip_patch_positions:
            positions, position_classes = patch_position_labels(len(train), siglip_cfg)
            patch_labels, patch_classes = torch.cat([patch_labels, positions], dim=1), patch_classes + position_classes
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
    from align.probe import OBJECT_ATTRIBUTES, POSITION_ATTRIBUTES, encoder_object_probe

    objects = encoder_object_probe(str(out), train, images=min(600, len(train)))
    attributes = OBJECT_ATTRIBUTES + POSITION_ATTRIBUTES
    for key in ("trained", "random_init"):
        suffix = "" if key == "trained" else "_random_init"
        quality[f"object_probe{suffix}"] = {a: objects[key][a]["probe"] for a in attributes}
    quality["object_probe_majority"] = {a: objects["trained"][a]["majority"] for a in attributes}
    part.finish(quality)


def _build_llama(cfg: ZooConfig, part: Part, world: datasets.DatasetDict, tokenizer) -> None:
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


def _shipped_prefix(cfg: ZooConfig, siglip: Part, llama: Part) -> tuple[Path, dict, str]:
    """For `base_continue`: the shipped base, the runs it went through (`{name: steps}`, the first of `BASE_STAGES`)
    and its fingerprint, checked to be the one those runs have with this code, these settings and these parts."""
    shipped = SHIPPED_PARTS / "base"
    manifest = read_manifest(shipped)
    if manifest is None:
        raise ValueError(f"base_continue: no shipped base part in {shipped} to continue")
    done = dict(manifest["quality"]["steps"])
    names = [name for name, _ in BASE_STAGES]
    if list(done) != names[: len(done)] or len(done) >= len(names):
        raise ValueError(f"base_continue: the shipped base went through the runs {list(done)}, which are not the first "
                         f"runs of BASE_STAGES {names} with some left to run")
    prefix = _base_fingerprint(cfg, siglip, llama, stages=len(done))
    if manifest["fingerprint"] != prefix:
        raise ValueError(f"base_continue: the shipped base (fingerprint {manifest['fingerprint']}) was not built by the "
                         f"runs {list(done)} with this code, these settings and these parts (fingerprint {prefix}): "
                         "build the whole base instead (leave base_continue off)")
    found = file_checksums(shipped)
    if any(found.get(path) != checksum for path, checksum in manifest["files"].items()):
        raise ValueError(f"base_continue: the shipped base's files do not match their checksums in {shipped / MANIFEST}")
    return shipped, done, prefix


def _build_base(cfg: ZooConfig, part: Part, siglip: Part | None = None, llama: Part | None = None) -> None:
    """The base VLM: `recipes/pretrain.py` with each config of `BASE_STAGES`, each run from the previous one's output
    and in a process of its own as a user runs them (forked under `align.pipeline`'s forkserver, as `make demo` runs
    its steps: the same parts to the bit, `python -m align.zoo.carry`'s check build); then `recipes/evaluate.py` on
    held-out questions. The runs' folders (`base.work/`) are kept until the part is whole, so a killed build
    continues with the unfinished run.

    With `cfg.base_continue` the runs the shipped base went through are not run again: the later runs start from
    the shipped base, which the same code, settings and parts built (`_shipped_prefix`), so the part is the one the
    whole build makes (on the library versions and thread count of the shipped build); its manifest says so."""
    out = part.start()
    work = cfg.root / "base.work"
    previous, steps, continued = None, {}, None
    if cfg.base_continue:
        previous, steps, continued = _shipped_prefix(cfg, siglip, llama)
        logger.info("continuing the shipped base (runs %s, fingerprint %s)", ", ".join(steps), continued)
    for (name, config), overrides in zip(BASE_STAGES, _base_overrides(cfg)):
        if name in steps:
            continue
        if previous is not None:
            overrides["model_name_or_path"] = previous
        # Forked from one process that imported the libraries once: started in seconds, not a fresh interpreter's ten.
        run = Step(name, "pretrain.py", config, {**overrides, "feature_cache_dir": work / "features"}, launcher="forkserver")
        metrics = run_step(run, work, tag="zoo")
        previous, steps[name] = work / name, metrics["global_step"]
    evaluation = run_step(Step("eval", "evaluate.py", RECIPES / "configs" / "tiny" / "evaluate.yaml", {
        "model_name_or_path": previous, "world_path": cfg.root / "world", "num_questions": cfg.base_eval_questions,
        "base_llm": cfg.root / "llama"}, launcher="forkserver"), work, tag="zoo")
    keep = shutil.ignore_patterns("checkpoint-*", "runs", "rejects*.jsonl", "feature_cache", "README.md")
    shutil.copytree(previous, out, ignore=keep, dirs_exist_ok=True)
    quality = {
        "steps": steps, "rows": metrics["rows"]["train"], "eval_questions": evaluation["total"],
        "accuracy": evaluation["accuracy"],
        **{key: value for key, value in evaluation.items() if key.startswith(("accuracy_", "total_"))},
        "text_perplexity": evaluation.get("text_vlm_perplexity"), "base_llm_perplexity": evaluation.get("text_base_perplexity"),
    }
    if continued is not None:
        quality["continued_from"] = continued
    part.finish(quality)
    shutil.rmtree(work, ignore_errors=True)






def part_fingerprints(cfg: ZooConfig) -> dict[str, str]:
    """The fingerprint every part of `cfg` has with this code, without building anything."""
    sizes = {"train": cfg.train_images, "validation": cfg.validation_images, "test": cfg.test_images}
    world = settings_fingerprint(asdict(WorldConfig(image_size=cfg.image_size)), sizes, cfg.seed, code_fingerprint(*WORLD_CODE))
    tokenizer = _tokenizer_fingerprint(cfg, world)
    siglip, llama = _siglip_part(replace(cfg, force=True), tokenizer), _llama_part(replace(cfg, force=True), tokenizer)
    base = _base_part(replace(cfg, force=True), siglip, llama)
    return {"world": world, "tokenizer": tokenizer, "siglip": siglip.fingerprint, "llama": llama.fingerprint,
            "base": base.fingerprint}


def _tokenizer_fingerprint(cfg: ZooConfig, world_fingerprint: str) -> str:
    extra = ("line-initial-answers",) if cfg.tokenizer_answer_lines else ()
    return settings_fingerprint(world_fingerprint, cfg.vocab_size, code_fingerprint(*TOKENIZER_CODE), *extra)


def build_zoo(cfg: ZooConfig) -> dict:
    """Build (or reuse) world, tokenizer, SigLIP encoder and Llama LLM under `cfg.root`; return the quality figures."""
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}

    world_cfg = WorldConfig(image_size=cfg.image_size)
    sizes = {"train": cfg.train_images, "validation": cfg.validation_images, "test": cfg.test_images}
    world_fingerprint = settings_fingerprint(asdict(world_cfg), sizes, cfg.seed, code_fingerprint(*WORLD_CODE))
    part = Part(root, "world", world_fingerprint, cfg.force)
    if not part.valid:
        logger.info("building the shapes world %s", sizes)
        out = part.start()
        build_world(str(out), sizes=sizes, config=world_cfg, seed=cfg.seed)
        part.finish({"images": sizes})
    report["world"] = part.manifest
    world = datasets.load_from_disk(str(root / "world"))

    part = Part(root, "tokenizer", _tokenizer_fingerprint(cfg, part.fingerprint), cfg.force)
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
            logger.info("pretraining the base VLM (%s)", ", then ".join(name for name, _ in BASE_STAGES))
            _build_base(cfg, base_part, siglip_part, llama_part)
        report["base"] = base_part.manifest

    (root / "quality.json").write_text(json.dumps(report, indent=2))
    if cfg.ship:
        logger.info("shipped %s to %s", ", ".join(ship(cfg.root)), SHIPPED_PARTS)
        logger.info("record the check build that lets later refactors keep these parts: python -m align.zoo.carry --record")
    return report


def _last_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def _object_probe_row(quality: dict) -> list[str]:
    """The object probe's row, for zoos built since it was measured (the patch's column and row since they were)."""
    if "object_probe" not in quality:
        return []
    names = [a for a in ("color", "shape", "size", "column", "row") if a in quality["object_probe"]]

    def figures(values):
        return " / ".join(f"{values[a]:.1%}" for a in names)
    return [
        f"| SigLIP encoder | object {' / '.join(names)} from its patch, linear probe (majority "
        f"{figures(quality['object_probe_majority'])}) | {figures(quality['object_probe'])} "
        f"| {figures(quality['object_probe_random_init'])} | |"
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

