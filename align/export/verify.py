"""Verification: the checksums re-checked, every format reloaded in fresh processes and compared with the source
(logits and greedy tokens on a fixed batch)."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from align.runs import atomic_write_text

from .checksums import VERIFICATION_FILE, check_checksums
from .source import _read_json
from .writer import MANIFEST_FILE

logger = logging.getLogger(__name__)

# Largest max |logit difference| to the source model that verification accepts, per kind of reload and dtype.
# An adapter reloaded on the same base runs the same operations: equal up to summation order at most (absolute).
# Merging adds B @ A into W once (a different rounding than x @ A^T @ B^T), and a LLaVA checkpoint holds the merged
# weights; half-precision exports round every weight to 8 (bfloat16) or 11 (float16) significant bits. Rounding
# errors grow with the logits, so the "merged" tolerances are relative: times max(1, largest |logit| of the source).
TOLERANCES = {
    "adapter": {"float32": 1e-6},
    "merged": {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2},
}



# The two functions below run in the verification subprocesses too (their source is sent there), so they import
# only torch, PIL, transformers and PEFT; a VLM format needs `import model` done before `load_for_probe`.


def load_for_probe(spec: dict):
    """Load one exported format (or the source) for `probe_outputs`: `(model, processor_or_tokenizer)`.

    spec: `kind` ("vlm", "peft-vlm", "peft-llm", "llava"), `path`, `base` (adapters), `dtype`, `quantization`
    (`BitsAndBytesConfig` dict of an adapter's base, or None).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        BitsAndBytesConfig,
    )

    kind, path = spec["kind"], spec["path"]
    kwargs = {"dtype": getattr(torch, spec.get("dtype") or "float32")}
    if spec.get("quantization"):
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(dict(spec["quantization"]))
    def processor_of(folder):
        try:
            return AutoProcessor.from_pretrained(folder)
        except (ImportError, ValueError) as error:
            if "torchvision" not in str(error).lower() or kind == "llava":
                raise
            # A Qwen2-VL-style processor (its video part needs torchvision) where torchvision is missing: the
            # project's loader builds it without the video part. Only the reload of suite and stock VLM formats
            # (a process that imports the project anyway) gets here; the native LLaVA format stays plain.
            from align.loading import load_processor

            return load_processor(folder)

    if kind in ("vlm", "llava"):
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval(), processor_of(path)
    from peft import PeftModel

    if kind == "peft-vlm":
        base = AutoModelForImageTextToText.from_pretrained(spec["base"], **kwargs)
        loaded, processor = PeftModel.from_pretrained(base, path).eval(), processor_of(path)
    elif kind == "peft-llm":
        base = AutoModelForCausalLM.from_pretrained(spec["base"], **kwargs)
        loaded, processor = PeftModel.from_pretrained(base, path).eval(), AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"unknown format kind {kind!r}")
    for module in loaded.modules():
        # On CPUs with AVX512-BF16, bitsandbytes runs 4-bit layers in eval mode through a bfloat16 kernel. The
        # reference is the function the QLoRA adapter was trained with: the 4-bit weights dequantized, in float32.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return loaded, processor


def probe_outputs(model, processor, image_path: str | None, question: str, new_tokens: int) -> dict:
    """Logits and greedy tokens of `model` on one prompt: the question about the image through the processor's chat
    template, or (`image_path=None`) the bare question through the tokenizer (an LLM without vision)."""
    import torch
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    if image_path is None:
        inputs = tokenizer([question], return_tensors="pt")
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt")
    inputs = dict(inputs)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        # min_new_tokens: a fixed number of tokens on both sides, whatever the end-of-turn tokens are.
        generated = model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return {
        "input_ids": inputs["input_ids"].cpu(),
        "logits": logits.cpu(),
        "generated": generated[:, inputs["input_ids"].shape[1] :].cpu(),
    }


