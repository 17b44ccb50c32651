"""recipes/rounds.py end to end: one round (rejection sampling -> SFT on the kept answers mixed with the original
data -> DPO on the new pairs -> evaluation; or GRPO -> evaluation) on tiny stage configs, every stage a real recipe
in its own process."""

import json

import pytest
import yaml

from tests.align.training_helpers import (
    TINY_TRAINING,
    load_recipe,
    read_json,
    run_recipe,
    tiny_vlm,
    tiny_world,
    write_yaml,
)


@pytest.fixture(scope="module")
def setup(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    world = tiny_world(root / "world", images=12)
    lora = {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_length": None, "max_steps": 2}
    configs = {
        # A random tiny policy rarely answers right: keep each prompt's best and pair it with its worst regardless.
        "rejection_sampling_config": write_yaml(root / "rs.yaml", {
            "dtype": "float32", "world_path": world, "dataset_split": "train", "output_dir": "unused",
            "num_candidates": 3, "max_new_tokens": 6, "prompts_per_batch": 4, "sft_threshold": 0.0, "min_margin": 0.0,
        }),
        "sft_config": write_yaml(root / "sft.yaml", {
            **TINY_TRAINING, **lora, "output_dir": "unused", "world_path": world, "assistant_only_loss": True,
            "refusal_weight": 0.1,
        }),
        "dpo_config": write_yaml(root / "dpo.yaml", {
            **TINY_TRAINING, **lora, "output_dir": "unused", "beta": 0.1, "precompute_ref_log_probs": True,
        }),
        "grpo_config": write_yaml(root / "grpo.yaml", {
            **TINY_TRAINING, **{k: v for k, v in lora.items() if k != "max_length"}, "output_dir": "unused",
            "world_path": world, "num_generations": 4,
            "per_device_train_batch_size": 8, "max_completion_length": 6, "beta": 0.04,
        }),
        "evaluate_config": write_yaml(root / "eval.yaml", {
            "dtype": "float32", "world_path": world, "dataset_split": "train", "output_dir": "unused",
            "num_questions": 6, "batch_size": 6, "max_new_tokens": 6,
        }),
    }
    return {"root": root, "vlm": tiny_vlm(root / "vlm", tiny_parts["siglip"], tiny_parts["llama"]), **configs}


def round_config(setup, out) -> dict:
    return {
        "policy": setup["vlm"], "output_dir": str(out), "rounds": 1, "prompts_per_round": 8,
        **{k: setup[k] for k in ("rejection_sampling_config", "sft_config", "dpo_config", "evaluate_config")},
    }


@pytest.fixture(scope="module")
def one_round(setup):
    """One uninterrupted round: rejection sampling -> SFT -> DPO -> evaluation."""
    out = setup["root"] / "one-round"
    run_recipe("rounds.py", round_config(setup, out), setup["root"], timeout=900)
    return out


@pytest.mark.slow
def test_one_round_on_tiny_configs(setup, one_round, tmp_path):
    out = one_round
    config = round_config(setup, out)
    summary = read_json(out / "metrics.json")
    (round1,) = summary["rounds"]
    assert round1["start_policy"] == setup["vlm"] and round1["policy"] == str(out / "round1" / "dpo")
    assert round1["rejection_sampling"]["prompts"] == 8 and round1["rejection_sampling"]["sft_rows"] == 8
    assert round1["eval"]["total"] == 6 and summary["initial_eval"]["total"] == 6
    board = (out / "scoreboard.md").read_text()
    assert "| round 0 | 6 |" in board and "| round 1 | 6 |" in board
    # Round 1 minus round 0 on the same questions.
    paired = summary["paired"]["round 1 − round 0"]
    assert paired["questions"] == 6
    assert paired["a_only"] - paired["b_only"] == round1["eval"]["correct"] - summary["initial_eval"]["correct"]
    assert "| round 1 − round 0 | 6 | " in board

    # The SFT mixed the kept answers with the original data; DPO trained on the round's pairs.
    sft_log = (out / "round1" / "sft.log").read_text()
    assert "mixture: rejection_sampled gives" in sft_log and "mixture: world gives" in sft_log
    assert read_json(out / "round1" / "dpo" / "metrics.json")["rows"]["train"] == round1["rejection_sampling"]["dpo_pairs"]

    # Every derived config re-parses into its recipe and names the round's inputs.
    for name, script in (("rejection_sampling", "rejection_sampling"), ("sft", "sft"), ("dpo", "dpo"), ("eval", "evaluate")):
        parsed = load_recipe(script).make_parser().parse_args_and_config(["--config", str(out / "round1" / f"{name}.yaml")])
        assert parsed and all(p is not None for p in parsed)
    sampling = yaml.safe_load((out / "round1" / "rejection_sampling.yaml").read_text())
    assert sampling["model_name_or_path"] == setup["vlm"] and sampling["prompt_offset"] == 0

    # A second run reuses every finished step.
    again = run_recipe("rounds.py", config, tmp_path, timeout=300)
    assert again.stdout.count("done before, reusing") == 5

    # The same pipeline with other settings for a finished step is refused, naming them. (A round killed in the
    # middle and rerun: `make demo`'s in tests/recipes/test_crash_safety.py.)
    with pytest.raises(AssertionError, match=r"ran before .* with other settings \(.*num_candidates"):
        rs = yaml.safe_load(open(setup["rejection_sampling_config"]))
        other = tmp_path / "rs-other.yaml"
        other.write_text(yaml.safe_dump({**rs, "num_candidates": 4}))
        run_recipe("rounds.py", {**config, "rejection_sampling_config": str(other)}, tmp_path, timeout=300)


@pytest.mark.slow
def test_one_grpo_round(setup, tmp_path):
    out = tmp_path / "rounds"
    config = {
        "policy": setup["vlm"], "output_dir": str(out), "rounds": 1, "prompts_per_round": 8, "algorithm": "grpo",
        "categories": ["count", "spatial"], **{k: setup[k] for k in ("grpo_config", "evaluate_config")},
    }
    run_recipe("rounds.py", config, tmp_path, timeout=600)
    summary = read_json(out / "metrics.json")
    (round1,) = summary["rounds"]
    assert round1["algorithm"] == "grpo" and round1["policy"] == str(out / "round1" / "grpo")
    assert round1["grpo"]["steps"] == 2 and round1["grpo"]["prompts"] == 8 and round1["grpo"]["kl_last"] >= 0
    assert round1["eval"]["total"] == 6 and "round 1 − round 0" in summary["paired"]
    derived = yaml.safe_load((out / "round1" / "grpo.yaml").read_text())
    assert derived["model_name_or_path"] == setup["vlm"] and derived["categories"] == ["count", "spatial"]
    assert load_recipe("grpo").make_parser().parse_args_and_config(["--config", str(out / "round1" / "grpo.yaml")])


def test_rounds_aim_sampling_at_categories(setup, tmp_path):
    """`categories` reaches each round's rejection-sampling config, whose prompts are then only of those categories,
    round r taking the r-th slice of them."""
    rounds = load_recipe("rounds")
    (args,) = rounds.make_parser().parse_dict({
        "policy": setup["vlm"], "output_dir": str(tmp_path), "prompts_per_round": 5, "categories": ["count", "spatial"],
        **{k: setup[k] for k in ("rejection_sampling_config", "sft_config", "dpo_config", "evaluate_config")},
    })
    sampling = load_recipe("rejection_sampling")
    prompts = {}
    for number in (1, 2):
        step = rounds.sampling_step(args, number, setup["vlm"])
        script_args, _ = sampling.make_parser().parse_args_and_config(["--config", str(step.config)])
        assert script_args.categories == ["count", "spatial"] and script_args.prompt_offset == 5 * (number - 1)
        prompts[number] = sampling.load_prompts(script_args, tmp_path / f"round{number}")
    assert [len(p) for p in prompts.values()] == [5, 5]
    assert {c for p in prompts.values() for c in p["category"]} <= {"count", "spatial"}
    first, second = ([json.dumps(row["prompt"]) + row["image_id"] for row in p] for p in prompts.values())
    assert not set(first) & set(second)


def test_round_overrides_reach_the_stage_configs(setup, tmp_path):
    """`sft_learning_rate` reaches each round's SFT config, `sft_max_pass_rate` its rejection sampling's,
    `verify_reasons` its rejection sampling's and GRPO's, and `eval_split` every evaluation's (round 0's too), each
    re-parsed by its own recipe."""
    rounds = load_recipe("rounds")
    (args,) = rounds.make_parser().parse_dict({
        "policy": setup["vlm"], "output_dir": str(tmp_path), "sft_learning_rate": 1.0e-4, "eval_split": "validation",
        "sft_max_pass_rate": 0.8, "verify_reasons": True,
        **{k: setup[k] for k in ("rejection_sampling_config", "sft_config", "dpo_config", "evaluate_config", "grpo_config")},
    })
    sampling = rounds.sampling_step(args, 1, setup["vlm"])
    script_args, _ = load_recipe("rejection_sampling").make_parser().parse_args_and_config(["--config", str(sampling.config)])
    assert script_args.sft_max_pass_rate == 0.8 and script_args.verify_reasons
    grpo = rounds.grpo_step(args, 1, setup["vlm"])
    parsed = load_recipe("grpo").make_parser().parse_args_and_config(["--config", str(grpo.config)])
    assert [group.verify_reasons for group in parsed if hasattr(group, "verify_reasons")] == [True]
    sft = rounds.sft_step(args, 1, setup["vlm"], sampled_rows=4)
    parsed = load_recipe("sft").make_parser().parse_args_and_config(["--config", str(sft.config)])
    assert [group.learning_rate for group in parsed if hasattr(group, "learning_rate")] == [1.0e-4]
    for step in (rounds.evaluation_step(args, tmp_path, "round0-eval", setup["vlm"], 0),
                 rounds.evaluation_step(args, tmp_path / "round1", "eval", setup["vlm"], 1)):
        parsed = load_recipe("evaluate").make_parser().parse_args_and_config(["--config", str(step.config)])
        assert [group.dataset_split for group in parsed if hasattr(group, "dataset_split")] == ["validation"]
    (plain,) = rounds.make_parser().parse_dict({**vars(args), "sft_learning_rate": None, "eval_split": None})
    configured = yaml.safe_load(open(setup["sft_config"])).get("learning_rate")
    assert yaml.safe_load(open(rounds.sft_step(plain, 1, setup["vlm"], 4).config)).get("learning_rate") == configured


def test_bad_settings_are_named(setup, tmp_path):
    path = tmp_path / "config.yaml"
    for override, message in (
        ({"rounds": 0}, "rounds must be >= 1"), ({"sft_config": "missing.yaml"}, "sft_config"),
        ({"algorithm": "ppo"}, "algorithm must be one of"), ({"algorithm": "grpo", "grpo_config": "no.yaml"}, "grpo_config"),
        ({"categories": ["count", "colour"]}, r"categories has unknown names \['colour'\]"),
        ({"sft_learning_rate": 0.0}, "sft_learning_rate must be > 0"),
    ):
        path.write_text(yaml.safe_dump({"policy": setup["vlm"], "output_dir": str(tmp_path), **override}))
        with pytest.raises(ValueError, match=message):
            load_recipe("rounds").make_parser().parse_args_and_config(["--config", str(path)])
