"""The run report: the scoreboard of every stage, notes per stage, training-loss curves and accuracy bars.

    write_report("runs/tiny", {"stage 1": m1, "SFT": m2, "DPO": m3},
                 {"stage 1": load_log_history("runs/tiny/stage1"), "SFT": load_log_history("runs/tiny/sft")})

writes `report.md` and `report.png` into the run folder. The plot is drawn with matplotlib's Agg canvas (no
display, no global pyplot state).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from align.evaluation import categories_of, standard_error
from align.evaluation import scoreboard as scoreboard_table

REPORT_NAME = "report.md"
PLOT_NAME = "report.png"


def load_log_history(path: str | os.PathLike) -> list[dict]:
    """A trainer's log history: from a `trainer_state.json`, or a run folder holding one (directly or in its
    latest `checkpoint-N/`). Returns [] when there is none."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "trainer_state.json"]
        checkpoints = sorted(
            (p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
            key=lambda p: int(p.name.split("-")[1]),
        )
        candidates += [p / "trainer_state.json" for p in reversed(checkpoints)]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("log_history", [])


def loss_points(history: list[dict], key: str = "loss") -> tuple[list[float], list[float]]:
    """(steps, values) of the entries of a log history that hold `key` (e.g. "loss", "eval_loss")."""
    points = [(entry.get("step", index), entry[key]) for index, entry in enumerate(history) if key in entry]
    return [float(s) for s, _ in points], [float(v) for _, v in points]


def _stderr(metrics: dict, category: str | None = None) -> float:
    suffix = f"_{category}" if category else ""
    key = f"stderr{suffix}"
    if key in metrics:
        return metrics[key]
    return standard_error(metrics[f"accuracy{suffix}"], metrics["total" + suffix])


def stage_notes(scoreboard_results: dict[str, dict], curves: dict[str, list[dict]] | None = None) -> list[str]:
    """One Markdown bullet per stage: accuracy ± s.e., change from the previous stage in points and in standard
    errors of the difference, best and worst category, training loss first -> last, text-only drift."""
    curves = curves or {}
    notes, previous = [], None
    for stage, metrics in scoreboard_results.items():
        accuracy, se = metrics["accuracy"], _stderr(metrics)
        parts = [f"{100 * accuracy:.1f}% ± {100 * se:.1f} on {metrics['total']} questions"]
        if previous is not None:
            name, before = previous
            delta = accuracy - before["accuracy"]
            se_delta = math.sqrt(se**2 + _stderr(before) ** 2)
            sigmas = f", {abs(delta) / se_delta:.1f} s.e." if se_delta > 0 else ""
            parts.append(f"{100 * delta:+.1f} points over {name}{sigmas}")
        categories = categories_of(metrics)
        if categories:
            ranked = sorted(categories, key=lambda c: metrics[f"accuracy_{c}"])
            best, worst = ranked[-1], ranked[0]
            parts.append(
                f"best {best} {100 * metrics[f'accuracy_{best}']:.0f}%, worst {worst} {100 * metrics[f'accuracy_{worst}']:.0f}%"
            )
        steps, losses = loss_points(curves.get(stage, []))
        if losses:
            parts.append(f"training loss {losses[0]:.3f} → {losses[-1]:.3f} over {int(steps[-1])} steps")
        if "text_vlm_perplexity" in metrics and "text_base_perplexity" in metrics:
            parts.append(
                f"text-only perplexity {metrics['text_vlm_perplexity']:.3f} vs base LLM "
                f"{metrics['text_base_perplexity']:.3f}"
            )
        notes.append(f"- **{stage}**: " + "; ".join(parts) + ".")
        previous = (stage, metrics)
    return notes


def plot_report(scoreboard_results: dict[str, dict], curves: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Save a PNG: training (and eval) loss per stage on the left; for online RL stages (logs with a `reward`), the
    mean reward and the KL to the reference per step in the middle; accuracy per category per stage (with ± s.e.
    error bars) on the right."""
    from matplotlib.figure import Figure

    rl_curves = {stage: history for stage, history in curves.items() if any("reward" in entry for entry in history)}
    if rl_curves:
        figure = Figure(figsize=(17, 4.8), dpi=110, layout="constrained")
        loss_axes, rl_axes, bar_axes = figure.subplots(1, 3, width_ratios=[1, 1, 1.4])
        _plot_rl(rl_axes, rl_curves)
    else:
        figure = Figure(figsize=(13, 4.8), dpi=110, layout="constrained")
        loss_axes, bar_axes = figure.subplots(1, 2, width_ratios=[1, 1.4])

    drawn = False
    for stage, history in curves.items():
        if stage in rl_curves:
            continue  # a policy-gradient loss is not a fit: its reward and KL are drawn instead
        steps, losses = loss_points(history)
        if losses:
            (line,) = loss_axes.plot(steps, losses, label=f"{stage} train", linewidth=1.6)
            drawn = True
            eval_steps, eval_losses = loss_points(history, "eval_loss")
            if eval_losses:
                loss_axes.plot(eval_steps, eval_losses, "--o", color=line.get_color(), markersize=3, label=f"{stage} eval")
    loss_axes.set_title("Training loss")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    if drawn:
        loss_axes.legend(fontsize=8)
    else:
        loss_axes.text(0.5, 0.5, "no training logs", ha="center", va="center", transform=loss_axes.transAxes)

    stages = list(scoreboard_results)
    categories = []
    for metrics in scoreboard_results.values():
        categories += [c for c in categories_of(metrics) if c not in categories]
    groups = ["overall", *categories]
    width = 0.8 / max(len(stages), 1)
    for index, stage in enumerate(stages):
        metrics = scoreboard_results[stage]
        values, errors = [], []
        for group in groups:
            category = None if group == "overall" else group
            key = "accuracy" if category is None else f"accuracy_{category}"
            present = key in metrics
            values.append(100 * metrics[key] if present else 0.0)
            errors.append(100 * _stderr(metrics, category) if present else 0.0)
        positions = [g + (index - (len(stages) - 1) / 2) * width for g in range(len(groups))]
        bar_axes.bar(positions, values, width, yerr=errors, capsize=2, label=stage)
    bar_axes.set_xticks(range(len(groups)), groups, rotation=20)
    # Head room above 100% for the error bars and the legend.
    bar_axes.set_ylim(0, 118)
    bar_axes.set_yticks(range(0, 101, 20))
    bar_axes.set_ylabel("accuracy (%)")
    bar_axes.set_title("Held-out accuracy per category (± s.e.)")
    bar_axes.grid(axis="y", alpha=0.3)
    if stages:
        bar_axes.legend(fontsize=8, loc="upper center", ncols=min(len(stages), 6), frameon=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _plot_rl(axes, curves: dict[str, list[dict]]) -> None:
    """Mean reward per step (solid, left axis) and KL to the reference (dashed, right axis) of each RL stage."""
    kl_axes = axes.twinx()
    for stage, history in curves.items():
        steps, rewards = loss_points(history, "reward")
        (line,) = axes.plot(steps, rewards, label=f"{stage} reward", linewidth=1.6)
        kl_steps, kls = loss_points(history, "kl")
        if kls:
            kl_axes.plot(kl_steps, kls, "--", color=line.get_color(), linewidth=1.2, label=f"{stage} KL")
    axes.set_title("Online RL: mean reward and KL to the reference")
    axes.set_xlabel("step")
    axes.set_ylabel("reward")
    kl_axes.set_ylabel("KL")
    axes.grid(alpha=0.3)
    lines = axes.get_legend_handles_labels()[0] + kl_axes.get_legend_handles_labels()[0]
    axes.legend(lines, [line.get_label() for line in lines], fontsize=8)


def write_report(
    run_dir: str | os.PathLike,
    scoreboard: dict[str, dict],
    curves: dict[str, list[dict]] | None = None,
    title: str = "vlm-align run report",
    sections: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write `report.md` (scoreboard table, plot, per-stage notes) and `report.png` into `run_dir`.

    Args:
        run_dir: the run's folder.
        scoreboard: stage name -> metrics of `align.evaluation.evaluate_qa` (a recipe's `metrics.json`), in
            pipeline order.
        curves: stage name -> trainer log history (`load_log_history`); stages without training may be left out.
        title: the report's heading.
        sections: further sections, heading -> markdown body (e.g. the student table), after the stages.

    Returns:
        {"report": path of report.md, "plot": path of report.png}.
    """
    curves = curves or {}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_report(scoreboard, curves, run_dir / PLOT_NAME)
    lines = [
        f"# {title}",
        "",
        "## Scoreboard",
        "",
        "Held-out accuracy (answers checked by the world's verifier); overall ± one standard error, sqrt(p(1-p)/n).",
        "",
        scoreboard_table(scoreboard),
        "",
        f"![training loss and accuracy per category]({plot.name})",
        "",
        "## Stages",
        "",
        *stage_notes(scoreboard, curves),
        "",
    ]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", body.rstrip(), ""]
    report = run_dir / REPORT_NAME
    report.write_text("\n".join(lines), encoding="utf-8")
    return {"report": report, "plot": plot}


__all__ = ["load_log_history", "loss_points", "plot_report", "stage_notes", "write_report"]