_CHILD_MAIN = '''
if __name__ == "__main__":
    import importlib
    import json
    import sys

    job = json.loads(open(sys.argv[1]).read())
    if job["import_model"]:
        importlib.import_module("model")
    results, loaded = {}, {}
    for name, spec in job["specs"].items():
        key = json.dumps({k: v for k, v in spec.items() if k != "text_only"}, sort_keys=True)
        if key not in loaded:
            loaded.clear()
            loaded[key] = load_for_probe(spec)
        reloaded, processor = loaded[key]
        if spec.get("text_only"):
            results[name] = probe_outputs(reloaded, processor, None, job["text"], job["new_tokens"])
        else:
            results[name] = probe_outputs(reloaded, processor, job["image"], job["question"], job["new_tokens"])
        results[name]["class"] = type(reloaded).__name__
    project = sorted({m.split(".")[0] for m in sys.modules} & {"model", "align", "recipes", "tests"})
    # Tensors as safetensors and the rest as JSON in its metadata: the parent loads no pickle.
    from safetensors.torch import save_file

    info = {"classes": {name: result.pop("class") for name, result in results.items()}, "project_modules": project}
    tensors = {f"{name}/{field}": value.contiguous() for name, result in results.items() for field, value in result.items()}
    save_file(tensors, job["out"], metadata={"info": json.dumps(info)})
'''


def _child_source() -> str:
    header = "from __future__ import annotations\n\n"
    functions = [textwrap.dedent(inspect.getsource(f)) for f in (load_for_probe, probe_outputs)]
    return header + "\n\n".join(functions) + _CHILD_MAIN


def _run_children(jobs: list[dict], workdir: Path, timeout: int) -> list[dict]:
    """Run each job (formats to reload and probe) in its own fresh Python process, all at once; their results."""
    running = []
    for index, job in enumerate(jobs):
        job_path = workdir / f"job-{index}.json"
        job = {**job, "out": str(job_path.with_suffix(".safetensors"))}
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if len(jobs) > 1:
            env["OMP_NUM_THREADS"] = "1"  # the processes run side by side
        if job["import_model"]:
            # The VLM formats need this project's `model` package importable; the others run with nothing added.
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-c", _child_source(), str(job_path)], cwd=workdir, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        running.append((job, process))
    results = []
    for job, process in running:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"reloading {sorted(job['specs'])} took longer than {timeout} s") from None
        if process.returncode != 0:
            raise RuntimeError(f"reloading {sorted(job['specs'])} in a fresh process failed:\n{stderr[-4000:]}")
        results.append(_read_child_results(job["out"]))
    return results


