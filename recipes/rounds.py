"""Multi-round post-training, as in Llama 3's: each round samples answers from the current policy, keeps the best,
fine-tunes on them and runs DPO on the new pairs; or, with `algorithm: grpo`, online RL rounds.

    python recipes/rounds.py --config recipes/configs/tiny/rounds.yaml
    python recipes/rounds.py --config recipes/configs/tiny/rounds.yaml --rounds 3 --launcher "accelerate launch --config_file recipes/accelerate/single.yaml"
    python recipes/rounds.py --config recipes/configs/tiny/rounds.yaml --algorithm grpo --rounds 1

Round r (1..R), with the round r-1 policy (round 0: `policy`), `algorithm: rejection_sampling` (the default):

    rejection sampling (recipes/rejection_sampling.py, a new slice of prompts each round)
    -> SFT (recipes/sft.py) on the kept answers mixed with the original SFT data (refusals included)
    -> DPO (recipes/dpo.py) on the new (best, worst) pairs
    -> evaluation (recipes/evaluate.py) on the held-out questions

`algorithm: grpo`: GRPO (recipes/grpo.py, on the round's slice of prompts) -> evaluation.

Each stage runs in its own process from a config derived from the stage's own YAML (`*_config`), written into the
round's folder next to its output, so any step can be rerun by hand. A step whose output holds its `metrics.json`
is skipped: a killed run continues where it stopped. Writes `output_dir/metrics.json` (every round's sampling
statistics and held-out accuracy, and each round minus round 0 paired on the same questions) and
`output_dir/scoreboard.md` (both as tables).
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from align.evaluation import PREDICTIONS, paired_difference, paired_table, read_predictions, scoreboard
from align.pipeline import LAUNCHERS_HELP, RECIPES, Step, derived_step, run_step
from align.runs import atomic_write_text, save_metrics
from align.world import CATEGORIES

logger = logging.getLogger(__name__)
TINY = RECIPES / "configs" / "tiny"
ALGORITHMS = ("rejection_sampling", "grpo")


@dataclass
class RoundsArguments:
    """The rounds, the stage configs they derive from, and what changes per round."""

    output_dir: str = field(metadata={"help": "Folder for every round's outputs, metrics.json and scoreboard.md."})
    policy: str = field(metadata={"help": "The round-0 policy: a VLM folder or an adapter folder (e.g. a DPO run)."})
    rounds: int = field(default=2, metadata={"help": "Number of rounds R."})
    algorithm: str = field(
        default="rejection_sampling",
        metadata={"help": f"What a round runs: one of {list(ALGORITHMS)} (rejection sampling -> SFT -> DPO, or GRPO)."},
    )
    policy_load_in_4bit: bool = field(
        default=False, metadata={"help": "Load adapter policies over a 4-bit base to sample and evaluate (QLoRA runs)."}
    )
    rejection_sampling_config: str = field(
        default=str(TINY / "rejection_sampling.yaml"), metadata={"help": "YAML of recipes/rejection_sampling.py."}
    )
    sft_config: str = field(default=str(TINY / "sft_qlora.yaml"), metadata={"help": "YAML of recipes/sft.py."})
    dpo_config: str = field(default=str(TINY / "dpo_qlora.yaml"), metadata={"help": "YAML of recipes/dpo.py."})
    evaluate_config: str = field(default=str(TINY / "evaluate.yaml"), metadata={"help": "YAML of recipes/evaluate.py."})
    grpo_config: str = field(default=str(TINY / "grpo.yaml"), metadata={"help": "YAML of recipes/grpo.py."})
    prompts_per_round: int = field(
        default=400, metadata={"help": "Prompts sampled per round; round r takes the r-th slice of the prompt set."}
    )
    num_candidates: int | None = field(
        default=None, metadata={"help": "Override the rejection-sampling config's num_candidates (N)."}
    )
    categories: list[str] | None = field(
        default=None,
        metadata={"help": "Sample only questions of these categories (the policy's failure modes, e.g. count spatial), "
                  "as Llama 3 aims each round's prompts at the capabilities that lag; default: the config's."},
    )
    verify_reasons: bool | None = field(
        default=None,
        metadata={"help": "Override the rejection-sampling (and GRPO) config's verify_reasons: a reasoned answer is right "
                  "only when its stated reason is true too (default: the configs')."},
    )
    sft_max_pass_rate: float | None = field(
        default=None,
        metadata={"help": "Override the rejection-sampling config's sft_max_pass_rate: the round's SFT keeps only the "
                  "prompts at most this fraction of whose candidates are right (below 1: not those always answered right)."},
    )
    sampled_weight: float = field(
        default=1.0, metadata={"help": "SFT mixture: weight of the rejection-sampled answers."}
    )
    original_weight: float = field(
        default=1.0,
        metadata={"help": "SFT mixture: weight of the original SFT data (conversations, refusals, captions)."},
    )
    sft_mixture_size: int | None = field(
        default=None, metadata={"help": "Rows of each round's SFT mixture (default: as the SFT config's data gives)."}
    )
    sft_max_steps: int | None = field(default=None, metadata={"help": "Override the SFT config's max_steps."})
    sft_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Override the SFT config's learning_rate: a round's SFT continues an already tuned policy, "
                  "where the first SFT's rate can undo what it learned (README: the rounds, measured)."},
    )
    dpo_max_steps: int | None = field(default=None, metadata={"help": "Override the DPO config's max_steps."})
    grpo_max_steps: int | None = field(default=None, metadata={"help": "Override the GRPO config's max_steps."})
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A reward model for rejection sampling (its scorer, or only compared with the verifier)."},
    )
    scorer: str = field(default="verifier", metadata={"help": "Rejection-sampling scorer: verifier, reward or combined."})
    num_questions: int | None = field(default=None, metadata={"help": "Held-out questions per evaluation (default: the evaluate config's)."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split every evaluation reads (default: the evaluate config's, test). Choose a round's "
                  "settings on `validation`, so that the test split measures the choice."},
    )
    initial_eval: str | None = field(
        default=None,
        metadata={"help": "metrics.json of the round-0 policy's evaluation to show as round 0 (default: evaluate it)."},
    )
    launcher: str = field(
        default="python",
        metadata={"help": LAUNCHERS_HELP},
    )
    seed: int = field(default=0, metadata={"help": "Round r's stages use seed + r."})
    force: bool = field(default=False, metadata={"help": "Rerun every step, even those whose metrics.json exists."})

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.prompts_per_round < 1:
            raise ValueError(f"prompts_per_round must be >= 1, got {self.prompts_per_round}")
        if self.sampled_weight <= 0 or self.original_weight < 0:
            raise ValueError(
                f"sampled_weight must be > 0 and original_weight >= 0, got {self.sampled_weight}, {self.original_weight}"
            )
        configs = ("grpo_config",) if self.algorithm == "grpo" else ("rejection_sampling_config", "sft_config", "dpo_config")
        for name in (*configs, "evaluate_config"):
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: {getattr(self, name)} does not exist")
        unknown = set(self.categories or []) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"categories has unknown names {sorted(unknown)}; supported: {list(CATEGORIES)}")
        if self.sft_learning_rate is not None and not self.sft_learning_rate > 0:
            raise ValueError(f"sft_learning_rate must be > 0 or unset, got {self.sft_learning_rate}")
        if self.initial_eval is not None and not Path(self.initial_eval).is_file():
            raise ValueError(f"initial_eval: {self.initial_eval} does not exist")


def _step(args: RoundsArguments, run_dir: Path, name: str, script: str, base: str, updates: dict) -> Step:
    return derived_step(run_dir, name, script, base, updates, "rounds.py", launcher=args.launcher)


def evaluation_step(args: RoundsArguments, run_dir: Path, name: str, model: str, seed: int) -> Step:
    updates = {"model_name_or_path": model, "load_in_4bit": args.policy_load_in_4bit, "seed": seed}
    if args.num_questions is not None:
        updates["num_questions"] = args.num_questions
    if args.eval_split is not None:
        updates["dataset_split"] = args.eval_split
    return _step(args, run_dir, name, "evaluate.py", args.evaluate_config, updates)


def sampling_step(args: RoundsArguments, number: int, policy: str) -> Step:
    """Round `number`'s rejection sampling with `policy`, on the round's own slice of prompts."""
    run_dir = Path(args.output_dir) / f"round{number}"
    updates = {
        "model_name_or_path": policy, "load_in_4bit": args.policy_load_in_4bit, "seed": args.seed + number,
        "prompt_offset": (number - 1) * args.prompts_per_round, "num_prompts": args.prompts_per_round,
        "scorer": args.scorer,
    }
    if args.num_candidates is not None:
        updates["num_candidates"] = args.num_candidates
    if args.sft_max_pass_rate is not None:
        updates["sft_max_pass_rate"] = args.sft_max_pass_rate
    if args.verify_reasons is not None:
        updates["verify_reasons"] = args.verify_reasons
    if args.categories:
        updates["categories"] = list(args.categories)
    if args.reward_model_name_or_path:
        updates["reward_model_name_or_path"] = args.reward_model_name_or_path
    return _step(args, run_dir, "rejection_sampling", "rejection_sampling.py", args.rejection_sampling_config, updates)


def sft_step(args: RoundsArguments, number: int, policy: str, sampled_rows: int) -> Step:
    """Round `number`'s SFT of `policy` on the kept answers mixed with the original SFT data (the original data
    alone when no answer was kept)."""
    run_dir = Path(args.output_dir) / f"round{number}"
    seed = args.seed + number
    updates = {"model_name_or_path": policy, "seed": seed, "mixture_seed": seed}
    if sampled_rows:
        source = {"path": str(run_dir / "rejection_sampling" / "sft"), "weight": args.sampled_weight,
                  "name": "rejection_sampled"}
        updates.update(datasets=[source], world_weight=args.original_weight)
    if args.sft_mixture_size is not None:
        updates["mixture_size"] = args.sft_mixture_size
    if args.sft_max_steps is not None:
        updates["max_steps"] = args.sft_max_steps
    if args.sft_learning_rate is not None:
        updates["learning_rate"] = args.sft_learning_rate
    return _step(args, run_dir, "sft", "sft.py", args.sft_config, updates)


def dpo_step(args: RoundsArguments, number: int) -> Step:
    """Round `number`'s DPO of its SFT output on the round's (best, worst) pairs."""
    run_dir = Path(args.output_dir) / f"round{number}"
    seed = args.seed + number
    updates = {
        "model_name_or_path": str(run_dir / "sft"), "seed": seed, "mixture_seed": seed,
        "datasets": [{"path": str(run_dir / "rejection_sampling" / "dpo"), "name": "rejection_sampled_pairs"}],
    }
    if args.dpo_max_steps is not None:
        updates["max_steps"] = args.dpo_max_steps
    return _step(args, run_dir, "dpo", "dpo.py", args.dpo_config, updates)


def grpo_step(args: RoundsArguments, number: int, policy: str) -> Step:
    """Round `number`'s GRPO from `policy`, on the round's own slice of prompts."""
    run_dir = Path(args.output_dir) / f"round{number}"
    updates = {
        "model_name_or_path": policy, "seed": args.seed + number,
        "prompt_offset": (number - 1) * args.prompts_per_round, "num_prompts": args.prompts_per_round,
    }
    if args.categories:
        updates["categories"] = list(args.categories)
    if args.reward_model_name_or_path:
        updates["reward_model_name_or_path"] = args.reward_model_name_or_path
    if args.grpo_max_steps is not None:
        updates["max_steps"] = args.grpo_max_steps
    if args.verify_reasons is not None:
        updates["verify_reasons"] = args.verify_reasons
    return _step(args, run_dir, "grpo", "grpo.py", args.grpo_config, updates)


def run_round(args: RoundsArguments, number: int, policy: str) -> tuple[str, dict]:
    """Run round `number` from `policy`; returns the round's policy and its stages' metrics."""
    run_dir = Path(args.output_dir) / f"round{number}"
    tag = f"round {number}"
    if args.algorithm == "grpo":
        metrics = {"grpo": run_step(grpo_step(args, number, policy), run_dir, args.force, tag=tag)}
        policy = str(run_dir / "grpo")
        metrics["eval"] = run_step(evaluation_step(args, run_dir, "eval", policy, args.seed + number), run_dir, args.force, tag=tag)
        return policy, metrics
    metrics = {"rejection_sampling": run_step(sampling_step(args, number, policy), run_dir, args.force, tag=tag)}
    sampled = metrics["rejection_sampling"]
    if not sampled["sft_rows"]:
        logger.warning("round %d: no sampled answer passed the threshold; SFT on the original data only", number)
    metrics["sft"] = run_step(sft_step(args, number, policy, sampled["sft_rows"]), run_dir, args.force, tag=tag)
    policy = str(run_dir / "sft")
    if sampled["dpo_pairs"]:
        metrics["dpo"] = run_step(dpo_step(args, number), run_dir, args.force, tag=tag)
        policy = str(run_dir / "dpo")
    else:
        logger.warning("round %d: no pair met the margin; DPO skipped, the round's policy is its SFT output", number)
    metrics["eval"] = run_step(evaluation_step(args, run_dir, "eval", policy, args.seed + number), run_dir, args.force, tag=tag)
    return policy, metrics


SAMPLING_KEYS = (
    "prompts", "sft_rows", "dpo_pairs", "any_correct", "pass@1", "reward_verifier_agreement", "reward_verifier_pairs",
)


def main(args: RoundsArguments) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # ----- round 0: the starting policy's evaluation ------------------------------------------------------------
    if args.initial_eval:
        initial = json.loads(Path(args.initial_eval).read_text())
    else:
        initial = run_step(
            evaluation_step(args, output_dir, "round0-eval", args.policy, args.seed), output_dir, args.force, tag="rounds"
        )
    results = {"round 0": initial}
    summary = {"policy": args.policy, "rounds": []}

    # ----- rounds -----------------------------------------------------------------------------------------------
    policy = args.policy
    for number in range(1, args.rounds + 1):
        start_policy = policy
        policy, metrics = run_round(args, number, policy)
        entry = {"round": number, "algorithm": args.algorithm, "start_policy": start_policy, "policy": policy}
        if args.algorithm == "grpo":
            entry["grpo"] = grpo_summary(metrics["grpo"])
        else:
            sampled = metrics["rejection_sampling"]
            entry["rejection_sampling"] = {
                key: sampled[key] for key in (*SAMPLING_KEYS, f"pass@{_candidates(sampled)}") if key in sampled
            }
        summary["rounds"].append({**entry, "eval": metrics["eval"]})
        results[f"round {number}"] = metrics["eval"]
        stats = entry.get("grpo", entry.get("rejection_sampling"))
        logger.info("round %d: %s -> held-out accuracy %.1f%%", number, stats, 100 * metrics["eval"]["accuracy"])

    # ----- save -------------------------------------------------------------------------------------------------
    board = scoreboard(results)
    initial_predictions = (Path(args.initial_eval).parent if args.initial_eval else output_dir / "round0-eval") / PREDICTIONS
    if initial_predictions.is_file():
        start = read_predictions(initial_predictions)
        summary["paired"] = {
            f"round {entry['round']} − round 0": paired_difference(
                read_predictions(output_dir / f"round{entry['round']}" / "eval" / PREDICTIONS), start
            )
            for entry in summary["rounds"]
        }
        board += "\n\nAccuracy minus round 0's, in points, on the same questions (± the paired standard error):\n\n"
        board += paired_table(summary["paired"])
    else:
        logger.info("no %s next to the round-0 evaluation: no paired comparison with round 0", PREDICTIONS)
    summary["final_policy"] = policy
    summary["initial_eval"] = initial
    atomic_write_text(output_dir / "scoreboard.md", board + "\n")
    save_metrics(output_dir / "metrics.json", summary)  # last: it marks the pipeline done
    print(board)
    return summary


def grpo_summary(metrics: dict) -> dict:
    """A GRPO run's steps, first and last logged reward and KL, images encoded and seconds (its metrics.json)."""
    rewards, kls = metrics["reward"]["history"], metrics["kl"]["history"]
    return {
        "steps": metrics["global_step"], "prompts": metrics["rows"]["train"],
        "reward_first": rewards[0][1] if rewards else None, "reward_last": rewards[-1][1] if rewards else None,
        "kl_last": kls[-1][1] if kls else None, "images_encoded": metrics["images_encoded"],
        "seconds": metrics["train"].get("train_runtime"),
    }


def _candidates(stats: dict) -> int:
    return max(stats["candidates"] // max(stats["prompts"], 1), 1)


def make_parser() -> TrlParser:
    return TrlParser((RoundsArguments,))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
