"""recipes/pretrain.py end to end: the real script in a subprocess on the tiny configs, a few steps, with tiny parts
and a tiny world built here. Both fusions, bad rows, the caption figures, resuming, and the LLM left untouched."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

import model  # noqa: F401  (registers the VLM with the Auto classes)
from align.world import WorldConfig, build_world
from tests.conftest import save_tiny_llama, save_tiny_siglip
from tests.recipes.test_configs import load_recipe

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
MESSAGES = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """Tiny parts, a tiny world and a small TRL-format dataset with two bad rows."""
    root = tmp_path_factory.mktemp("pretrain")
    world = build_world(str(root / "world"), sizes={"train": 16, "test": 4}, config=WorldConfig(image_size=32))
    rows = world["train"].select(range(6))
    images = [[image] for image, in rows["images"]]
    images[1] = [None]  # save_to_disk embeds files, so a missing image is a row without one
    images[4] = [{"bytes": b"\x89PNG truncated", "path": None}]
    messages = [
        [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Describe the image."}]},
         {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
        for caption in rows["caption"]
    ]
    Dataset.from_dict(
        {"images": images, "messages": messages}, features=Features({"images": List(Image()), "messages": MESSAGES})
    ).save_to_disk(str(root / "captions"))
    return {
        "root": root,
        "siglip": save_tiny_siglip(root / "siglip"),
        "llama": save_tiny_llama(root / "llama", tiny_tokenizer),
        "world": str(root / "world"),
        "captions": str(root / "captions"),
        "cache": str(root / "feature_cache"),
    }


def run_recipe(setup, config, output_dir, *extra, launcher=("python",)):
    args = [
        "recipes/pretrain.py", "--config", f"recipes/configs/tiny/{config}",
        "--vision", setup["siglip"], "--text", setup["llama"], "--world_path", setup["world"],
        "--feature_cache_dir", setup["cache"], "--output_dir", str(output_dir),
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--train_samples", "8",
        "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1", "--eval_captions", "0", *extra,
    ]
    if launcher == ("python",):
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, *args]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((Path(output_dir) / "metrics.json").read_text()), result.stdout + result.stderr


def load_output(path):
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


PREPEND = ("--dataset_path", "{captions}", "--eval_captions", "2", "--eval_batch_size", "2", "--eval_max_new_tokens", "6")


def prepend_args(setup, *extra):
    return [arg.format(**setup) for arg in PREPEND] + list(extra)


@pytest.fixture(scope="module")
def prepend_run(setup):
    output_dir = setup["root"] / "prepend"
    metrics, log = run_recipe(setup, "pretrain.yaml", output_dir, *prepend_args(setup))
    return output_dir, metrics, log


@pytest.mark.slow
def test_prepend_stage1_on_a_dataset_with_bad_rows(setup, prepend_run):
    output_dir, metrics, log = prepend_run
    assert metrics["global_step"] == 4 and metrics["fusion"] == "prepend" and metrics["stage"] == "align"
    # Two bad rows skipped, listed, and the run went on with the other four.
    rejects = [json.loads(line) for line in (output_dir / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["row"], r["reason"]) for r in rejects) == [(1, "missing image"), (4, "corrupt image")]
    assert metrics["data"]["kept"] == 4 and metrics["rows"]["rejected"] == 2
    assert "skipped 2 of 6 rows" in log and "rejects.jsonl" in log
    # Trained on cached features, encoded once.
    assert metrics["data"]["feature_cache"] and metrics["data"]["encoded_images"] == 4
    for when in ("captions_before", "captions_after"):
        assert metrics[when]["num_captions"] == 2 and 0 <= metrics[when]["caption_match"] <= 1

    vlm, processor = load_output(output_dir)
    assert vlm.config.fusion == "prepend" and type(processor).__name__ == "VLMProcessor"
    image = PILImage.new("RGB", (32, 32), (200, 0, 0))
    batch = processor(images=[[image]], text=["<image>Describe the image."], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(vlm(**batch).logits).all()
    # The projectors' input standardisation was fitted on the four kept images (every patch) and saved.
    mean, std, count = vlm.model.projectors.feature_statistics(0)
    assert metrics["feature_standardization"]["images"] == 4 and count == 4 * vlm.config.vision_patches_per_image(0)
    assert vlm.model.projectors.standardized and not torch.all(mean == 0) and torch.all(std > 0)
    # The LLM and the tower were frozen: the saved ones are the parts' own.
    base = AutoModelForCausalLM.from_pretrained(setup["llama"])
    torch.testing.assert_close(vlm.model.language_model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)

    # The resolved config reads back into the recipe's dataclasses.
    parser = load_recipe("pretrain").make_parser()
    script_args, training_args, _ = parser.parse_args_and_config(["--config", str(output_dir / "config.yaml")])
    assert script_args.dataset_path == setup["captions"] and training_args.max_steps == 4


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(setup, prepend_run, tmp_path):
    output_dir, finished, _ = prepend_run
    # As if killed right after step 2's checkpoint: drop everything written later.
    stopped = tmp_path / "stopped"
    shutil.copytree(output_dir, stopped)
    shutil.rmtree(stopped / "checkpoint-4")
    for name in ("model.safetensors", "metrics.json", "config.yaml"):
        (stopped / name).unlink()
    assert (stopped / "checkpoint-2").is_dir()

    # The same command again (with an explicit --resume_from_checkpoint, as a user continuing on purpose).
    metrics, log = run_recipe(setup, "pretrain.yaml", stopped, *prepend_args(setup, "--resume_from_checkpoint", "last"))
    assert metrics["resumed_from_checkpoint"].endswith("checkpoint-2")
    assert metrics["global_step"] == 4
    assert len(re.findall(r"\{'loss': ", log)) == 2  # only steps 3 and 4 ran (the history has 1-2 from the checkpoint)
    assert metrics["data"]["encoded_images"] == 0  # the feature cache was reused
    # The same result as the uninterrupted run.
    resumed, _ = load_output(stopped)
    reference, _ = load_output(output_dir)
    for (name, value), (_, expected) in zip(resumed.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    steps, losses = zip(*metrics["loss"]["history"])
    assert steps == (1, 2, 3, 4) and losses == pytest.approx([loss for _, loss in finished["loss"]["history"]], abs=1e-5)

    # Other settings into the same folder: refused, naming them (the run's settings were recorded when it started).
    assert json.loads((stopped / "run_settings.json").read_text())["dataset_path"] == setup["captions"]
    with pytest.raises(AssertionError, match=r"holds a run with other settings \(learning_rate: [0-9.e-]+ -> 0.0123\)"):
        run_recipe(setup, "pretrain.yaml", stopped, *prepend_args(setup, "--learning_rate", "0.0123"))


@pytest.mark.slow
def test_cross_attention_stage1_leaves_the_llm_untouched(setup, tiny_tokenizer):
    output_dir = setup["root"] / "cross_attention"
    metrics, _ = run_recipe(
        setup, "pretrain_cross_attention.yaml", output_dir, "--learning_rate", "5e-2",
        launcher=("--config_file", "recipes/accelerate/single.yaml"),
    )
    assert metrics["fusion"] == "cross_attention" and metrics["data"]["feature_cache"]
    vlm, processor = load_output(output_dir)
    gates = torch.cat([block.attn_gate.flatten() for block in vlm.model.cross_attention.values()])
    assert gates.abs().max() > 0  # the adapters trained (their gates opened)

    base = AutoModelForCausalLM.from_pretrained(setup["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    ids = tokenizer(["a red circle and two blue squares.", "Question: How many circles are there?"],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        text_only = vlm(**ids).logits
        expected = base(**ids).logits
    torch.testing.assert_close(text_only, expected, rtol=0, atol=1e-5)
    # With an image, the trained adapters do change the output.
    image = PILImage.new("RGB", (32, 32), (0, 0, 200))
    batch = processor(images=[[image]], text=["<image>a red circle"], return_tensors="pt")
    with torch.no_grad():
        with_image = vlm(**batch).logits
        without_image = vlm(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(with_image, without_image, atol=1e-4)


@pytest.mark.slow
def test_stages_run_as_successive_invocations(setup):
    """prealign (towers train: pixels, no cache) -> align from its output (towers frozen again: a new cache)."""
    first, second = setup["root"] / "prealign", setup["root"] / "align"
    prealign, _ = run_recipe(setup, "pretrain.yaml", first, "--stage", "prealign", "--max_steps", "2")
    assert prealign["stage"] == "prealign" and not prealign["data"]["feature_cache"]
    align, log = run_recipe(
        setup, "pretrain.yaml", second, "--stage", "align", "--model_name_or_path", str(first), "--max_steps", "2"
    )
    assert f"loaded the VLM at {first}" in log
    # The standardisation fitted in prealign stays: the second stage's projectors were trained with it.
    assert "feature_standardization" in prealign and "feature_standardization" not in align
    # The towers changed in prealign, so their features are encoded afresh (8 rows, all new to the cache).
    assert align["data"]["feature_cache"] and align["data"]["encoded_images"] == 8
    tower = "encoder.layers.0.mlp.fc1.weight"
    base = AutoModel.from_pretrained(setup["siglip"]).state_dict()[tower]
    s1, s2 = (AutoModelForImageTextToText.from_pretrained(p).state_dict()[f"model.vision_towers.0.{tower}"]
              for p in (first, second))
    assert not torch.equal(base, s1) and torch.equal(s1, s2)
    stats = [AutoModelForImageTextToText.from_pretrained(p).model.projectors.feature_statistics(0) for p in (first, second)]
    assert torch.equal(stats[0][0], stats[1][0]) and stats[0][2] == stats[1][2] > 0


def test_grounded_stage_trains_the_llm_on_captions_and_questions(setup, prepend_run):
    """A second stage from stage 1's output (`finetune`: adapters and LLM), on the world's captions and every question
    of the chosen categories about the same images; the towers stay frozen and read from the cache."""
    output_dir = setup["root"] / "grounded"
    metrics, log = run_recipe(
        setup, "pretrain.yaml", output_dir, "--stage", "finetune", "--model_name_or_path", str(prepend_run[0]),
        "--world_questions", "color", "count", "--max_steps", "2",
    )
    import datasets

    from align.world import question_rows

    world = datasets.load_from_disk(setup["world"])["train"].select(range(8))
    expected = 8 + len(question_rows(world, categories=["color", "count"]))
    assert metrics["rows"]["train"] == expected and metrics["data"]["feature_cache"]
    llm = "model.language_model.layers.0.mlp.up_proj.weight"
    before, after = (AutoModelForImageTextToText.from_pretrained(p).state_dict()[llm] for p in (prepend_run[0], output_dir))
    assert not torch.equal(before, after)


def test_the_recipe_names_bad_world_questions():
    parser = load_recipe("pretrain").make_parser()
    config = ["--config", str(REPO / "recipes/configs/tiny/pretrain.yaml")]
    with pytest.raises(ValueError, match="unknown categories \\['colour'\\]"):
        parser.parse_args_and_config([*config, "--world_questions", "colour"])
    with pytest.raises(ValueError, match="leave dataset_path unset"):
        parser.parse_args_and_config([*config, "--world_questions", "count", "--dataset_path", "x"])
    args = parser.parse_args_and_config([*config, "--world_questions", "count", "spatial", "--question_repeats", "spatial=4"])
    assert args[0].question_repeat_counts() == {"spatial": 4}
    args = parser.parse_args_and_config([*config, "--world_questions", "spatial", "--question_repeats", "spatial:yes_no=8"])
    assert args[0].question_repeat_counts() == {"spatial:yes_no": 8}
    args = parser.parse_args_and_config([*config, "--world_questions", "spatial", "--question_repeats", "spatial:yes_no:one_shape=32"])
    assert args[0].question_repeat_counts() == {"spatial:yes_no:one_shape": 32}
    args = parser.parse_args_and_config([*config, "--world_questions", "color", "--question_repeats", "color:several=8"])
    assert args[0].question_repeat_counts() == {"color:several": 8}
    with pytest.raises(ValueError, match="only spatial:yes_no questions are split"):
        parser.parse_args_and_config([*config, "--world_questions", "spatial", "--question_repeats", "spatial:choice:one_shape=2"])
    with pytest.raises(ValueError, match="category=N"):
        parser.parse_args_and_config([*config, "--world_questions", "count", "--question_repeats", "count:2"])
    with pytest.raises(ValueError, match="'spatial', which is not among the questions"):
        parser.parse_args_and_config([*config, "--world_questions", "count", "--question_repeats", "spatial=2"])
    with pytest.raises(ValueError, match="the answer type 'which' in 'spatial:which'"):
        parser.parse_args_and_config([*config, "--world_questions", "spatial", "--question_repeats", "spatial:which=2"])
    args = parser.parse_args_and_config([*config, "--world_questions", "spatial", "--spatial_reasoning", "true"])
    assert args[0].spatial_reasoning is True
    with pytest.raises(ValueError, match="add spatial to world_questions"):
        parser.parse_args_and_config([*config, "--world_questions", "count", "--spatial_reasoning", "true"])


def test_the_recipe_refuses_the_cache_for_a_stage_that_trains_the_towers():
    parser = load_recipe("pretrain").make_parser()
    argv = ["--config", str(REPO / "recipes/configs/tiny/pretrain.yaml"), "--stage", "prealign"]
    with pytest.raises(ValueError, match="use_feature_cache=true cannot be used with stage 'prealign'"):
        parser.parse_args_and_config([*argv, "--use_feature_cache", "true"])
    script_args, _, _ = parser.parse_args_and_config(argv)
    assert script_args.use_feature_cache == "auto"


def test_the_recipe_names_a_bad_standardize_images():
    parser = load_recipe("pretrain").make_parser()
    with pytest.raises(ValueError, match="standardize_images must be positive"):
        parser.parse_args_and_config(["--config", str(REPO / "recipes/configs/tiny/pretrain.yaml"), "--standardize_images", "0"])


def test_grounded_stage_keeps_text_rows_beside_the_image_rows(setup, prepend_run):
    """`text_fraction`: text-only documents (here a JSONL file of one's own) train beside the grounded rows."""
    documents = setup["root"] / "documents.jsonl"
    documents.write_text("".join(json.dumps({"text": f"document {i}: a red circle."}) + "\n" for i in range(5)))
    output_dir = setup["root"] / "grounded_text"
    metrics, log = run_recipe(
        setup, "pretrain.yaml", output_dir, "--stage", "finetune", "--model_name_or_path", str(prepend_run[0]),
        "--world_questions", "color", "--max_steps", "2", "--text_fraction", "0.5",
        "--text_dataset_path", str(documents),
    )
    images = metrics["rows"]["train"]
    assert metrics["data"]["text_rows"] == images and f"and {images} text-only rows" in log


def test_the_recipe_names_bad_text_settings():
    parser = load_recipe("pretrain").make_parser()
    config = ["--config", str(REPO / "recipes/configs/tiny/pretrain.yaml")]
    with pytest.raises(ValueError, match="stage 'align' freezes the LLM"):
        parser.parse_args_and_config([*config, "--text_fraction", "0.2"])
    with pytest.raises(ValueError, match="text_fraction must be in \\[0, 1\\)"):
        parser.parse_args_and_config([*config, "--stage", "finetune", "--text_fraction", "1.0"])
    with pytest.raises(ValueError, match="set text_fraction above 0"):
        parser.parse_args_and_config([*config, "--text_dataset_path", "docs.jsonl"])
    with pytest.raises(ValueError, match="need their documents: set text_dataset_path"):
        parser.parse_args_and_config([*config, "--stage", "finetune", "--text_fraction", "0.2", "--dataset_path", "x"])
    args = parser.parse_args_and_config([*config, "--stage", "finetune", "--text_fraction", "0.2",
                                         "--text_dataset_path", "missing.jsonl"])
    with pytest.raises(ValueError, match="text_dataset_path 'missing.jsonl' does not exist"):
        args[0].text_documents(None)
