"""Text-overlap scores computed locally: the hub's `bleu` and `rouge` modules cannot be loaded offline."""

from __future__ import annotations

import math
import re
from collections import Counter


def bleu_tokens(text: str) -> list[str]:
    """Lowercase words and punctuation marks as separate tokens: "Two circles." -> ["two", "circles", "."]."""
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower())


def rouge_tokens(text: str) -> list[str]:
    """Lowercase alphanumeric words, punctuation dropped (as `rouge_score` tokenizes)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _as_lists(references) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def corpus_bleu(predictions: list[str], references: list, max_order: int = 4) -> dict:
    """Corpus BLEU (Papineni et al. 2002, https://aclanthology.org/P02-1040): clipped n-gram precisions
    summed over the corpus, their geometric mean, times the brevity penalty exp(1 - r / c) when the
    candidates are shorter than the references (r: per sentence the reference length closest to the
    candidate's, shorter on ties, as sacreBLEU). No smoothing: an n-gram order without a match gives 0.

    Args:
        predictions: candidate texts.
        references: one reference text, or a list of them, per candidate.

    Returns:
        {"bleu", "precisions" (per order), "brevity_penalty", "length_ratio", "translation_length",
        "reference_length"}.
    """
    references = _as_lists(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    matches, totals = [0] * max_order, [0] * max_order
    candidate_length = reference_length = 0
    for prediction, refs in zip(predictions, references):
        tokens = bleu_tokens(prediction)
        ref_tokens = [bleu_tokens(r) for r in refs]
        candidate_length += len(tokens)
        reference_length += min((len(r) for r in ref_tokens), key=lambda n: (abs(n - len(tokens)), n))
        for n in range(1, max_order + 1):
            counts = _ngrams(tokens, n)
            most = Counter()
            for r in ref_tokens:
                most |= _ngrams(r, n)
            matches[n - 1] += sum((counts & most).values())
            totals[n - 1] += sum(counts.values())
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    if candidate_length == 0:
        brevity_penalty = 0.0
    elif candidate_length > reference_length:
        brevity_penalty = 1.0
    else:
        brevity_penalty = math.exp(1 - reference_length / candidate_length)
    geometric = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    return {
        "bleu": brevity_penalty * geometric,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "length_ratio": candidate_length / reference_length if reference_length else 0.0,
        "translation_length": candidate_length,
        "reference_length": reference_length,
    }


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, https://aclanthology.org/W04-1013): P = LCS / |prediction|,
    R = LCS / |reference|, F = 2PR / (P + R)."""
    a, b = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predictions: list[str], references: list) -> float:
    """ROUGE-L F1 averaged over the pairs; with several references a prediction takes its best."""
    references = _as_lists(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    return sum(max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references)) / len(predictions)
