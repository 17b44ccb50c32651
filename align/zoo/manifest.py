"""The shipped parts' bookkeeping: fingerprints of the code and settings a part is built from, manifests, checksums,
and installing a shipped part in place of training it.

A part is built into `<name>.partial` and renamed into place with its manifest (`MANIFEST`), written last, so only
whole parts count. A part's fingerprint covers its settings, the fingerprints of the parts it is built from and the
code that builds it (`code_fingerprint`: the parsed code of modules, repository files or single functions, so
comments, docstrings and layout do not count, and moving code unchanged does not either).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch
import transformers
import trl

from align.paths import REPO_ROOT, SHIPPED_PARTS

logger = logging.getLogger(__name__)

MANIFEST = "zoo_manifest.json"
SHIPPED = ("tokenizer", "siglip", "llama", "base")  # the world is generated in seconds; the rest is shipped


def settings_fingerprint(*parts) -> str:
    """A short digest of settings, fingerprints and code fingerprints, in order."""
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


_CODE_COUNTS = [True]


@contextmanager
def settings_only() -> Iterator[None]:
    """Inside, `code_fingerprint` is a constant: the fingerprints computed there say what a part's settings (and
    its inputs' settings) are, whatever the code (`align.zoo.carry` compares them across a change of code)."""
    _CODE_COUNTS.append(False)
    try:
        yield
    finally:
        _CODE_COUNTS.pop()


def code_fingerprint(*entries: str) -> str:
    """Fingerprint of the code that builds a part: modules (`"align.zoo.parts"`), repository files
    (`"recipes/pretrain.py"`) or single functions (`"align.zoo.documents:lm_documents"`), as parsed, so comments, docstrings
    and layout do not count and any change in what the code does does."""
    if not _CODE_COUNTS[-1]:
        return "code"
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


class Part:
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


def ship(root: Path) -> list[str]:
    """Copy the built parts of the zoo at `root` into `SHIPPED_PARTS`, each with its manifest and the checksums of its files
    (SigLIP's dual encoder, kept for the retrieval figure, and the trainer's pickled `training_args.bin` are left
    out: the settings are in `config.yaml`). Returns the names shipped."""
    shipped = []
    for name in SHIPPED:
        source = root / name
        manifest = read_manifest(source)
        if manifest is None:
            raise ValueError(f"no built {name} part in {root} to ship: build the zoo first")
        target, staging = SHIPPED_PARTS / name, SHIPPED_PARTS / f"{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("dual", "training_args.bin", MANIFEST))
        _strip_build_paths(staging, root)
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
