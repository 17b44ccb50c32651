"""Rejection sampling: sample N answers per prompt from the current policy, score them, keep the best.

As in Llama 2/3's post-training (arXiv:2307.09288 §3.2.3, arXiv:2407.21783 §4.2): the best answer of each prompt
above a score threshold becomes SFT data, and the (best, worst) pair of a prompt whose scores differ by at least a
margin becomes a DPO pair. The scorer is the world's verifier, a reward model or both (`align.scoring`).

- Sampling is batched and uses the KV cache; each prompt's images go through the vision towers once and the prompt
  through the model once, its N candidates decoded from copies of that cache (`align.sampling`; `generate`'s own
  `num_return_sequences` would encode every image and prefill every prompt N times).
- Each batch is seeded from the run's seed and the batch's first prompt, so a run gives the same candidates
  however it is split into sessions.
- `candidates.jsonl` (one line per prompt: candidates, scores) is appended a whole batch at a time and flushed
  to disk; a run killed midway continues after the last complete batch, with no prompt lost or repeated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, Features, Value

from align.data import REJECTS_FILE
from align.data.world import _assistant, with_images
from align.evaluation import pass_at_k, sample_batch
from align.prompts import PromptArguments
from align.runs import RunArguments, atomic_write_text
from align.scoring import SCORERS, Scorer, WeightedScorer, ranking_agreement
from align.world import CATEGORIES
from align.world.dataset import MESSAGES_FEATURE

logger = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.jsonl"


@dataclass
class SamplingSettings:
    """How candidates are drawn: `num_candidates` per prompt, nucleus sampling at `temperature`/`top_p`."""

    num_candidates: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    prompts_per_batch: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2 (a best and a worst answer), got {self.num_candidates}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (candidates are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.prompts_per_batch < 1:
            raise ValueError(
                f"max_new_tokens and prompts_per_batch must be >= 1, got {self.max_new_tokens} and {self.prompts_per_batch}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def sample_candidates(model, processor, rows: Sequence[dict], settings: SamplingSettings, seed: int | None = None) -> list[list[str]]:
    """`settings.num_candidates` sampled answers to each prompt row (`images`, `prompt` messages), one list per row:
    `align.evaluation.sample_batch` (each image encoded once, each prompt prefilled once)."""
    return sample_batch(
        model, processor, rows, settings.num_candidates, temperature=settings.temperature, top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens, seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Selection and statistics
# ---------------------------------------------------------------------------------------------------------------


def select(
    candidates: Sequence[str], scores: Sequence[float], threshold: float, min_margin: float, max_pass_rate: float = 1.0
) -> dict:
    """The best and worst candidate of one prompt and what they are kept for.

    Among equal scores (a verifier's 0/1 ties often), the answer sampled most often wins: the best is the policy's
    most frequent right answer, and the worst its most frequent wrong one, i.e. the mistake greedy decoding
    makes, rather than a one-off garbled sample; further ties go to the first sampled.

    Returns:
        `best`, `worst` (candidate indices), `sft` (the best scores >= `threshold`, and at most a `max_pass_rate`
        fraction of the candidates do) and `pair` (best - worst >= `min_margin` and the two texts differ).
    """
    if not candidates or len(candidates) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(candidates)} candidates")
    texts = [c.strip() for c in candidates]
    frequency = Counter(texts)
    best = max(range(len(scores)), key=lambda i: (scores[i], frequency[texts[i]], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], -frequency[texts[i]], i))
    passed = sum(score >= threshold for score in scores)
    keep_sft = scores[best] >= threshold and passed <= max_pass_rate * len(scores)
    keep_pair = scores[best] - scores[worst] >= min_margin and texts[best] != texts[worst]
    return {"best": best, "worst": worst, "sft": keep_sft, "pair": keep_pair}


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {
        "min": ordered[0], "p25": at(0.25), "median": at(0.5), "p75": at(0.75), "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def statistics_of(records: Sequence[dict], threshold: float, min_margin: float, max_pass_rate: float = 1.0) -> dict:
    """Statistics of a finished run from its `candidates.jsonl` records: prompts, candidates, the score distribution,
    rows kept for SFT and pairs for DPO, and, where the verifier judged the candidates, the fraction of prompts with
    at least one correct candidate, pass@1 and pass@N overall and per category; where a reward model scored them
    too, its agreement with the verifier's ranking."""
    stats: dict = {"prompts": len(records), "candidates": sum(len(r["candidates"]) for r in records)}
    scores = [s for r in records for s in r["scores"]]
    stats["score"] = _quantiles(scores)
    kept = [select(r["candidates"], r["scores"], threshold, min_margin, max_pass_rate) for r in records]
    stats["sft_rows"] = sum(k["sft"] for k in kept)
    stats["dpo_pairs"] = sum(k["pair"] for k in kept)
    stats["threshold"], stats["min_margin"], stats["max_pass_rate"] = threshold, min_margin, max_pass_rate
    judged = [r for r in records if "verifier" in r]
    if judged:
        by_category = defaultdict(list)
        for r in judged:
            by_category[r.get("category") or "all"].append(r)
        for name, group in [("", judged), *((f"_{c}", g) for c, g in sorted(by_category.items()))]:
            n = [len(r["verifier"]) for r in group]
            c = [int(sum(r["verifier"])) for r in group]
            stats[f"any_correct{name}"] = sum(ci > 0 for ci in c) / len(group)
            stats[f"pass@1{name}"] = statistics.fmean(pass_at_k(ni, ci, 1) for ni, ci in zip(n, c))
            stats[f"pass@{min(n)}{name}"] = statistics.fmean(pass_at_k(ni, ci, min(n)) for ni, ci in zip(n, c))
            stats[f"prompts{name}"] = len(group)
    rewarded = [r for r in records if "verifier" in r and "reward" in r]
    if rewarded:
        agreement = ranking_agreement([r["verifier"] for r in rewarded], [r["reward"] for r in rewarded])
        stats["reward_verifier_agreement"] = agreement["agreement"]
        stats["reward_verifier_pairs"] = agreement["pairs"]
    return stats


# ---------------------------------------------------------------------------------------------------------------
# The resumable run
# ---------------------------------------------------------------------------------------------------------------


def read_candidates(path: str | os.PathLike, batch_of: dict[int, list[int]] | None = None) -> list[dict]:
    """The complete records of a `candidates.jsonl`, repairing the file after a kill.

    A torn last line is cut off; with `batch_of` (batch -> its prompt indices), the records of a batch that was not
    written whole are dropped too, so that batch is sampled again with its own seed.
    """
    path = Path(path)
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            records.append(record)
            good_bytes += len(line)
    if batch_of is not None:
        present = {r["index"] for r in records}
        complete = {b for b, indices in batch_of.items() if all(i in present for i in indices)}
        kept = [r for r in records if r.get("batch") in complete]
        if len(kept) != len(records):
            records = kept
            good_bytes = None
    if good_bytes is None or good_bytes != path.stat().st_size:
        dropped = "torn or partial batches"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))  # a kill here loses nothing
        logger.warning("%s: kept %d complete records, dropped %s", path, len(records), dropped)
    return records


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def sample_and_score(
    model,
    processor,
    prompts: Dataset,
    scorer: Scorer,
    settings: SamplingSettings,
    output_dir: str | os.PathLike,
    reference_scorer: Scorer | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    log_every: int = 5,
) -> Path:
    """Sample and score candidates for every prompt into `output_dir/candidates.jsonl`, continuing a killed run.

    Args:
        model, processor: the policy (a VLM or a PEFT model around one) and its processor.
        prompts: prompt rows (`images`, `prompt`; `record` for the verifier; `category`, `image_id` kept if present).
        scorer: ranks the candidates (`align.scoring`).
        settings: sampling settings.
        output_dir: the run folder.
        reference_scorer: extra scores stored next to the scorer's, for statistics (e.g. the verifier's judgement
            while a reward model ranks). A `WeightedScorer`'s components are stored by name as well.
        process_index, num_processes: batches are dealt round-robin over processes; each appends to its own file.
        log_every: log progress every this many batches.

    Returns:
        The path of this process's candidates file.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    size = settings.prompts_per_batch
    batch_of = {b: list(range(b * size, min((b + 1) * size, len(prompts)))) for b in range(math.ceil(len(prompts) / size))}
    done = set()
    for path in sorted(output_dir.glob("candidates*.jsonl")):
        done |= {r["batch"] for r in read_candidates(path, batch_of)}
    own = output_dir / (CANDIDATES_FILE if num_processes == 1 else f"candidates.rank{process_index}.jsonl")
    todo = [b for b in batch_of if b not in done and b % num_processes == process_index]
    if done:
        logger.info("resuming: %d of %d batches already sampled", len(done), len(batch_of))
    for number, batch in enumerate(todo, start=1):
        rows = [prompts[i] for i in batch_of[batch]]
        candidates = sample_candidates(model, processor, rows, settings, seed=settings.seed * 1_000_003 + batch_of[batch][0])
        parts = scorer.components(rows, candidates) if isinstance(scorer, WeightedScorer) else {}
        scores = scorer.combine(parts) if parts else scorer(rows, candidates)
        if reference_scorer is not None:
            parts.setdefault(getattr(reference_scorer, "name", "reference"), reference_scorer(rows, candidates))
        records = []
        for j, (index, row) in enumerate(zip(batch_of[batch], rows)):
            record = {"index": index, "batch": batch, "candidates": candidates[j], "scores": scores[j]}
            record.update({name: values[j] for name, values in parts.items()})
            if getattr(scorer, "name", None) in ("verifier", "reward"):
                record[scorer.name] = scores[j]
            for key in ("category", "image_id"):
                if row.get(key) is not None:
                    record[key] = row[key]
            records.append(record)
        _append(own, records)
        if log_every and (number % log_every == 0 or number == len(todo)):
            logger.info("sampled %d/%d batches of this process (%d prompts each)", number, len(todo), size)
    return own


def collect(output_dir: str | os.PathLike, num_prompts: int) -> list[dict]:
    """Every prompt's record from the run's candidates files, in prompt order; an error if any is missing or twice."""
    records = [r for path in sorted(Path(output_dir).glob("candidates*.jsonl")) for r in read_candidates(path)]
    indices = [r["index"] for r in records]
    if sorted(indices) != list(range(num_prompts)):
        missing = sorted(set(range(num_prompts)) - set(indices))
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise RuntimeError(f"candidates of {output_dir}: missing prompts {missing[:10]}, repeated {repeated[:10]}")
    return sorted(records, key=lambda r: r["index"])


def build_datasets(
    prompts: Dataset, records: Sequence[dict], threshold: float, min_margin: float, max_pass_rate: float = 1.0
) -> tuple[Dataset, Dataset]:
    """The SFT rows (the prompt and its best answer, where it scores >= `threshold` and at most a `max_pass_rate`
    fraction of the prompt's candidates do: `select`) and the DPO pairs (best as
    chosen, worst as rejected, where they differ by >= `min_margin`), with the prompt's images, `category`,
    `record` and `image_id` when the prompts carry them, and the scores."""
    extra = [c for c in ("category", "record", "image_id") if c in prompts.column_names]
    meta = prompts.select_columns([*extra, "prompt"]) if extra else prompts.select_columns(["prompt"])
    sft_idx, sft_cols = [], defaultdict(list)
    dpo_idx, dpo_cols = [], defaultdict(list)
    for record in records:
        index = record["index"]
        choice = select(record["candidates"], record["scores"], threshold, min_margin, max_pass_rate)
        row = meta[index]
        best, worst = record["candidates"][choice["best"]], record["candidates"][choice["worst"]]
        if choice["sft"]:
            sft_idx.append(index)
            sft_cols["messages"].append([*row["prompt"], _assistant(best)])
            sft_cols["score"].append(float(record["scores"][choice["best"]]))
            for c in extra:
                sft_cols[c].append(row[c])
        if choice["pair"]:
            dpo_idx.append(index)
            dpo_cols["prompt"].append(list(row["prompt"]))
            dpo_cols["chosen"].append([_assistant(best)])
            dpo_cols["rejected"].append([_assistant(worst)])
            dpo_cols["margin"].append(float(record["scores"][choice["best"]] - record["scores"][choice["worst"]]))
            for c in extra:
                dpo_cols[c].append(row[c])
    extra_features = {c: Value("string") for c in extra}
    sft_features = Features({"messages": MESSAGES_FEATURE, "score": Value("float32"), **extra_features})
    dpo_features = Features(
        {"prompt": MESSAGES_FEATURE, "chosen": MESSAGES_FEATURE, "rejected": MESSAGES_FEATURE,
         "margin": Value("float32"), **extra_features}
    )
    empty = lambda f: {name: [] for name in f}  # noqa: E731
    sft = with_images(prompts, sft_idx, dict(sft_cols) or empty(sft_features), sft_features)
    dpo = with_images(prompts, dpo_idx, dict(dpo_cols) or empty(dpo_features), dpo_features)
    return sft, dpo


# ---------------------------------------------------------------------------------------------------------------
# The recipe's arguments (recipes/rejection_sampling.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RejectionSamplingArguments(PromptArguments, RunArguments):
    """Prompts (`PromptArguments`), sampling, scoring and selection (the policy is `ModelConfig.model_name_or_path`)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Run folder (required): candidates.jsonl, sft/, dpo/, metrics.json."}
    )
    num_candidates: int = field(default=8, metadata={"help": "Candidates sampled per prompt (N)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Answer length limit in tokens."})
    prompts_per_batch: int = field(
        default=8, metadata={"help": "Prompts per generate call (each with num_candidates sequences)."}
    )
    scorer: str = field(default="verifier", metadata={"help": f"How candidates are ranked: one of {list(SCORERS)}."})
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reward model (recipes/reward.py output) for the `reward` and `combined` scorers; with the "
            "`verifier` scorer it is only compared with the verifier (agreement statistics)."
        },
    )
    verify_reasons: bool = field(
        default=False,
        metadata={"help": "Verifier: an answer that states its reason first (\"The red circle is further left, so "
                  "yes.\") is right only when the reason is true too (`align.world.verify(reasons=True)`), so a lucky "
                  "yes or no after a false reason is neither kept for SFT nor the chosen answer of a DPO pair."},
    )
    verifier_weight: float = field(default=1.0, metadata={"help": "`combined`: weight of the verifier's 0/1 score."})
    reward_weight: float = field(default=0.1, metadata={"help": "`combined`: weight of the reward model's score."})
    sft_threshold: float = field(
        default=0.5,
        metadata={"help": "Keep a prompt's best candidate for SFT when its score is at least this (verifier: 1 right, 0 wrong)."},
    )
    min_margin: float = field(
        default=0.5, metadata={"help": "Keep the (best, worst) pair for DPO when their scores differ by at least this."}
    )
    sft_max_pass_rate: float = field(
        default=1.0,
        metadata={"help": "Keep a prompt for SFT only when at most this fraction of its candidates reach sft_threshold "
                  "(1.0: every prompt; below 1, the prompts the policy already always answers right are left out)."},
    )
    reward_batch_size: int = field(default=32, metadata={"help": "Candidates per reward-model forward."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base VLM of an adapter policy (default: from adapter_config.json)."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (each batch is seeded from it and its first prompt)."})

    def __post_init__(self):
        super().__post_init__()
        if not self.output_dir:
            raise ValueError("output_dir is required: the run folder")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {list(SCORERS)}, got {self.scorer!r}")
        if self.scorer in ("reward", "combined") and not self.reward_model_name_or_path:
            raise ValueError(f"scorer {self.scorer!r} needs reward_model_name_or_path")
        if self.prompt_offset < 0:
            raise ValueError(f"prompt_offset must be >= 0, got {self.prompt_offset}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 or unset (all), got {self.num_prompts}")
        unknown = set(self.categories or []) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"categories has unknown names {sorted(unknown)}; supported: {list(CATEGORIES)}")
        if not 0.0 < self.sft_max_pass_rate <= 1.0:
            raise ValueError(f"sft_max_pass_rate must be in (0, 1], got {self.sft_max_pass_rate}")
        if self.min_margin < 0 or self.reward_batch_size < 1:
            raise ValueError(f"min_margin must be >= 0 and reward_batch_size >= 1, got {self.min_margin}, {self.reward_batch_size}")
        self.settings()  # validates the sampling settings

    def settings(self) -> SamplingSettings:
        return SamplingSettings(
            num_candidates=self.num_candidates, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, prompts_per_batch=self.prompts_per_batch, seed=self.seed,
        )


def load_prompts(args: RejectionSamplingArguments, output_dir: Path) -> datasets.Dataset:
    """The prompt rows: world questions (with records) or a local prompt set; bad rows listed in rejects.jsonl."""
    return args.load_prompts(needs_records=args.scorer == "verifier", rejects_path=output_dir / REJECTS_FILE)


__all__ = [
    "CANDIDATES_FILE",
    "RejectionSamplingArguments",
    "SamplingSettings",
    "build_datasets",
    "collect",
    "load_prompts",
    "pass_at_k",
    "read_candidates",
    "sample_and_score",
    "sample_candidates",
    "select",
    "statistics_of",
]
