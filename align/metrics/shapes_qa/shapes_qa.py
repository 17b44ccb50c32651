"""shapes_qa: accuracy of free-text answers to shapes-world questions, overall and per category.

Each prediction is checked with `align.world.verify` against its question record, so "two", "2" and
"There are two circles." all count for a count of 2, and only a refusal counts for an unanswerable
question. Load offline by path: `evaluate.load("align/metrics/shapes_qa")`.
"""

import json

import datasets
import evaluate

from align.world import CATEGORIES, verify

_DESCRIPTION = "Accuracy of answers to shapes-world questions, checked by the world's verifier."
_INPUTS = """
Args:
    predictions (list of str): answer texts.
    references (list of str): the question records (JSON strings, the `record` column of `prompt_rows`).
Returns:
    accuracy, correct, total: over all questions;
    accuracy_<category>, correct_<category>, total_<category>: for each category present
    (color, shape, count, existence, spatial, unanswerable).
Example:
    >>> metric = evaluate.load("align/metrics/shapes_qa")
    >>> metric.compute(predictions=["two"], references=[json.dumps(record)])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class ShapesQA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        correct, total = {}, {}
        for prediction, reference in zip(predictions, references):
            record = json.loads(reference)
            category = record["category"]
            total[category] = total.get(category, 0) + 1
            correct[category] = correct.get(category, 0) + int(verify(record, prediction))
        n, right = sum(total.values()), sum(correct.values())
        result = {"accuracy": right / n if n else 0.0, "correct": right, "total": n}
        for category in [c for c in CATEGORIES if c in total] + sorted(set(total) - set(CATEGORIES)):
            result[f"accuracy_{category}"] = correct[category] / total[category]
            result[f"correct_{category}"] = correct[category]
            result[f"total_{category}"] = total[category]
        return result
