import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from align.zoo import BASE_STAGES, ZooConfig, build_zoo, file_checksums, format_quality, read_manifest
from tests.align.training_helpers import REPO, kill_when

TINY = dict(
    train_images=64, validation_images=8, test_images=100, image_size=64, vocab_size=400,
    siglip_steps=2, llama_steps=2, llama_layers=4, llama_hidden_size=32, base=False,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cfg = ZooConfig(cache_dir=str(tmp_path_factory.mktemp("zoo")), **TINY)
    return cfg, build_zoo(cfg)


def test_parts_load_by_path_and_run(zoo):
    cfg, report = zoo
    root = cfg.root
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert tokenizer.image_token == "<image>"

    encoder = AutoModel.from_pretrained(root / "siglip")
    processor = AutoImageProcessor.from_pretrained(root / "siglip")
    assert type(encoder).__name__ == "SiglipVisionModel"
    from PIL import Image

    pixels = processor(images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")["pixel_values"]
    out = encoder(pixel_values=pixels)
    assert out.last_hidden_state.shape == (1, (64 // 8) ** 2, encoder.config.hidden_size)

    lm = AutoModelForCausalLM.from_pretrained(root / "llama")
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads  # grouped-query attention
    ids = tokenizer("a red circle", return_tensors="pt")["input_ids"]
    assert lm(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    saved = json.loads((root / "quality.json").read_text())
    assert saved["siglip"]["quality"]["retrieval_top1_of_100"] >= 0.0
    assert saved["llama"]["quality"]["test_perplexity"] > 1.0
    assert "perplexity" in format_quality(report)
    probe = saved["siglip"]["quality"]
    for key in ("object_probe", "object_probe_random_init", "object_probe_majority"):
        assert set(probe[key]) == {"color", "shape", "size", "column", "row"}
        assert all(0.0 <= v <= 1.0 for v in probe[key].values())
    assert "object color / shape / size / column / row from its patch" in format_quality(report)


def test_rebuild_skips_valid_parts_and_redoes_changed_ones(zoo):
    cfg, first = zoo
    again = build_zoo(cfg)
    assert again == first  # nothing rebuilt: the manifests (with their build times) are the same

    mtime = (cfg.root / "siglip" / "model.safetensors").stat().st_mtime_ns
    changed = ZooConfig(cache_dir=cfg.cache_dir, **{**TINY, "llama_steps": 3})
    report = build_zoo(changed)
    assert report["siglip"] == first["siglip"]
    assert report["llama"]["fingerprint"] != first["llama"]["fingerprint"]
    assert (cfg.root / "siglip" / "model.safetensors").stat().st_mtime_ns == mtime


def test_siglip_and_llama_are_independent_parts(zoo):
    """Both are built from the world and the tokenizer: a changed SigLIP setting rebuilds SigLIP alone."""
    cfg, _ = zoo
    first = build_zoo(cfg)  # the fixture's parts again (a test before this one changed the LLM)
    assert first["siglip"]["seconds"] > 0 and first["llama"]["seconds"] > 0
    mtime = (cfg.root / "llama" / "model.safetensors").stat().st_mtime_ns
    changed = ZooConfig(cache_dir=cfg.cache_dir, **{**TINY, "siglip_steps": 3, "siglip_patch_loss": 0.0})
    report = build_zoo(changed)
    assert report["siglip"]["fingerprint"] != first["siglip"]["fingerprint"]
    assert "object_probe" in report["siglip"]["quality"]  # measured with the patch loss off too
    assert report["llama"] == first["llama"]
    assert (cfg.root / "llama" / "model.safetensors").stat().st_mtime_ns == mtime
    assert build_zoo(cfg)["llama"] == first["llama"]  # back to the fixture's SigLIP for the tests after this one


def test_interrupted_part_is_rebuilt(zoo):
    cfg, _ = zoo
    (cfg.root / "llama" / "zoo_manifest.json").unlink()  # as if killed before the manifest was written
    (cfg.root / "llama.partial").mkdir()
    report = build_zoo(cfg)
    assert (cfg.root / "llama" / "zoo_manifest.json").exists()
    assert not (cfg.root / "llama.partial").exists()
    assert report["llama"]["quality"]["parameters"] > 0


def test_bad_sizes_name_the_parameter():
    with pytest.raises(ValueError, match="test_images"):
        ZooConfig(test_images=10)
    with pytest.raises(ValueError, match="llama_steps"):
        ZooConfig(llama_steps=0)
    with pytest.raises(ValueError, match="base_steps must give"):
        ZooConfig(base_steps=[10])
    with pytest.raises(ValueError, match="siglip_patch_positions needs the patch-attribute loss"):
        ZooConfig(siglip_patch_loss=0.0, siglip_patch_positions=True)


@pytest.mark.parametrize("fusion", ["prepend", "cross_attention"])
def test_vlm_builds_from_zoo_parts_and_trains_on_world_rows(zoo, fusion):
    import datasets

    from model import build_vlm

    cfg, _ = zoo
    root = cfg.root
    vlm, processor = build_vlm(vision=str(root / "siglip"), text=str(root / "llama"), fusion=fusion)
    row = datasets.load_from_disk(str(root / "world"))["train"][0]
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    batch = processor(images=[row["images"]], text=[text], return_tensors="pt")
    out = vlm(**batch, labels=batch["input_ids"])
    assert out.loss.isfinite()
    out.loss.backward()
    assert any(p.grad is not None for p in vlm.model.projectors.parameters())


def test_tokenizer_answer_lines_make_line_initial_answers_whole_tokens(zoo):
    import datasets

    from align.world import text_corpus
    from align.zoo import tokenizer_documents
    from align.zoo.tokenizer import train_tokenizer

    cfg, _ = zoo
    world = datasets.load_from_disk(str(cfg.root / "world"))
    plain, with_answers = tokenizer_documents(world, "train"), tokenizer_documents(world, "train", answer_lines=True)
    assert plain == text_corpus(world["train"]) and len(with_answers) == len(plain) + len(world["train"])
    first_answers = [json.loads(q)[0]["answer"] for q in world["train"]["questions"]]
    assert with_answers[len(plain)].split("\n")[0] == first_answers[0]

    # In the chat format an answer starts a line: only the tokenizer trained on answer lines keeps it whole.
    default, answer_lines = train_tokenizer(plain, vocab_size=400), train_tokenizer(with_answers, vocab_size=400)
    assert default.tokenize("\nyes") == ["Ċ", "y", "es"] and answer_lines.tokenize("\nyes") == ["Ċ", "yes"]

    # The option is part of the tokenizer's fingerprint, so it rebuilds the tokenizer and the parts after it.
    report = build_zoo(ZooConfig(cache_dir=str(cfg.root.parent / "zoo-answer-lines"), tokenizer_answer_lines=True, **TINY))
    assert report["tokenizer"]["fingerprint"] != zoo[1]["tokenizer"]["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(cfg.root.parent / "zoo-answer-lines" / "tokenizer")
    assert tokenizer.tokenize("\nyes") == ["Ċ", "yes"]


def test_llm_object_documents_option(zoo):
    import datasets

    from align.world import object_documents, text_corpus
    from align.zoo import LLAMA_CODE, code_fingerprint, lm_documents, read_manifest
    from align.zoo.manifest import settings_fingerprint

    cfg, report = zoo
    world = datasets.load_from_disk(str(cfg.root / "world"))
    assert lm_documents(world, "train") == text_corpus(world["train"])
    with_objects = lm_documents(world, "train", objects=True)
    assert with_objects == text_corpus(world["train"]) + object_documents(world["train"])

    # The option is part of the LLM's fingerprint only when on: it rebuilds the LLM and leaves the other parts.
    other = cfg.root.parent / "zoo-object-documents"
    copied = {}
    for name in ("world", "tokenizer", "siglip"):
        shutil.copytree(cfg.root / name, other / name)
        copied[name] = read_manifest(other / name)
    rebuilt = build_zoo(ZooConfig(cache_dir=str(other), llm_object_documents=True, **TINY))
    assert rebuilt["llama"]["fingerprint"] != report["llama"]["fingerprint"]
    for name in ("world", "tokenizer", "siglip"):
        assert rebuilt[name] == copied[name]  # reused, not rebuilt
    # Off, the LLM's fingerprint is the tokenizer's (the part it is built from), its config and its code alone.
    assert report["llama"]["fingerprint"] == settings_fingerprint(
        report["tokenizer"]["fingerprint"], asdict(cfg.llama()), code_fingerprint(*LLAMA_CODE))


def test_llm_captioned_chats_put_the_detailed_caption_where_the_image_was(zoo):
    import datasets

    from align.zoo import LLAMA_CODE, code_fingerprint, lm_documents
    from align.zoo.build import _llama_part
    from align.zoo.manifest import settings_fingerprint

    cfg, report = zoo
    world = datasets.load_from_disk(str(cfg.root / "world"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.root / "tokenizer")
    n = len(world["train"])
    plain = lm_documents(world, "train", tokenizer)
    captioned = lm_documents(world, "train", tokenizer, captioned_chats=True)
    assert len(plain) == len(captioned) and plain[:-n] == captioned[:-n]  # only the conversations change
    row = world["train"][0]
    question = row["messages"][0]["content"][1]["text"]
    assert "<|user|>\n" + question in plain[-n]  # the image item dropped: the question opens the turn
    assert "<|user|>\n" + row["caption_detailed"] + "\n" + question in captioned[-n]
    assert "<image>" not in captioned[-n]

    # On, the option enters the LLM's fingerprint; off, it is the tokenizer's, the config's and the code's alone.
    tokenizer_fingerprint = report["tokenizer"]["fingerprint"]
    on = replace(cfg, llm_captioned_chats=True)
    assert _llama_part(on, tokenizer_fingerprint).fingerprint != report["llama"]["fingerprint"]
    assert _llama_part(cfg, tokenizer_fingerprint).fingerprint == settings_fingerprint(
        tokenizer_fingerprint, asdict(cfg.llama()), code_fingerprint(*LLAMA_CODE))


def test_object_patch_labels_name_each_object_at_its_patch(zoo):
    import datasets

    from align.world import SIZES, Scene, WorldConfig
    from align.world.geometry import object_patch
    from align.zoo import object_patch_labels
    from align.zoo.parts import SiglipPartConfig

    cfg, _ = zoo
    scenes = datasets.load_from_disk(str(cfg.root / "world"))["train"]["scene"][:20]
    world, siglip = WorldConfig(image_size=cfg.image_size), SiglipPartConfig(image_size=32, patch_size=8)
    labels, classes = object_patch_labels(scenes, world, siglip)
    assert labels.shape == (20, 3, 16) and classes == [len(world.colors), len(world.shapes), len(SIZES)]
    for i, scene_json in enumerate(scenes):
        scene = Scene.from_json(scene_json)
        patches = {object_patch(o, scene.image_size, 32, 8): o for o in scene.objects}
        assert set(torch.nonzero(labels[i, 0] != -100).flatten().tolist()) == set(patches)
        for patch, obj in patches.items():
            if sum(object_patch(o, scene.image_size, 32, 8) == patch for o in scene.objects) == 1:
                assert labels[i, :, patch].tolist() == [
                    world.colors.index(obj.color), world.shapes.index(obj.shape), SIZES.index(obj.size)]


def test_a_rebuild_is_bit_for_bit(zoo, tmp_path):
    """The same code and settings on the same machine and thread count train the same weights, to the bit."""
    cfg, _ = zoo
    again = replace(cfg, cache_dir=str(tmp_path / "again"), force=True)
    build_zoo(again)
    for part in ("tokenizer", "siglip", "llama"):
        assert file_checksums(cfg.root / part) == file_checksums(again.root / part), part


@pytest.fixture(scope="module")
def based(tmp_path_factory):
    """A tiny zoo with its base VLM: stage 1 and grounded pretraining, two steps each, then the evaluation."""
    cfg = ZooConfig(cache_dir=str(tmp_path_factory.mktemp("based")), **{
        **TINY, "base": True, "base_steps": [2] * len(BASE_STAGES), "base_eval_questions": 8})
    return cfg, build_zoo(cfg)


def test_base_vlm_is_its_pretraining_runs_in_order(based):
    from transformers import AutoModelForImageTextToText

    import model  # noqa: F401  (registers the VLM)

    cfg, report = based
    quality = report["base"]["quality"]
    assert quality["steps"] == {name: 2 for name, _ in BASE_STAGES} and quality["eval_questions"] == 8
    assert 0.0 <= quality["accuracy"] <= 1.0 and f"base VLM ({' + '.join(['2'] * len(BASE_STAGES))} steps)" in format_quality(report)
    vlm = AutoModelForImageTextToText.from_pretrained(cfg.root / "base")
    assert vlm.config.fusion == "prepend" and vlm.model.projectors.standardized
    # Grounded pretraining trains the LLM: its weights left the zoo LLM's.
    llm = AutoModelForCausalLM.from_pretrained(cfg.root / "llama").state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(vlm.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"], llm)
    assert not (cfg.root / "base.work").exists()  # the runs' folders go once the part is whole


def test_shipped_parts_are_installed_instead_of_trained(based, tmp_path, monkeypatch):
    import align.zoo.manifest as manifest_module

    cfg, report = based
    monkeypatch.setattr(manifest_module, "SHIPPED_PARTS", tmp_path / "shipped")
    assert manifest_module.ship(cfg.root) == ["tokenizer", "siglip", "llama", "base"]
    assert not (tmp_path / "shipped" / "siglip" / "dual").exists()
    fresh = replace(cfg, cache_dir=str(tmp_path / "fresh"))
    installed = build_zoo(fresh)
    for part in ("tokenizer", "siglip", "llama", "base"):
        assert installed[part]["fingerprint"] == report[part]["fingerprint"]
        shipped = file_checksums(tmp_path / "shipped" / part)
        assert file_checksums(fresh.root / part) == shipped and installed[part]["files"] == shipped
    # A damaged shipped file is an error naming it, never a silent rebuild or a broken part.
    (fresh.root / "llama" / "zoo_manifest.json").unlink()
    (tmp_path / "shipped" / "llama" / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1")
    with pytest.raises(ValueError, match="llama/model.safetensors is missing or does not match its checksum"):
        build_zoo(fresh)
    # Other settings than the shipped ones: the part is trained here.
    other = replace(cfg, cache_dir=str(tmp_path / "other"), llama_steps=3, base=False)
    assert build_zoo(other)["llama"]["fingerprint"] != report["llama"]["fingerprint"]


def test_base_continue_runs_only_the_appended_runs_and_builds_the_whole_builds_part(based, tmp_path, monkeypatch):
    """A shipped base built by the first runs of BASE_STAGES, continued through the rest (`base_continue`), is the
    part the whole build makes, to the bit; a shipped base from other settings is refused, naming why."""
    import align.zoo.build as build_module
    import align.zoo.manifest as manifest_module

    cfg, report = based
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(manifest_module, "SHIPPED_PARTS", shipped)
    monkeypatch.setattr(build_module, "SHIPPED_PARTS", shipped)
    with monkeypatch.context() as patch:  # the base as shipped before its last run was appended
        patch.setattr(build_module, "BASE_STAGES", BASE_STAGES[:-1])
        first = replace(cfg, cache_dir=str(tmp_path / "first"), base_steps=[2] * (len(BASE_STAGES) - 1))
        build_zoo(first)
        manifest_module.ship(first.root)
    runs = []
    real_run_step = build_module.run_step
    monkeypatch.setattr(build_module, "run_step", lambda step, *a, **k: runs.append(step.name) or real_run_step(step, *a, **k))
    continued = replace(cfg, cache_dir=str(tmp_path / "continued"), base_continue=True)
    quality = build_zoo(continued)["base"]
    assert runs == [BASE_STAGES[-1][0], "eval"]
    assert quality["fingerprint"] == report["base"]["fingerprint"]
    assert quality["quality"]["steps"] == report["base"]["quality"]["steps"]
    assert quality["quality"]["continued_from"] == read_manifest(shipped / "base")["fingerprint"]
    weights = "model.safetensors"
    assert file_checksums(continued.root / "base")[weights] == file_checksums(cfg.root / "base")[weights]
    # A shipped base that other settings built is not continued.
    other = replace(cfg, cache_dir=str(tmp_path / "other"), base_continue=True, base_steps=[3] * len(BASE_STAGES))
    with pytest.raises(ValueError, match="was not built by the runs"):
        build_zoo(other)


def test_shipped_parts_match_this_code_and_settings():
    """The parts shipped in align/default_parts were built by this code with these settings. When this fails, a part's
    code or settings changed: if the change keeps what the code builds, `python -m align.zoo.carry` shows it and
    carries the fingerprints (a minute); otherwise rebuild and ship them (`python -m align.zoo --force --ship`, about
    four hours on 2 CPU cores), record the check build (`python -m align.zoo.carry --record`) and re-measure README's
    figures."""
    from align.paths import SHIPPED_PARTS
    from align.zoo import SHIPPED, part_fingerprints, read_manifest

    expected = part_fingerprints(ZooConfig())
    for part in SHIPPED:
        manifest = read_manifest(SHIPPED_PARTS / part)
        assert manifest is not None, f"no shipped {part} part in {SHIPPED_PARTS}"
        assert manifest["fingerprint"] == expected[part], f"the shipped {part} part was built from other code or settings"
        assert file_checksums(SHIPPED_PARTS / part) == manifest["files"], f"the shipped {part} part's files changed"


@pytest.mark.slow
def test_a_build_killed_mid_part_is_finished_by_the_same_command(zoo, tmp_path):
    """kill -9 of `python -m align.zoo` while it trains the SigLIP part, then the same command: it reuses the world
    and the tokenizer, rebuilds the cut part from scratch, and ends with the parts of an uninterrupted build, to the
    bit."""
    cfg, _ = zoo
    root = tmp_path / "killed"
    command = [sys.executable, "-m", "align.zoo", "--cache_dir", str(root),
               *(arg for key, value in TINY.items() for arg in (f"--{key}", str(value)))]
    kill_when(command, lambda: (root / "siglip.partial").is_dir(), tmp_path / "zoo.log", timeout=300)
    assert (root / "tokenizer" / "zoo_manifest.json").is_file() and not (root / "siglip").exists()
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (root / "siglip.partial").exists()
    for part in ("tokenizer", "siglip", "llama"):
        assert file_checksums(root / part) == file_checksums(cfg.root / part), part


def test_patch_position_labels_name_each_patch_its_column_and_row():
    from align.zoo.documents import patch_position_labels
    from align.zoo.parts import SiglipPartConfig

    labels, classes = patch_position_labels(3, SiglipPartConfig(image_size=32, patch_size=8))
    assert labels.shape == (3, 2, 16) and classes == [4, 4]
    for patch in range(16):
        assert labels[:, :, patch].tolist() == [[patch % 4, patch // 4]] * 3  # row-major, as `object_patch`


def test_the_position_targets_train_into_the_tower_and_its_fingerprint(zoo, tmp_path, monkeypatch):
    """With `siglip_patch_positions` the SigLIP part is another part (its own fingerprint, trained here, not the
    default's), built with the two position heads next to the attribute heads."""
    import align.zoo.build as build_module
    from align.zoo.build import _siglip_part

    trained_with = []

    def recording(*args, **kwargs):
        trained_with.append((kwargs["patch_labels"], kwargs["patch_classes"]))
        return pretrain_siglip(*args, **kwargs)

    pretrain_siglip = build_module.pretrain_siglip
    monkeypatch.setattr(build_module, "pretrain_siglip", recording)
    cfg, report = zoo
    on = replace(cfg, siglip_patch_positions=True)
    assert _siglip_part(on, report["tokenizer"]["fingerprint"]).fingerprint != report["siglip"]["fingerprint"]
    other = tmp_path / "zoo"
    shutil.copytree(cfg.root / "world", other / "world")
    shutil.copytree(cfg.root / "tokenizer", other / "tokenizer")
    built = build_zoo(replace(on, cache_dir=str(other)))
    assert built["siglip"]["fingerprint"] == _siglip_part(on, report["tokenizer"]["fingerprint"]).fingerprint
    assert built["siglip"]["fingerprint"] != report["siglip"]["fingerprint"]
    assert built["tokenizer"]["fingerprint"] == report["tokenizer"]["fingerprint"]  # reused, not retrained
    (labels, classes), = trained_with
    assert classes[3:] == [8, 8] and labels.shape[1] == 5  # color, shape, size, then column and row of the 8x8 grid
    assert labels[:, 3:, 10].tolist() == [[2, 1]] * labels.shape[0]  # patch 10: column 2, row 1, in every image


def test_the_carry_check_record_belongs_to_the_shipped_parts():
    """`align.zoo.carry` compares a change of code with the check build recorded for the shipped parts: the record
    names the shipped parts' fingerprints, today's settings and the check setting."""
    from align.paths import SHIPPED_PARTS
    from align.zoo import SHIPPED, read_manifest
    from align.zoo.carry import CHECK, CHECK_FILE, settings_fingerprints

    check = json.loads((SHIPPED_PARTS / CHECK_FILE).read_text())
    assert {part: check["fingerprints"][part] for part in SHIPPED} == {
        part: read_manifest(SHIPPED_PARTS / part)["fingerprint"] for part in SHIPPED}
    assert check["settings"] == settings_fingerprints() and check["setting"] == CHECK
    assert any(path.startswith("base/") and path.endswith(".safetensors") for path in check["files"])


@pytest.fixture
def carried(tmp_path):
    """Shipped parts as if built by older code ("old-<part>"), with the check build recorded for them."""
    from align.zoo import SHIPPED
    from align.zoo.carry import CHECK, CHECK_FILE, settings_fingerprints
    from align.zoo.manifest import build_environment

    shipped = tmp_path / "default_parts"
    for part in SHIPPED:
        (shipped / part).mkdir(parents=True)
        (shipped / part / "zoo_manifest.json").write_text(json.dumps({"fingerprint": f"old-{part}", "files": {}}))
    check = {"environment": build_environment(), "settings": settings_fingerprints(),
             "fingerprints": {part: f"old-{part}" for part in SHIPPED}, "setting": CHECK, "files": {"base/model.safetensors": "a"}}
    (shipped / CHECK_FILE).write_text(json.dumps(check))
    return shipped


def test_carry_moves_the_fingerprints_when_the_check_build_is_identical(carried):
    from align.zoo import SHIPPED, part_fingerprints, read_manifest
    from align.zoo.carry import CHECK_FILE, carry

    builds = []
    moved = carry(carried, build=lambda workdir: builds.append(workdir) or {"base/model.safetensors": "a"})
    current = part_fingerprints(ZooConfig())
    assert len(builds) == 1 and moved == {part: (f"old-{part}", current[part]) for part in SHIPPED}
    for part in SHIPPED:
        manifest = read_manifest(carried / part)
        assert manifest["fingerprint"] == current[part] and manifest["carried_from"] == [f"old-{part}"]
    assert json.loads((carried / CHECK_FILE).read_text())["fingerprints"] == current
    # Carried once, there is nothing left to carry: no check build.
    assert carry(carried, build=lambda workdir: builds.append(workdir)) == {} and len(builds) == 1


def test_carry_refuses_a_change_of_behaviour_or_of_the_conditions(carried):
    from align.zoo.carry import CHECK_FILE, CarryRefused, carry

    manifests = {path: path.read_text() for path in carried.rglob("zoo_manifest.json")}
    with pytest.raises(CarryRefused, match="file base/model.safetensors: a -> b"):
        carry(carried, build=lambda workdir: {"base/model.safetensors": "b"})
    assert {path: path.read_text() for path in carried.rglob("zoo_manifest.json")} == manifests  # nothing moved

    check = json.loads((carried / CHECK_FILE).read_text())
    for key, value, message in (
        ("environment", {**check["environment"], "threads": 99}, "environment threads"),
        ("settings", {**check["settings"], "base": "other"}, "settings of part base"),
        ("fingerprints", {**check["fingerprints"], "llama": "another"}, "shipped part llama"),
    ):
        (carried / CHECK_FILE).write_text(json.dumps({**check, key: value}))
        with pytest.raises(CarryRefused, match=message):
            carry(carried, build=lambda workdir: pytest.fail("no check build when the conditions differ"))
    (carried / CHECK_FILE).unlink()
    with pytest.raises(CarryRefused, match="--record"):
        carry(carried)


def test_part_checksums_leave_out_the_run_records_and_the_build_folder(tmp_path):
    from align.zoo.carry import part_checksums

    def build(root, folder):
        (root / "base").mkdir(parents=True)
        (root / "base" / "model.safetensors").write_bytes(b"weights")
        (root / "base" / "config.json").write_text(json.dumps({"text_config": {"_name_or_path": folder, "hidden_size": 8}}))
        (root / "base" / "metrics.json").write_text(json.dumps({"seconds": len(folder)}))
        (root / "world" / "train").mkdir(parents=True)
        (root / "world" / "train" / f"cache-{len(folder)}.arrow").write_bytes(b"map cache")
        return part_checksums(root)

    one, other = build(tmp_path / "a", "/one"), build(tmp_path / "b", "/elsewhere")
    assert one == other and sorted(one) == ["base/config.json", "base/model.safetensors"]
    (tmp_path / "b" / "base" / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 16}}))
    assert part_checksums(tmp_path / "b")["base/config.json"] != one["base/config.json"]
