"""Tiny VLM directories, a tiny shapes world, data files with bad rows, and a recipe runner, shared by the
post-training library tests and the SFT/DPO recipe tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32  # the tiny SigLIP's input size (conftest.save_tiny_siglip)


def tiny_world(path: Path, images: int = 12) -> str:
    """A shapes world with `images` training images at the tiny tower's size, saved like the zoo's."""
    from align.world import WorldConfig, build_world

    if not (path / "dataset_dict.json").exists():
        build_world(str(path), sizes={"train": images}, config=WorldConfig(image_size=IMAGE_SIZE), seed=0)
    return str(path)


def tiny_vlm(path: Path, vision: str, text: str, fusion: str = "prepend") -> str:
    """A built VLM directory (model + processor), as `python -m model.build` writes it."""
    from model.build import build_vlm

    if not (path / "config.json").exists():
        model, processor = build_vlm(vision, text, fusion=fusion)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return str(path)


def _image(path: Path, rgb) -> str:
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rgb).save(path)
    return path.name


def sft_rows_with_bad_ones(folder: Path) -> tuple[str, dict[str, int]]:
    """A TRL-format JSONL of SFT rows (8 good) and one bad row of each kind; returns its path and the expected
    rejects per reason."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    images = {name: _image(folder / f"{name}.png", rgb) for name, rgb in colors.items()}
    (folder / "broken.png").write_bytes(b"not a png")

    def row(image, answer, question="What color is the square?", n_images=1):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return {
            "images": image if isinstance(image, list) else [image],
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Yes, it is {answer}."}]},
            ],
        }

    rows = [row(images[name], name) for name in colors] * 2
    rows += [
        row("missing.png", "red"),  # missing image
        row("broken.png", "red"),  # corrupt image
        row([images["red"], images["blue"]], "red"),  # two images, one placeholder
        row(images["green"], "  "),  # empty answer
    ]
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {"missing image": 1, "corrupt image": 1, "image count mismatch": 1, "empty answer": 1}
    return str(path), expected


def preference_rows_with_bad_ones(folder: Path) -> tuple[str, dict[str, int]]:
    """An RLAIF-V-format JSONL of preference rows (8 good), one with chosen == rejected and one missing image."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    images = {name: _image(folder / f"{name}.png", rgb) for name, rgb in colors.items()}
    names = list(colors)
    rows = [
        {"question": "What color is the square?", "chosen": name, "rejected": names[(i + 1) % 4], "image": images[name]}
        for i, name in enumerate(names)
    ] * 2
    rows += [
        {"question": "What color is the square?", "chosen": "red", "rejected": "red", "image": images["red"]},
        {"question": "What color is the square?", "chosen": "red", "rejected": "blue", "image": "missing.png"},
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), {"chosen == rejected": 1, "missing image": 1}


# Settings every tiny recipe run shares: CPU, fp32, no checkpointing of activations, no network logger.
TINY_TRAINING = {
    "dtype": "float32",
    "bf16": False,
    "use_cpu": True,
    "activation_checkpointing": False,
    "per_device_train_batch_size": 2,
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "tensorboard",
    "dataloader_num_workers": 0,
    "seed": 0,
}


def lora_config(model: str, output_dir, **settings) -> dict:
    """A tiny recipe config: `TINY_TRAINING` with LoRA (r 8) on `model`, 2 steps into `output_dir`, then `settings`."""
    return {
        **TINY_TRAINING, "model_name_or_path": model, "output_dir": str(output_dir), "use_peft": True, "lora_r": 8,
        "lora_alpha": 16, "max_steps": 2, **settings,
    }


def check_run_output(recipe: str, output_dir: Path, steps: int) -> tuple[dict, tuple]:
    """What every training recipe leaves: weights (an adapter or a whole model), the processor, TensorBoard events,
    a `config.yaml` that re-parses into the recipe's arguments for this output folder, and `metrics.json` at `steps`.
    Returns the metrics and the re-parsed arguments."""
    assert (output_dir / "adapter_model.safetensors").is_file() or (output_dir / "model.safetensors").is_file()
    assert (output_dir / "processor_config.json").is_file()
    assert list(output_dir.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"
    parsed = load_recipe(recipe).make_parser().parse_args_and_config(["--config", str(output_dir / "config.yaml")])
    assert parsed[1].output_dir == str(output_dir)
    metrics = read_json(output_dir / "metrics.json")
    assert metrics["global_step"] == steps
    return metrics, parsed


def run_recipe(
    script: str, config: dict, folder: Path, *overrides: str, processes: int = 1, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `recipes/<script>` in a subprocess on `config` (written as a YAML next to the run), plainly or under
    `accelerate launch` with `processes` CPU processes (DDP over gloo); fail with the run's output."""
    args = _recipe_args(script, config, folder, overrides)
    if processes > 1:
        accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
        command = [
            *accelerate, "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", str(processes),
            "--mixed_precision", "no", "--main_process_port", str(_free_port()), *args,
        ]
    else:
        command = [sys.executable, *args]
    env = offline_environment(processes)
    if processes > 1:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        result = _run_forked(command, env, folder, timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def _recipe_args(script: str, config: dict, folder: Path, overrides) -> list[str]:
    """`recipes/<script> --config <config written into folder> overrides...`."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{Path(script).stem}-{len(list(folder.glob('*.yaml')))}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return [str(REPO / "recipes" / script), "--config", str(config_path), *overrides]


def offline_environment(processes: int = 1) -> dict[str, str]:
    """The environment the suite runs recipes in: offline, no progress bars, one CPU thread per process when
    `processes` run side by side."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
    }


