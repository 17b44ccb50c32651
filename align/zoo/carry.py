"""Carry the shipped parts' fingerprints across a change of their code that does not change what the code builds.

A shipped part's fingerprint covers the code that builds it, so any change to that code, a pure refactor too, marks
the part as built by other code until it is rebuilt and shipped again (the base VLM: about three and a half hours on 2 CPU cores).
A change that keeps behaviour needs no rebuild, and this command shows that it keeps it:

    python -m align.zoo.carry            # after changing a part's code: check, then carry the fingerprints
    python -m align.zoo.carry --record   # after `python -m align.zoo --force --ship`: record the check build

The check build is every part, base VLM included, at a tiny setting (`CHECK`: 64 images, 2 steps per stage, about a
minute), built with this code into a temporary folder. What the parts are (every file but the run records in
`RECORDS`: weights, configs, tokenizer, chat template, the world's data; JSON without the `_name_or_path` a build
writes) is compared file by file with the same build recorded when the shipped parts were last built or carried
(`CHECK_FILE`). Only when every file is bit-identical, the settings unchanged (`settings_only`) and the
library versions and thread count those of the record (torch's CPU kernels reduce in a thread-dependent order) are
the shipped manifests moved to this code's fingerprints, each keeping the fingerprints it was carried from
(`carried_from`). Anything else is refused with what differs: rebuild and ship, then `--record`.

What the check cannot see: a code path the tiny setting does not take (an option the shipped parts are built
without takes none either), and the effect of step counts beyond two per stage (the scheduler's arithmetic is the
same code at any count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
from pathlib import Path

from align.paths import SHIPPED_PARTS
from align.runs import atomic_write_text
from align.zoo.build import BASE_STAGES, ZooConfig, build_zoo, part_fingerprints
from align.zoo.manifest import MANIFEST, SHIPPED, build_environment, read_manifest, settings_only

logger = logging.getLogger(__name__)

CHECK_FILE = "carry_check.json"
# The check build: every part, each of the base VLM's pretraining runs two steps.
CHECK = dict(
    train_images=64, validation_images=8, test_images=100, vocab_size=400, siglip_steps=2, llama_steps=2,
    llama_layers=4, llama_hidden_size=32, base=True, base_steps=[2] * len(BASE_STAGES), base_eval_questions=8,
)
# A build's records of how it ran (timings, its folders, resolved configs, manifests) and the datasets library's
# map caches (named by a hash of the mapping function's code): not what the parts are.
RECORDS = (
    "zoo_manifest.json", "quality.json", "config.yaml", "metrics.json", "training_args.bin", "wall_seconds.json",
    "run_settings.json", "rejects*.jsonl", "cache-*.arrow",
)


class CarryRefused(RuntimeError):
    """The fingerprints cannot be carried: the message says what differs."""


def _without_build_paths(value):
    if isinstance(value, dict):
        return {key: _without_build_paths(item) for key, item in value.items() if key != "_name_or_path"}
    if isinstance(value, list):
        return [_without_build_paths(item) for item in value]
    return value


def part_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file of every part under a zoo folder but the run records (`RECORDS`), by path relative to it;
    JSON files are hashed without the `_name_or_path` keys, which name the folder the build ran in."""
    checksums = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(path.match(pattern) for pattern in RECORDS):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            data = json.dumps(_without_build_paths(json.loads(data)), sort_keys=True).encode()
        checksums[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return checksums


def check_build(workdir: Path) -> dict[str, str]:
    """Build the zoo at the `CHECK` setting under `workdir` with this code; its parts' checksums (`part_checksums`)."""
    root = workdir / "zoo"
    build_zoo(ZooConfig(cache_dir=str(root), force=True, **CHECK))
    return part_checksums(root)


def settings_fingerprints() -> dict[str, str]:
    """Each part's fingerprint from its settings alone, the code left out."""
    with settings_only():
        return part_fingerprints(ZooConfig())


def _shipped_fingerprints(shipped: Path) -> dict[str, str]:
    manifests = {name: read_manifest(shipped / name) for name in SHIPPED}
    missing = [name for name, manifest in manifests.items() if manifest is None]
    if missing:
        raise CarryRefused(f"no shipped {', '.join(missing)} part in {shipped}")
    return {name: manifest["fingerprint"] for name, manifest in manifests.items()}


def _differences(label: str, recorded: dict, now: dict) -> list[str]:
    return [f"{label} {key}: {recorded.get(key)} -> {now.get(key)}" for key in sorted(set(recorded) | set(now))
            if recorded.get(key) != now.get(key)]


def record(shipped: Path = SHIPPED_PARTS, build=check_build) -> dict:
    """Record the check build next to shipped parts that this code and these settings built."""
    current = part_fingerprints(ZooConfig())
    stale = _differences("fingerprint", _shipped_fingerprints(shipped), {k: current[k] for k in SHIPPED})
    if stale:
        raise CarryRefused("the shipped parts were not built by this code and these settings; rebuild and ship them "
                           "first (python -m align.zoo --force --ship):\n  " + "\n  ".join(stale))
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp))
    check = {"environment": build_environment(), "settings": settings_fingerprints(), "fingerprints": current,
             "setting": CHECK, "files": files}
    atomic_write_text(shipped / CHECK_FILE, json.dumps(check, indent=2))
    return check


