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
    """`make recipes` runs stage 1, the grounded stage and the binding stage of cross-attention fusion in order:
    each starts from the previous one's output; the grounded stage trains the LLM beside text rows, and the binding
    stage trains the adapters alone, so the text the LLM keeps is the grounded stage's."""
    import yaml

    chain = [yaml.safe_load((REPO / "recipes" / "configs" / "tiny" / f"{name}.yaml").read_text()) for name in (
        "pretrain_cross_attention", "pretrain_grounded_cross_attention", "pretrain_binding_cross_attention")]
    for previous, config in zip(chain, chain[1:]):
        assert config["model_name_or_path"] == previous["output_dir"]
    grounded, binding = chain[1:]
    assert grounded["stage"] == "finetune" and grounded["text_fraction"] > 0
    assert binding["stage"] == "align" and not binding.get("text_fraction")
    makefile = (REPO / "Makefile").read_text()
    launched = [makefile.index(f"$(TINY)/{name}.yaml") for name in (
        "pretrain_cross_attention", "pretrain_grounded_cross_attention", "pretrain_binding_cross_attention")]
    assert launched == sorted(launched)
    assert f"--model_name_or_path {binding['output_dir']} --output_dir runs/tiny/sft_cross_attention" in makefile
