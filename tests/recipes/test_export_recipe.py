"""recipes/export.py end to end: the real script in a subprocess on a tiny LoRA adapter, with --verify."""

import json

from tests.align.test_export import make_adapter
from tests.align.training_helpers import run_recipe, tiny_vlm


def test_export_recipe_writes_and_verifies_every_format(tiny_parts, tmp_path):
    vlm = tiny_vlm(tmp_path / "vlm", tiny_parts["siglip"], tiny_parts["llama"])
    adapter = make_adapter(vlm, tmp_path / "sft")
    out = tmp_path / "export"
    config = {"model_name_or_path": str(adapter), "output_dir": str(out), "verify": True}
    result = run_recipe("export.py", config, tmp_path, "--dtype", "bfloat16", timeout=400)

    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["written"]) == {"peft", "peft-llm", "merged", "llava", "card"} and manifest["dtype"] == "bfloat16"
    report = json.loads((out / "verification.json").read_text())
    assert report["ok"] and report["checksums_ok"]
    for name in ("merged", "llava"):  # half precision: looser tolerance, stated in the report; greedy not required
        assert report["formats"][name]["dtype"] == "bfloat16" and not report["formats"][name]["generation_checked"]
        assert 0 < report["formats"][name]["max_abs_diff"] <= report["formats"][name]["tolerance"] == 5e-2
    for name in ("peft", "peft-llm"):  # adapters are reloaded in float32 whatever the export dtype
        assert report["formats"][name]["max_abs_diff"] <= 1e-6 and report["formats"][name]["same_generation"]
    assert "verified: checksums intact" in result.stdout + result.stderr