def carry(shipped: Path = SHIPPED_PARTS, build=check_build) -> dict[str, tuple[str, str]]:
    """Move the shipped parts' fingerprints to this code's, if the check build shows the code builds the same parts.

    Returns:
        `{part: (old fingerprint, new fingerprint)}` of the parts carried (empty when none needed it).

    Raises:
        CarryRefused: no record, other library versions or threads, other settings, shipped parts other than the
            record's, or a check build whose files differ; the message lists the differences.
    """
    path = shipped / CHECK_FILE
    if not path.is_file():
        raise CarryRefused(f"no {path}: record the check build after shipping (python -m align.zoo.carry --record)")
    check = json.loads(path.read_text())
    problems = _differences("environment", check["environment"], build_environment())
    problems += _differences("settings of part", check["settings"], settings_fingerprints())
    problems += _differences("shipped part", {k: check["fingerprints"][k] for k in SHIPPED}, _shipped_fingerprints(shipped))
    if check.get("setting") != CHECK:
        problems.append("the check build's setting changed since the record")
    if problems:
        raise CarryRefused("cannot compare with the recorded check build:\n  " + "\n  ".join(problems))
    current = part_fingerprints(ZooConfig())
    moved = {name: (check["fingerprints"][name], current[name]) for name in SHIPPED
             if check["fingerprints"][name] != current[name]}
    if not moved:
        logger.info("the shipped parts' fingerprints are this code's: nothing to carry")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp))
    changed = _differences("file", check["files"], files)
    if changed:
        raise CarryRefused("this code builds other parts than the recorded check build (a change of behaviour): rebuild "
                           "and ship them (python -m align.zoo --force --ship), then --record:\n  " + "\n  ".join(changed))
    for name, (old, new) in moved.items():
        manifest = read_manifest(shipped / name)
        manifest["carried_from"] = [*manifest.get("carried_from", []), old]
        manifest["fingerprint"] = new
        atomic_write_text(shipped / name / MANIFEST, json.dumps(manifest, indent=2))
    check["fingerprints"] = current
    atomic_write_text(path, json.dumps(check, indent=2))
    return moved


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true",
                        help="Record the check build for shipped parts this code built (after --force --ship).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.record:
            check = record()
            print(f"recorded the check build in {SHIPPED_PARTS / CHECK_FILE}: {len(check['files'])} files")
            return check
        moved = carry()
    except CarryRefused as error:
        raise SystemExit(str(error)) from None
    for name, (old, new) in moved.items():
        print(f"{name}: fingerprint {old} -> {new} (the check build is bit-identical)")
    return moved


if __name__ == "__main__":
    main()