def run_until_killed(
    script: str, config: dict, folder: Path, ready, *overrides: str, timeout: float = 300, pipeline: bool = False
) -> str:
    """Start `recipes/<script>` on `config` as `run_recipe` does, kill it with SIGKILL the moment `ready()` holds
    (polled every 20 ms), and return what it printed. A `pipeline` recipe (rounds, students) runs in a session of
    its own and the kill takes every process of it, as a preemption would; others are forked like `run_recipe`'s.

    Fails when the run ends before `ready()` holds, or after `timeout` seconds.
    """
    args = _recipe_args(script, config, folder, overrides)
    output = folder / f"{Path(script).stem}.killed.log"
    if pipeline:
        return kill_when([sys.executable, *args], ready, output, timeout)
    from align.pipeline import start_forked

    output.write_text("")
    child = start_forked(args[0], args[1:], offline_environment(), output, output)
    _kill_when_ready(script, ready, child.is_alive, child.kill, output, timeout)
    child.join()
    return output.read_text()


def kill_when(command: list[str], ready, output: Path, timeout: float = 300, processes: int = 1) -> str:
    """Run `command` in a session of its own, its output to `output`, and SIGKILL all of its processes the moment
    `ready()` holds; returns what it printed (fails as `run_until_killed` does). `processes`: as many run side by
    side (`offline_environment`)."""
    import signal

    with open(output, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=offline_environment(processes), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _kill_when_ready(command[1], ready, lambda: proc.poll() is None, lambda: os.killpg(proc.pid, signal.SIGKILL),
                         output, timeout)
    finally:
        proc.wait()
    return output.read_text()


def _kill_when_ready(name: str, ready, running, kill, output: Path, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if not running():
                raise AssertionError(f"{name} ended before the kill point:\n{output.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not reach the kill point in {timeout} s:\n{output.read_text()[-6000:]}")
            time.sleep(0.02)
    finally:
        if running():
            kill()


def _run_forked(command: list[str], env: dict, folder: Path, timeout: int) -> subprocess.CompletedProcess:
    """A single-process recipe run forked from the pipeline's forkserver (`align.pipeline.run_forked`): the same
    script as `__main__` in its own process, without importing the libraries again (`bench/launchers.py`: 11.9 s
    vs 3.8 s per evaluation step on a 2-core machine, and the suite runs dozens)."""
    from align.pipeline import run_forked

    stdout, stderr = (folder / f"{Path(command[1]).stem}.{name}" for name in ("stdout", "stderr"))
    for path in (stdout, stderr):
        path.write_text("")
    returncode = run_forked(command[1], command[2:], env, stdout, stderr, timeout=timeout)
    return subprocess.CompletedProcess(command, returncode, stdout.read_text(), stderr.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_recipe(name: str):
    """`recipes/<name>.py` as a module (recipes are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_yaml(path: Path, config: dict) -> str:
    """Write a recipe config; returns its path as a string (what a pipeline's `*_config` field takes)."""
    path.write_text(yaml.safe_dump(config))
    return str(path)


# What every real-scale config's test changes to run it on tiny stand-ins, in-process: CPU, float32, one step.
ONE_CPU_STEP = dict(
    dtype="float32", bf16=False, use_cpu=True, attn_implementation=None, max_steps=1, gradient_accumulation_steps=1,
    dataloader_num_workers=0, activation_checkpointing=False,
)


def real_config(recipe: str) -> dict:
    """`recipes/configs/real/<recipe>.yaml`, as a dict to point at tiny stand-ins."""
    return yaml.safe_load((REPO / "recipes" / "configs" / "real" / f"{recipe}.yaml").read_text())


def run_real_config(recipe: str, config: dict, folder: Path) -> dict:
    """Run `recipes/<recipe>.py`'s `main` in-process on `config` (written to `folder/real.yaml`) with
    `ONE_CPU_STEP` over it; returns the run's `metrics.json`."""
    path = write_yaml(folder / "real.yaml", {**config, **ONE_CPU_STEP})
    module = load_recipe(recipe)
    module.main(*module.make_parser().parse_args_and_config(["--config", path]))
    return read_json(Path(config["output_dir"]) / "metrics.json")