def _read_child_results(path: str) -> dict:
    """What a verification child wrote: per format its tensors (safetensors) and class name (JSON metadata)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        info = json.loads(handle.metadata()["info"])
        results = {name: {"class": cls} for name, cls in info["classes"].items()}
        for key in handle.keys():
            name, field = key.rsplit("/", 1)
            results[name][field] = handle.get_tensor(key)
    return {"results": results, "project_modules": info["project_modules"]}


def probe_batch(workdir: Path) -> tuple[str, str, str]:
    """The fixed verification batch: a shapes-world test image (saved as PNG in `workdir`), one of its questions,
    and a text-only prompt for LLM-only formats."""
    from align.world import WorldConfig
    from align.world.dataset import make_example

    example = make_example("test", 0, seed=0, config=WorldConfig())
    image_path = workdir / "probe.png"
    example["images"][0].save(image_path)
    question = json.loads(example["questions"])[0]["question"]
    return str(image_path), question, f"Question: {question} Answer:"


def verify_export(output_dir: str | os.PathLike, new_tokens: int = 8, timeout: int = 600) -> dict:
    """Re-check the checksums, reload every format of an export in fresh processes and compare it with the source.

    The source (the stage output as trained: an adapter on its base, 4-bit for QLoRA) and the VLM formats are
    loaded in one subprocess that imports this project's `model`; the LLaVA and bare-LLM formats in another one
    that imports only torch, transformers and PEFT (checked). Each format's logits on the fixed batch
    (`probe_batch`) must be within `TOLERANCES` of the source's (max |difference|; adapters 1e-6 absolute, merged
    and LLaVA 1e-5 in float32, 5e-2 in bfloat16, 1e-2 in float16, times max(1, largest |logit|)), its `input_ids`
    equal to the source's, and for float32 formats its greedy tokens equal to the source's. 4-bit bases run the
    float32 dequantized matmul QLoRA trained with (see `load_for_probe`). A QLoRA adapter merged into the original
    weights (`qlora_base="original"`) is compared with the adapter on the unquantized base.

    Returns:
        The report also written to `output_dir/verification.json`: `ok`, `checksums` (`check_checksums`),
        `checksums_ok`, `plain_process_project_modules`, and per format `class`, `dtype`, `reference`,
        `max_abs_diff`, `tolerance`, `logit_scale`, `same_input_ids`, `same_generation`, `generation_checked`, `ok`.
    """
    output_dir = Path(output_dir)
    checksums = check_checksums(output_dir)
    manifest = _read_json(output_dir / MANIFEST_FILE)
    if not manifest:
        raise ValueError(f"{output_dir} has no {MANIFEST_FILE}: not an export")
    report = {"checksums": checksums, "checksums_ok": not any(checksums.values()), "formats": {}}
    dtype = manifest["dtype"]
    source_spec = {
        "kind": "peft-vlm" if manifest["base"] else "vlm", "path": manifest["source"], "base": manifest["base"],
        "quantization": manifest["quantization"], "dtype": "float32",
    }
    vlm_specs, plain_specs = {"source": source_spec}, {}
    if any(entry["kind"] == "peft-llm" for entry in manifest["formats"].values()):
        # The text-only prompt through the source: what the bare-LLM adapter must reproduce.
        vlm_specs["source-text"] = {**source_spec, "text_only": True}
    merged_reference = "source"
    if manifest["quantization"] and manifest["qlora_base"] == "original":
        # Merged into the unquantized base: compared with the adapter on that base, not with the 4-bit model.
        vlm_specs["source-unquantized"] = {**source_spec, "quantization": None}
        merged_reference = "source-unquantized"
    for name, entry in manifest["formats"].items():
        spec = {"kind": entry["kind"], "path": str((output_dir / entry["path"]).resolve())}
        if entry["kind"] in ("peft-vlm", "peft-llm"):
            base = entry["base"]
            spec["base"] = str((output_dir / base).resolve()) if entry["kind"] == "peft-llm" else base
            spec["quantization"], spec["dtype"] = manifest["quantization"], "float32"
        else:
            spec["dtype"] = dtype
        if entry["kind"] == "peft-llm":
            spec["text_only"] = True
        (vlm_specs if entry["kind"] in ("vlm", "peft-vlm") else plain_specs)[name] = spec

    with tempfile.TemporaryDirectory(prefix="export-verify-") as tmp:
        workdir = Path(tmp)
        image, question, text = probe_batch(workdir)
        job = {"image": image, "question": question, "text": text, "new_tokens": new_tokens}
        jobs = [{**job, "specs": vlm_specs, "import_model": True}]
        if plain_specs:
            jobs.append({**job, "specs": plain_specs, "import_model": False})
        done = _run_children(jobs, workdir, timeout)
        results = done[0]["results"]
        if plain_specs:
            plain = done[1]
            if plain["project_modules"]:
                raise RuntimeError(f"the plain-transformers reload imported this project's {plain['project_modules']}")
            results.update(plain["results"])
        report["plain_process_project_modules"] = plain["project_modules"] if plain_specs else None

    for name, spec in {**vlm_specs, **plain_specs}.items():
        if name.startswith("source"):
            continue
        kind = "adapter" if spec["kind"] in ("peft-vlm", "peft-llm") else "merged"
        reference_name = "source-text" if spec["kind"] == "peft-llm" else "source" if kind == "adapter" else merged_reference
        reference, reloaded = results[reference_name], results[name]
        format_dtype = spec.get("dtype", "float32")
        scale = reference["logits"].abs().max().item()
        tolerance = TOLERANCES[kind][format_dtype] * (max(1.0, scale) if kind == "merged" else 1.0)
        same_ids = torch.equal(reloaded["input_ids"], reference["input_ids"])
        diff = (reloaded["logits"] - reference["logits"]).abs().max().item() if same_ids else math.inf
        same_generation = torch.equal(reloaded["generated"], reference["generated"])
        ok = same_ids and diff <= tolerance and (same_generation or format_dtype != "float32")
        report["formats"][name] = {
            "class": reloaded["class"], "dtype": format_dtype, "reference": reference_name,
            "max_abs_diff": diff, "tolerance": tolerance, "logit_scale": scale,
            "same_input_ids": same_ids, "same_generation": same_generation,
            "generation_checked": format_dtype == "float32", "ok": ok,
        }
        logger.info(
            "%s (%s, %s) vs %s: max |Δlogit| %.2e (tolerance %.1e), %s greedy tokens%s", name, reloaded["class"],
            format_dtype, reference_name, diff, tolerance, "same" if same_generation else "different",
            "" if format_dtype == "float32" else " (not required below float32)",
        )
    report["ok"] = report["checksums_ok"] and all(r["ok"] for r in report["formats"].values())
    atomic_write_text(output_dir / VERIFICATION_FILE, json.dumps(report, indent=2) + "\n")
    return report
