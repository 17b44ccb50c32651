"""Scorers for sampled answers: the world's verifier (a verifiable reward), a trained reward model, or a weighted
combination of scorers.

A scorer is a callable `scorer(rows, candidates) -> scores`: `rows` are prompt rows (dicts with `images`,
`prompt` (conversational messages) and, for the verifier, `record`, a JSON question record), `candidates` one list
of answer texts per row, and `scores` one list of floats per row, aligned with the candidates. Rejection sampling
(`align.rejection_sampling`) ranks candidates by these scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from align.world import verify

Scorer = Callable[[Sequence[dict], Sequence[Sequence[str]]], list[list[float]]]
SCORERS = ("verifier", "reward", "combined")


def _record(row: dict, index: int) -> dict:
    record = row.get("record")
    if record is None:
        raise ValueError(
            f"prompt row {index} has no `record` (the question record the verifier checks answers against); "
            "use the reward-model scorer for prompts without one"
        )
    return json.loads(record) if isinstance(record, str) else record


@dataclass
class VerifierScorer:
    """1.0 for an answer the world's verifier accepts (`align.world.verify`), 0.0 otherwise: a verifiable reward
    in the sense of Tülu 3's RLVR (arXiv:2411.15124). With `reasons`, an answer that states its reason first ("The red
    circle is further left, so yes.") also needs a true reason (`verify(reasons=True)`): a right yes or no after a
    false reason is a guess that landed."""

    reasons: bool = False
    name: str = field(default="verifier", init=False)

    def __call__(self, rows: Sequence[dict], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        return [
            [1.0 if verify(_record(row, i), text, reasons=self.reasons) else 0.0 for text in texts]
            for i, (row, texts) in enumerate(zip(rows, candidates, strict=True))
        ]


@dataclass
class RewardModelScorer:
    """Scores from a trained VLM reward model (`align.reward`): the Bradley-Terry reward of each (prompt, answer)
    with the prompt's image, batched over every candidate of the rows."""

    model: object
    processor: object
    batch_size: int = 16
    name: str = field(default="reward", init=False)

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 16, quantization_config=None, device=None) -> RewardModelScorer:
        """Load the reward model (a full folder or a LoRA adapter over its base) from a local path."""
        from align.reward import load_reward_model

        model, processor = load_reward_model(path, quantization_config=quantization_config, device=device)
        return cls(model, processor, batch_size)

    def __call__(self, rows: Sequence[dict], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        from align.reward import reward_scores

        flat = [
            {"images": row["images"], "prompt": row["prompt"], "completion": text}
            for row, texts in zip(rows, candidates, strict=True)
            for text in texts
        ]
        scores = reward_scores(self.model, self.processor, flat, batch_size=self.batch_size) if flat else []
        out, start = [], 0
        for texts in candidates:
            out.append([float(s) for s in scores[start : start + len(texts)]])
            start += len(texts)
        return out


@dataclass
class WeightedScorer:
    """A weighted sum of scorers: `sum_k weight_k * score_k`. Reward-model scores are unbounded, so a combination
    with the verifier (0/1) mostly uses the reward model to break ties among equally (in)correct answers."""

    scorers: dict[str, Scorer]
    weights: dict[str, float]
    name: str = field(default="combined", init=False)

    def __post_init__(self):
        if set(self.scorers) != set(self.weights):
            raise ValueError(f"weights {sorted(self.weights)} must name the scorers {sorted(self.scorers)}")

    def components(self, rows, candidates) -> dict[str, list[list[float]]]:
        """Each scorer's own scores (for statistics such as the reward model's agreement with the verifier)."""
        return {name: scorer(rows, candidates) for name, scorer in self.scorers.items()}

    def combine(self, parts: dict[str, list[list[float]]]) -> list[list[float]]:
        names = list(parts)
        return [
            [sum(self.weights[n] * parts[n][i][j] for n in names) for j in range(len(parts[names[0]][i]))]
            for i in range(len(parts[names[0]]))
        ]

    def __call__(self, rows, candidates) -> list[list[float]]:
        return self.combine(self.components(rows, candidates))


def ranking_agreement(reference: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> dict:
    """How often `other` orders two candidates of the same prompt as `reference` does, over every pair that
    `reference` scores differently (e.g. one right and one wrong answer by the verifier): agreement = pairs ordered
    alike / such pairs; a tie in `other` counts half.

    Returns:
        `agreement` (nan when no pair differs) and `pairs`.
    """
    agree, pairs = 0.0, 0
    for ref, oth in zip(reference, other, strict=True):
        for a in range(len(ref)):
            for b in range(a + 1, len(ref)):
                if ref[a] == ref[b]:
                    continue
                pairs += 1
                sign = (ref[a] > ref[b]) - (ref[a] < ref[b])
                other_sign = (oth[a] > oth[b]) - (oth[a] < oth[b])
                agree += 1.0 if sign == other_sign else 0.5 if other_sign == 0 else 0.0
    return {"agreement": agree / pairs if pairs else float("nan"), "pairs": pairs}


__all__ = ["SCORERS", "RewardModelScorer", "Scorer", "VerifierScorer", "WeightedScorer", "ranking_agreement"]
