"""recipes/export.py end to end: the real script in a subprocess on a tiny QLoRA adapter, in bfloat16, with --verify."""

import json

import pytest

from tests.align.test_export import make_adapter
from tests.align.training_helpers import run_recipe, tiny_vlm
from tests.conftest import save_tiny_llama


@pytest.mark.slow
def test_export_recipe_writes_and_verifies_every_format(tiny_parts, tiny_tokenizer, tmp_path):
    # bitsandbytes' CPU 4-bit kernel needs in_features >= 64, so the QLoRA model's LLM is 64 wide.
    llama64 = save_tiny_llama(tmp_path / "llama64", tiny_tokenizer, hidden_size=64)
    vlm = tiny_vlm(tmp_path / "vlm", tiny_parts["siglip"], llama64)
    adapter = make_adapter(vlm, tmp_path / "sft", quantized=True)
    out = tmp_path / "export"
    config = {"model_name_or_path": str(adapter), "output_dir": str(out), "verify": True}
    result = run_recipe("export.py", config, tmp_path, "--dtype", "bfloat16", timeout=400)

    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["written"]) == {"peft", "peft-llm", "merged", "llava", "card"} and manifest["dtype"] == "bfloat16"
    assert manifest["quantization"]["load_in_4bit"]  # read from the stage's config.yaml
    report = json.loads((out / "verification.json").read_text())
    assert report["ok"] and report["checksums_ok"] and report["plain_process_project_modules"] == []
    for name in ("merged", "llava"):  # half precision: looser tolerance, stated in the report; greedy not required
        assert report["formats"][name]["dtype"] == "bfloat16" and not report["formats"][name]["generation_checked"]
        checked = report["formats"][name]
        assert 0 < checked["max_abs_diff"] <= checked["tolerance"] == 5e-2 * max(1.0, checked["logit_scale"])
    for name in ("peft", "peft-llm"):  # adapters are reloaded in float32 on the 4-bit base, whatever the dtype
        assert report["formats"][name]["max_abs_diff"] <= 1e-6 and report["formats"][name]["same_generation"]
    assert "verified: checksums intact" in result.stdout + result.stderr
    assert "trained on a 4-bit base (QLoRA)" in (out / "README.md").read_text()
