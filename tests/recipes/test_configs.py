"""Every YAML under recipes/configs parses into its recipe's dataclasses, so configs cannot drift from code.

A config names its recipe in its header comment, in the launch command (`... recipes/<name>.py --config ...`), and
every recipe exposes `make_parser()` returning its `TrlParser`.
"""

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))
RECIPE_IN_HEADER = re.compile(r"recipes/(\w+)\.py")


def load_recipe(name: str):
    """Import `recipes/<name>.py` as a module (without running it), under a name that shadows no library."""
    path = REPO / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_of(config: Path) -> str:
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    found = RECIPE_IN_HEADER.search("\n".join(header))
    if found is None:
        raise AssertionError(f"{config.relative_to(REPO)}: its header comment names no recipes/<name>.py launch command")
    return found.group(1)


def test_there_are_configs():
    assert any(config.name == "pretrain.yaml" for config in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "recipes" / "configs")) for c in CONFIGS])
def test_config_parses_into_its_recipe(config):
    recipe = load_recipe(recipe_of(config))
    assert hasattr(recipe, "make_parser"), f"recipes/{recipe_of(config)}.py has no make_parser()"
    parsed = recipe.make_parser().parse_args_and_config(["--config", str(config)])
    assert parsed and all(p is not None for p in parsed)


def test_the_cross_attention_stages_follow_one_another_and_keep_the_text():
    """`make recipes` runs stage 1, the grounded, binding and annealing stages of cross-attention fusion in order:
    each starts from the previous one's output; the grounded and annealing stages train the LLM beside text rows, the
    binding stage trains the adapters alone, so the text the LLM keeps is the grounded stage's; the annealing stage
    answers the spatial questions in the form SFT then trains, and SFT starts from its output with the SFT config's
    own settings."""
    import yaml

    names = ("pretrain_cross_attention", "pretrain_grounded_cross_attention", "pretrain_binding_cross_attention",
             "pretrain_anneal_cross_attention")
    chain = [yaml.safe_load((REPO / "recipes" / "configs" / "tiny" / f"{name}.yaml").read_text()) for name in names]
    for previous, config in zip(chain, chain[1:]):
        assert config["model_name_or_path"] == previous["output_dir"]
    grounded, binding, anneal = chain[1:]
    assert grounded["stage"] == "finetune" and grounded["text_fraction"] > 0
    assert binding["stage"] == "align" and not binding.get("text_fraction")
    assert anneal["stage"] == "finetune" and anneal["text_fraction"] > 0
    assert anneal["learning_rate"] < grounded["learning_rate"]
    sft = yaml.safe_load((REPO / "recipes" / "configs" / "tiny" / "sft.yaml").read_text())
    assert anneal["spatial_reasoning"] == sft["spatial_reasoning"]
    makefile = (REPO / "Makefile").read_text()
    launched = [makefile.index(f"$(TINY)/{name}.yaml") for name in names]
    assert launched == sorted(launched)
    sft_line = f"--model_name_or_path {anneal['output_dir']} --output_dir runs/tiny/sft_cross_attention\n"
    assert sft_line in makefile
