"""Export: a LoRA and a QLoRA adapter of each fusion exported, reloaded in fresh processes (LLaVA and the bare-LLM
adapter with plain transformers + PEFT only) and compared with the source; refusals; checksums; the model card."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from align.export import (
    CHECKSUMS_FILE,
    TOLERANCES,
    check_checksums,
    export,
    inspect_source,
    llava_refusal,
    load_for_probe,
    parse_formats,
    probe_batch,
    probe_outputs,
    stage_chain,
    to_llava,
    verify_export,
)
from align.training import DEFAULT_LORA_TARGETS
from tests.align.training_helpers import tiny_vlm
from tests.conftest import save_tiny_llama

EVAL_METRICS = {
    "accuracy": 0.5, "correct": 2, "total": 4, "stderr": 0.25,
    "total_color": 2, "correct_color": 2, "accuracy_color": 1.0, "stderr_color": 0.0,
    "total_count": 2, "correct_count": 0, "accuracy_count": 0.0, "stderr_count": 0.0,
}


@pytest.fixture(scope="module")
def vlms(tiny_parts, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-vlms")
    # bitsandbytes' CPU 4-bit kernel needs in_features >= 64, so the QLoRA models' LLM is 64 wide.
    llama64 = save_tiny_llama(root / "llama64", tiny_tokenizer, hidden_size=64)
    return {
        "prepend": tiny_vlm(root / "prepend", tiny_parts["siglip"], tiny_parts["llama"]),
        "cross_attention": tiny_vlm(root / "cross", tiny_parts["siglip"], tiny_parts["llama"], "cross_attention"),
        "prepend64": tiny_vlm(root / "prepend64", tiny_parts["siglip"], llama64),
        "cross_attention64": tiny_vlm(root / "cross64", tiny_parts["siglip"], llama64, "cross_attention"),
        "clip": tiny_vlm(root / "clip", tiny_parts["clip"], tiny_parts["qwen2"]),
    }


def make_adapter(vlm_dir: str, out: Path, quantized: bool = False, modules_to_save=None, seed: int = 0) -> Path:
    """A trained-like LoRA (or QLoRA) output: LoRA on the LLM projections with non-zero lora_B (and perturbed
    `modules_to_save` copies), the processor, a `config.yaml` as the SFT recipe writes it, and `metrics.json`."""
    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, **kwargs)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=DEFAULT_LORA_TARGETS, modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    peft = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            elif ".modules_to_save." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft.save_pretrained(out)
    AutoProcessor.from_pretrained(vlm_dir).save_pretrained(out)
    stage = {
        "model_name_or_path": vlm_dir, "dtype": "float32", "stage": "finetune", "use_peft": True, "lora_r": 4,
        "lora_alpha": 8, "load_in_4bit": quantized, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
        "learning_rate": 1e-3, "max_steps": 3, "output_dir": str(out),
    }
    (out / "config.yaml").write_text(yaml.safe_dump(stage, sort_keys=False))
    (out / "metrics.json").write_text(json.dumps({"global_step": 3, "loss": {"first": 2.5, "last": 1.25}}))
    return out


def _check_report(report: dict, expected_formats: set[str]) -> None:
    assert report["checksums_ok"], report["checksums"]
    assert set(report["formats"]) == expected_formats
    for name, result in report["formats"].items():
        assert result["same_input_ids"], name
        assert result["max_abs_diff"] <= result["tolerance"], (name, result)
        if result["dtype"] == "float32":
            assert result["same_generation"], name
        assert result["ok"], (name, result)
    assert report["ok"]


def _adapter_keys(path: Path) -> set[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


# ---------------------------------------------------------------------------------------------------------------
# Adapters of both fusions, LoRA and QLoRA, reloaded in fresh processes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_prepend_exports_every_format_and_each_reloads_with_the_same_logits(vlms, tmp_path):
    adapter = make_adapter(vlms["prepend"], tmp_path / "sft")
    (adapter / "eval").mkdir()
    (adapter / "eval" / "metrics.json").write_text(json.dumps(EVAL_METRICS))
    out = tmp_path / "export"
    manifest = export(adapter, out)
    assert manifest["written"] == {
        "peft": "peft", "peft-llm": "peft-llm", "merged": "merged", "llava": "llava", "card": "README.md"
    }
    assert manifest["skipped"] == {}

    # The bare-LLM adapter is keyed to LlamaForCausalLM and names its own base.
    keys = _adapter_keys(out / "peft-llm")
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    llm_config = json.loads((out / "peft-llm" / "adapter_config.json").read_text())
    assert Path(llm_config["base_model_name_or_path"]) == (out / "base-llm").resolve()
    assert "model.layers.0.self_attn.q_proj" in llm_config["target_modules"]
    assert json.loads((out / "base-llm" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    llava_config = json.loads((out / "llava" / "config.json").read_text())
    assert llava_config["model_type"] == "llava" and llava_config["vision_feature_select_strategy"] == "full"
    assert llava_config["vision_config"]["tie_last_hidden_states"] is True  # SigLIP's post-layernorm is included

    report = verify_export(out)
    _check_report(report, {"peft", "peft-llm", "merged", "llava"})
    assert report["plain_process_project_modules"] == []  # LLaVA and the bare-LLM adapter: no project code
    assert report["formats"]["llava"]["class"] == "LlavaForConditionalGeneration"
    assert report["formats"]["peft-llm"]["class"] == "PeftModelForCausalLM"
    assert report["formats"]["peft"]["tolerance"] == TOLERANCES["adapter"]["float32"]
    assert (out / "verification.json").is_file()

    card = (out / "README.md").read_text()
    assert "fusion: prepend; projector: mlp" in card and "siglip_vision_model" in card
    assert "| **overall** | 4 | 2 | **50.0%**" in card  # the evaluation found in <stage>/eval/metrics.json
    assert f"`{adapter}` | LoRA adapter | stage=finetune" in card and "2.500 → 1.250" in card


def test_qlora_prepend_merges_the_dequantized_base_and_matches_the_4bit_model(vlms, tmp_path):
    adapter = make_adapter(vlms["prepend64"], tmp_path / "qlora", quantized=True, modules_to_save=["projectors"])
    source = inspect_source(adapter)
    assert source.quantization["load_in_4bit"] and source.quantization["bnb_4bit_use_double_quant"]
    out = tmp_path / "export"
    manifest = export(adapter, out, formats=["peft", "merged", "llava"])
    assert "trains parts outside the LLM (projectors)" in manifest["skipped"]["peft-llm"]
    assert not (out / "README.md").exists() and not (out / "peft-llm").exists()
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.language_model.layers.0.self_attn.q_proj.weight").dtype == torch.float32

    # In process (the fresh-process reloads are covered by the other tests and the recipe's): the merged and LLaVA
    # models compute what the adapter computes on its 4-bit base.
    image, question, _ = probe_batch(tmp_path)
    spec = {"kind": "peft-vlm", "path": str(adapter), "base": str(source.base), "quantization": source.quantization}
    reference = probe_outputs(*load_for_probe(spec), image, question, 4)
    base = probe_outputs(*load_for_probe({"kind": "vlm", "path": str(source.base)}), image, question, 4)
    assert (reference["logits"] - base["logits"]).abs().max() > 1e-2  # the adapter changes the model
    for name in ("merged", "llava"):
        reloaded = probe_outputs(*load_for_probe({"kind": name.replace("merged", "vlm"), "path": str(out / name)}),
                               image, question, 4)
        assert torch.equal(reloaded["input_ids"], reference["input_ids"])
        tolerance = TOLERANCES["merged"]["float32"] * max(1.0, reference["logits"].abs().max().item())
        torch.testing.assert_close(reloaded["logits"], reference["logits"], rtol=0, atol=tolerance)
        assert torch.equal(reloaded["generated"], reference["generated"]), name


@pytest.mark.slow
def test_lora_cross_attention_exports_peft_llm_merged_and_refuses_llava(vlms, tmp_path):
    adapter = make_adapter(vlms["cross_attention"], tmp_path / "sft")
    out = tmp_path / "export"
    manifest = export(adapter, out)
    assert set(manifest["written"]) == {"peft", "peft-llm", "merged", "card"}
    assert "cross_attention fusion" in manifest["skipped"]["llava"]
    assert "no `llava`: cross_attention fusion" in (out / "README.md").read_text()
    _check_report(verify_export(out), {"peft", "peft-llm", "merged"})


@pytest.mark.slow
def test_qlora_cross_attention_with_trained_adapters(vlms, tmp_path):
    adapter = make_adapter(
        vlms["cross_attention64"], tmp_path / "qlora", quantized=True, modules_to_save=["projectors", "cross_attention"]
    )
    out = tmp_path / "export"
    manifest = export(adapter, out, formats=["peft", "merged"])
    assert set(manifest["written"]) == {"peft", "merged"}
    _check_report(verify_export(out), {"peft", "merged"})


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


def test_llava_export_of_cross_attention_is_refused_naming_the_formats_available(vlms, tmp_path):
    with pytest.raises(ValueError) as error:
        export(vlms["cross_attention"], tmp_path / "out", formats=["llava"])
    message = str(error.value)
    assert "cannot export a native LLaVA checkpoint" in message and "cross_attention fusion" in message
    assert "Formats available for this model: merged, card" in message  # a full model: no adapter formats
    assert not (tmp_path / "out").exists()

    adapter = make_adapter(vlms["cross_attention"], tmp_path / "sft", modules_to_save=["cross_attention"])
    with pytest.raises(ValueError, match="Formats available for this model: peft, merged, card"):
        export(adapter, tmp_path / "out", formats=["merged", "llava"])
    with pytest.raises(ValueError, match="formats must be a comma-separated list"):
        parse_formats("merged,gguf")


def test_every_combination_without_a_llava_equivalent_is_named():
    from model import VLMConfig

    assert llava_refusal(VLMConfig()) is None
    siglip = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8}
    config = VLMConfig(vision_configs=[siglip, siglip], projector="attention", pool=2, ternary=True)
    reasons = llava_refusal(config)
    for expected in ("attention projector", "2 vision encoders", "pool=2", "ternary"):
        assert expected in reasons


# ---------------------------------------------------------------------------------------------------------------
# LLaVA conversion of a CLIP tower (CLS token dropped, "default" selection) and a tied-embedding Qwen2
# ---------------------------------------------------------------------------------------------------------------


def _assert_llava_matches(vlm, processor, image_size=(40, 56)):
    llava, llava_processor = to_llava(vlm, processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", image_size, (200, 30, 60))
    ours = processor(images=[image], text=[text], return_tensors="pt")
    theirs = llava_processor(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert (ours["input_ids"] == vlm.config.image_token_id).sum() == vlm.config.num_image_tokens
    with torch.no_grad():
        torch.testing.assert_close(llava(**theirs).logits, vlm(**ours).logits, rtol=0, atol=1e-5)
    return llava


def test_llava_conversion_of_a_clip_tower_drops_cls_like_the_vlm(vlms):
    vlm = AutoModelForImageTextToText.from_pretrained(vlms["clip"], dtype=torch.float32).eval()
    llava = _assert_llava_matches(vlm, AutoProcessor.from_pretrained(vlms["clip"]))
    assert vlm.config.num_image_tokens == 9  # 3x3 patches, CLS dropped
    assert llava.config.vision_feature_select_strategy == "default"
    assert llava.config.tie_word_embeddings  # Qwen2's tied head stays tied


def test_llava_conversion_keeps_siglips_post_layernorm(tiny_parts):
    from model.build import build_vlm

    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    llava = _assert_llava_matches(vlm, processor)
    # Without the tie, LLaVA's hidden_states[-1] would miss SigLIP's post-layernorm: the logits would differ.
    llava.model.vision_tower.config.tie_last_hidden_states = False
    pixel_values = processor(images=[Image.new("RGB", (32, 32), (0, 90, 200))], text=["<image>"])["pixel_values"]
    with torch.no_grad():
        untied = llava.model.get_image_features(torch.as_tensor(pixel_values)).pooler_output[0]
        ours = vlm.get_image_features(pixel_values=torch.as_tensor(pixel_values))[0]
    assert (untied - ours).norm() > 0.1 * ours.norm()  # relative: the projector's random init sets the scale


def test_llava_conversion_of_an_inner_siglip_layer(tiny_parts):
    from model.build import build_vlm

    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"], vision_feature_layer=-2)
    llava = _assert_llava_matches(vlm, processor)
    # hidden_states[-2] is the same with or without the post-layernorm tie: only layer -1 needs it.
    assert llava.config.vision_feature_layer == -2 and llava.config.vision_config.tie_last_hidden_states is False


# ---------------------------------------------------------------------------------------------------------------
# Checksums, stage chain
# ---------------------------------------------------------------------------------------------------------------


def test_checksums_detect_modified_missing_and_unlisted_files(vlms, tmp_path):
    out = tmp_path / "export"
    export(vlms["cross_attention"], out, formats=["merged", "card"])
    sums = json.loads((out / CHECKSUMS_FILE).read_text())
    assert "merged/model.safetensors" in sums and "README.md" in sums and "export.json" in sums
    assert check_checksums(out) == {"modified": [], "missing": [], "unlisted": []}

    config = out / "merged" / "config.json"
    config.write_text(config.read_text() + " ")  # one byte more
    (out / "README.md").unlink()
    (out / "merged" / "extra.bin").write_bytes(b"\0")
    assert check_checksums(out) == {
        "modified": ["merged/config.json"], "missing": ["README.md"], "unlisted": ["merged/extra.bin"]
    }


def test_stage_chain_follows_adapter_bases_and_merged_folders(tmp_path):
    pretrain, sft, dpo = tmp_path / "pretrain", tmp_path / "sft", tmp_path / "dpo"
    for folder in (pretrain, sft / "merged", dpo):
        folder.mkdir(parents=True)
    (pretrain / "config.json").write_text("{}")
    (pretrain / "config.yaml").write_text(yaml.safe_dump({"stage": "align", "output_dir": str(pretrain)}))
    (sft / "merged" / "config.json").write_text("{}")
    (sft / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(pretrain)}))
    (sft / "config.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(pretrain), "stage": "finetune"}))
    (dpo / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(sft / "merged")}))
    (dpo / "config.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(sft), "beta": 0.1}))
    (dpo / "metrics.json").write_text(json.dumps({"global_step": 5}))
    chain = stage_chain(dpo)
    assert [Path(entry["path"]).name for entry in chain] == ["pretrain", "sft", "dpo"]
    assert [entry["kind"] for entry in chain] == ["full model", "LoRA adapter", "LoRA adapter"]
    assert chain[0]["config"]["stage"] == "align" and chain[2]["metrics"]["global_step"] == 5
    assert not any(entry["note"] for entry in chain)

    # An adapter applied to other weights than its stage started from is pointed out.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(pretrain)}))
    (stale / "config.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(sft)}))
    chain = stage_chain(stale)
    assert [Path(entry["path"]).name for entry in chain] == ["pretrain", "sft", "stale"]
    assert "the adapter's base is" in chain[-1]["note"] and f"names `{sft}` as its input model" in chain[-1]["note"]


def test_llava_conversion_folds_the_feature_standardisation_into_the_projector(tiny_parts):
    from model.build import build_vlm

    vlm, processor = build_vlm(tiny_parts["siglip"], tiny_parts["llama"])
    width = vlm.config.vision_configs[0].hidden_size
    vlm.model.projectors.set_feature_statistics(0, torch.linspace(-2, 2, width), torch.linspace(0.3, 3, width), count=8)
    llava = _assert_llava_matches(vlm, processor)  # same logits, with LLaVA's plain Linear-GELU-Linear
    assert not any("feature_" in key for key in llava.state_dict())
