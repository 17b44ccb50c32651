"""Evaluation metrics shipped as `evaluate` modules in this folder and loaded offline by path.

`load_metric("shapes_qa")` is `evaluate.load("<repo>/align/metrics/shapes_qa")`: a local folder holding
`shapes_qa.py` is imported from disk and never looked up on the Hub.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("shapes_qa", "caption_match")


def metric_path(name: str) -> str:
    """The folder of a shipped metric module."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; supported: {list(METRICS)}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load a shipped metric with `evaluate.load` by its folder path; `kwargs` go to `evaluate.load`."""
    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "METRICS_DIR", "load_metric", "metric_path"]
