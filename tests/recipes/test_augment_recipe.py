"""recipes/augment.py end to end: the real script in a subprocess on a tiny world and a tiny random Llama."""

import json

import datasets
import pytest
import yaml

from tests.align.training_helpers import REPO, load_recipe, read_json, run_recipe, tiny_world

IMAGES = 4
SAMPLES = 2


def test_augment_recipe_writes_rows_log_metrics_and_config(tiny_parts, tmp_path):
    world = tiny_world(tmp_path / "world", images=IMAGES)
    output_dir = tmp_path / "out"
    config = {
        "llm_name_or_path": tiny_parts["llama"], "world_path": world, "world_split": "train", "filter": "auto",
        "samples_per_caption": SAMPLES, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24, "batch_size": 4,
        "output_dir": str(output_dir), "seed": 0,
    }
    run_recipe("augment.py", config, tmp_path)

    stats = read_json(output_dir / "metrics.json")
    assert stats["captions"] == IMAGES and stats["texts"] == IMAGES * SAMPLES
    assert stats["generated"] == stats["kept"] + sum(stats["rejected"].values())
    assert stats["unique"] == stats["generated"] - stats["rejected"]["unparseable"] - stats["rejected"]["duplicate"]
    log = [json.loads(line) for line in (output_dir / "generated.jsonl").read_text().splitlines()]
    assert len(log) == IMAGES * SAMPLES and sum(entry["lines"] for entry in log) == stats["generated"]
    kept = datasets.load_from_disk(str(output_dir / "data"))
    assert len(kept) == stats["kept"]
    assert set(kept.column_names) >= {"images", "messages", "category", "record", "image_id"}
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert resolved["samples_per_caption"] == SAMPLES and resolved["filter"] == "auto"


@pytest.mark.parametrize(
    "override, message",
    [
        (["--temperature", "0"], "temperature must be > 0"),
        (["--top_p", "1.5"], "top_p must be in"),
        (["--filter", "vibes"], "filter must be one of"),
        (["--filter", "reward"], "reward_model_name_or_path"),
        (["--prompt_template", "{caption} Q:"], "prompt_template must contain"),
    ],
)
def test_augment_recipe_names_a_bad_parameter(override, message, tmp_path):
    # Parsed exactly as `python recipes/augment.py --config ... <override>` parses its arguments.
    parser = load_recipe("augment").make_parser()
    with pytest.raises(ValueError, match=message):
        parser.parse_args_and_config(
            ["--config", str(REPO / "recipes/configs/tiny/augment.yaml"), "--output_dir", str(tmp_path), *override]
        )
