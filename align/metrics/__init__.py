"""Evaluation metrics shipped as `evaluate` modules in this folder and loaded offline by path.

`load_metric("shapes_qa")` is `evaluate.load("<repo>/align/metrics/shapes_qa")`: a local folder holding
`shapes_qa.py` is imported from disk and never looked up on the Hub.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path


def _import_evaluate_library():
    # A script named evaluate.py (recipes/evaluate.py) shadows the `evaluate` library whenever its folder is on
    # sys.path, which Python does for every script run from that folder: import the library with such folders
    # left out.
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.curdir, "evaluate.py"))]
    try:
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved


evaluate = _import_evaluate_library()

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
