"""What a search reports: ``summary.json``, the trials as a CSV table, the Pareto front as a
picture, and the search budget summary (trials done, failed, rejected, hypervolume of the
feasible front) that the progress bar, the printed result and ``summary.json`` share.

Written into the search's output folder before trackers see the end of the search (the MLflow
tracker attaches these files to the parent run).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from slimforge.core.files import write_json_atomic
from slimforge.core.measure import Measurements
from slimforge.search.feasibility import closest_for
from slimforge.search.records import COMPLETE, FAILED, REJECTED, SearchResult, TrialRecord

# Hypervolume of the feasible front, on log scales, all axes minimised and normalised so that the
# baseline sits at 1 and the best conceivable model at 0:
#   accuracy: (baseline - accuracy) / HYPERVOLUME_ACCURACY_WINDOW (0 at the baseline or above);
#   size:     1 - log(baseline size / size) / log(HYPERVOLUME_SIZE_RATIO)   (0 at 1000x smaller);
#   latency:  1 - log(baseline ms / ms) / log(HYPERVOLUME_LATENCY_RATIO)     (0 at 10x faster).
# Log axes make 20x and 100x count differently (on a linear size axis every model under 5 % of the
# dense bytes sat at the same edge); the accuracy window ends the box 10 points under the baseline,
# so a collapsed model adds nothing however small it is.  The reference point is 1.1 on each axis
# (a model at dense latency, as unstructured and weight-only models run on a CPU, still counts).
HYPERVOLUME_REFERENCE = 1.1
HYPERVOLUME_ACCURACY_WINDOW = 0.10
HYPERVOLUME_SIZE_RATIO = 1000.0
HYPERVOLUME_LATENCY_RATIO = 10.0
HYPERVOLUME_DEFINITION = (
    "hypervolume of feasible complete trials over ((baseline - accuracy) / "
    f"{HYPERVOLUME_ACCURACY_WINDOW:g}, 1 - log(baseline size / size) / log({HYPERVOLUME_SIZE_RATIO:g}), "
    f"1 - log(baseline latency / latency) / log({HYPERVOLUME_LATENCY_RATIO:g})), all minimised, reference point "
    f"({HYPERVOLUME_REFERENCE}, {HYPERVOLUME_REFERENCE}, {HYPERVOLUME_REFERENCE}); the largest possible value is "
    f"{HYPERVOLUME_REFERENCE ** 3:.3f}")

CSV_COLUMNS = ("number", "state", "feasible", "pareto", "accuracy_val", "accuracy_test", "size_bytes",
               "latency_ms", "size_estimate_bytes", "epochs_run", "stopped_early", "duration_s", "plan",
               "failure_reason")


def write_trials_csv(result: SearchResult, path: Path) -> Path:
    pareto = {m.number: m for m in result.pareto}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in sorted(result.trials, key=lambda r: r.number):
            m, test = r.measurements, pareto[r.number].test_measurements if r.number in pareto else None
            writer.writerow({
                "number": r.number, "state": r.state, "feasible": r.feasible, "pareto": r.number in pareto,
                "accuracy_val": m.accuracy if m else "", "accuracy_test": test.accuracy if test else "",
                "size_bytes": m.size_bytes if m else "", "latency_ms": f"{m.latency_ms:.4f}" if m else "",
                "size_estimate_bytes": r.size_estimate_bytes or "", "epochs_run": len(r.epoch_scores or r.epoch_losses),
                "stopped_early": r.stopped_early or "", "duration_s": f"{r.duration_s:.2f}", "plan": r.plan_text,
                "failure_reason": r.failure_reason or "",
            })
    return path


PARETO_UNTRACKED = "Pareto, at or above the floor (tracking off: not registered)"


def plot_groups(result: SearchResult) -> list[tuple[str, list[TrialRecord]]]:
    """The plot's legend: every complete trial in exactly one group.  Pareto members are split by
    whether they are (or, with tracking on, will be at the end of the search) registered; trials
    under the registration floor are never on the front (``pareto_front``) and get their own group,
    so a collapsed model is not drawn as a dominated one."""
    complete = [r for r in result.trials if r.state == COMPLETE and r.measurements]
    on_front = {m.number: m for m in result.pareto}
    floor = (result.registration_floor or {}).get("min_accuracy")
    tracked = result.settings.get("tracking", True)
    members = [on_front[r.number] for r in complete if r.number in on_front]
    off_front = [r for r in complete if r.number not in on_front]
    below = [r for r in off_front if floor is not None and r.measurements.accuracy < floor - 1e-9]
    groups = [
        ("Pareto, registered" if tracked else PARETO_UNTRACKED, [m for m in members if not m.not_registered]),
        ("Pareto, below the registration floor", [m for m in members if m.not_registered]),
        ("below the registration floor (off the front)", below),
        ("dominated (feasible)", [r for r in off_front if r.feasible and r not in below]),
        ("infeasible", [r for r in off_front if not r.feasible and r not in below]),
    ]
    return [(label, records) for label, records in groups if records]


_MPL_STYLES = {"Pareto, registered": dict(marker="*", s=170, color="tab:red", zorder=4),
               PARETO_UNTRACKED: dict(marker="*", s=170, color="tab:red", zorder=4),
               "Pareto, below the registration floor": dict(marker="*", s=170, facecolors="none", edgecolors="tab:red",
                                                            zorder=4),
               "below the registration floor (off the front)": dict(marker="v", s=28, facecolors="none",
                                                                    edgecolors="tab:red"),
               "dominated (feasible)": dict(s=28, color="tab:blue"),
               "infeasible": dict(s=28, facecolors="none", edgecolors="tab:gray")}
_PANELS = (("size_bytes", 1e-3, "artifact size (KB, log scale)", "max_size_bytes"),
           ("latency_ms", 1.0, "median latency (ms)", "max_latency_ms"))


def _lines(result: SearchResult) -> dict[str, float | None]:
    """Horizontal accuracy lines (registration floor, accuracy budget) and vertical budget limits."""
    floor = (result.registration_floor or {}).get("min_accuracy")
    return {"floor": floor, "min_accuracy": result.budgets.get("min_accuracy"),
            "max_size_bytes": result.budgets.get("max_size_bytes"), "max_latency_ms": result.budgets.get("max_latency_ms")}


def _title(result: SearchResult) -> str:
    counts = result.counts()
    return (f"{result.task} - study {result.study_name}: {len(result.trials)} trials, {counts['feasible']} feasible, "
            f"{len(result.pareto)} on the Pareto front")


def write_pareto_plot(result: SearchResult, path: Path) -> Path:
    """Accuracy vs size and accuracy vs latency.  Pareto members are stars, filled when registered
    and hollow when below the registration floor, and numbered; dominated feasible trials are dots,
    infeasible ones hollow circles, the uncompressed model a diamond.  The registration floor and
    every budget are drawn as lines.  With plotly installed, ``pareto.html`` beside ``path`` holds
    the same picture, interactive (``write_pareto_html``)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    groups, lines = plot_groups(result), _lines(result)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    for ax, (field, scale, label, limit_key) in zip(axes, _PANELS):
        for name, records in groups:
            ax.scatter([getattr(r.measurements, field) * scale for r in records], [r.measurements.accuracy for r in records],
                       label=name, **_MPL_STYLES[name])
        for r in (r for name, records in groups if name.startswith("Pareto") for r in records):
            ax.annotate(str(r.number), (getattr(r.measurements, field) * scale, r.measurements.accuracy),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.scatter([getattr(result.baseline, field) * scale], [result.baseline.accuracy], marker="D", s=60,
                   color="black", label="uncompressed")
        if lines[limit_key] is not None:
            ax.axvline(lines[limit_key] * scale, color="tab:orange", linestyle="--",
                       label=f"{'size' if field == 'size_bytes' else 'latency'} budget")
        if lines["min_accuracy"] is not None:
            ax.axhline(lines["min_accuracy"], color="tab:green", linestyle="--", label="accuracy budget")
        if lines["floor"] is not None:
            ax.axhline(lines["floor"], color="tab:purple", linestyle=":", label="registration floor")
        if field == "size_bytes":
            ax.set_xscale("log")
        ax.set_xlabel(label if field == "size_bytes" else f"{label}, {result.settings.get('device', 'cpu')}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    handles = {}
    for ax in axes:  # one legend for both panels: each entry once
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(_title(result))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_PLOTLY_STYLES = {"Pareto, registered": dict(symbol="star", size=14, color="#d62728"),
                  "Pareto, below the registration floor": dict(symbol="star-open", size=14, color="#d62728"),
                  "below the registration floor (off the front)": dict(symbol="triangle-down-open", size=8,
                                                                       color="#d62728"),
                  "dominated (feasible)": dict(symbol="circle", size=7, color="#1f77b4"),
                  "infeasible": dict(symbol="circle-open", size=7, color="#7f7f7f")}


def write_pareto_html(result: SearchResult, path: Path) -> Path | None:
    """The Pareto plot as a self-contained interactive page (plotly, its JavaScript inlined so it
    opens offline; about 5 MB): hovering a point shows its trial, plan and measurements.  Returns
    None when plotly is not installed (``pip install 'slimforge[plot]'``)."""
    try:
        from plotly import graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    groups, lines = plot_groups(result), _lines(result)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[label for _, _, label, _ in _PANELS])
    for col, (field, scale, _, limit_key) in enumerate(_PANELS, start=1):
        for name, records in groups:
            style = _PLOTLY_STYLES.get(name, _PLOTLY_STYLES["Pareto, registered"])
            text = [f"trial {r.number}<br>{r.plan_text}<br>acc {r.measurements.accuracy:.4f}, "
                    f"{r.measurements.size_bytes / 1000:.1f} KB, {r.measurements.latency_ms:.3f} ms" for r in records]
            fig.add_trace(go.Scatter(x=[getattr(r.measurements, field) * scale for r in records],
                                     y=[r.measurements.accuracy for r in records], mode="markers", name=name,
                                     legendgroup=name, showlegend=col == 1, marker=style, text=text,
                                     hovertemplate="%{text}<extra></extra>"), row=1, col=col)
        fig.add_trace(go.Scatter(x=[getattr(result.baseline, field) * scale], y=[result.baseline.accuracy],
                                 mode="markers", name="uncompressed", legendgroup="uncompressed", showlegend=col == 1,
                                 marker=dict(symbol="diamond", size=10, color="black")), row=1, col=col)
        if lines[limit_key] is not None:
            fig.add_vline(x=lines[limit_key] * scale, line_dash="dash", line_color="orange", row=1, col=col,
                          annotation_text="budget")
        if lines["min_accuracy"] is not None:
            fig.add_hline(y=lines["min_accuracy"], line_dash="dash", line_color="green", row=1, col=col,
                          annotation_text="accuracy budget" if col == 1 else None)
        if lines["floor"] is not None:
            fig.add_hline(y=lines["floor"], line_dash="dot", line_color="purple", row=1, col=col,
                          annotation_text="registration floor" if col == 1 else None)
    fig.update_xaxes(type="log", row=1, col=1)
    fig.update_yaxes(title_text="validation accuracy", row=1, col=1)
    fig.update_layout(title=_title(result), template="plotly_white")
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def write_reports(result: SearchResult, out_dir: Path) -> None:
    """summary.json, trials.csv, pareto.png and (with plotly) pareto.html in ``out_dir``."""
    write_summary(result, out_dir / "summary.json")
    write_trials_csv(result, out_dir / "trials.csv")
    write_pareto_plot(result, out_dir / "pareto.png")
    if write_pareto_html(result, out_dir / "pareto.html") is None:
        print("pareto.html not written: the interactive plot needs plotly (pip install 'slimforge[plot]')", file=sys.stderr)


def write_partial_reports(result: SearchResult, out_dir: Path, stopped_by: str) -> None:
    """What a search stopped early (Ctrl-C) leaves: the reports of the trials recorded so far,
    with ``summary.json`` marked ``partial``.  Its front is selected on validation as always, but
    the test split was never used and nothing was registered: resuming the study does both."""
    for member in result.pareto:
        member.not_registered = member.not_registered or f"the search was stopped ({stopped_by}) before registration"
    write_summary(result, out_dir / "summary.json", partial={
        "stopped_by": stopped_by, "note": "trials recorded before the search was stopped; no test-split numbers and "
        "no registrations yet: rerun with --study to resume"})
    write_trials_csv(result, out_dir / "trials.csv")
    write_pareto_plot(result, out_dir / "pareto.png")


def write_summary(result: SearchResult, path: Path, partial: dict[str, str] | None = None) -> None:
    data = result.to_dict()
    if partial is not None:
        data["partial"] = partial
    data["closest_to_feasible"] = closest_for(result)
    data["search_summary"] = search_summary(result.trials, result.baseline) | {"loop_overhead_s": result.loop_overhead()}
    write_json_atomic(path, data)


def hypervolume_point(m: Measurements, baseline: Measurements) -> tuple[float, float, float]:
    """A measurement's coordinates in the hypervolume's box (``HYPERVOLUME_DEFINITION``)."""
    accuracy = max(0.0, baseline.accuracy - m.accuracy) / HYPERVOLUME_ACCURACY_WINDOW
    size = 1 - math.log(max(baseline.size_bytes, 1) / max(m.size_bytes, 1)) / math.log(HYPERVOLUME_SIZE_RATIO)
    latency = 1 - (math.log(max(baseline.latency_ms, 1e-12) / max(m.latency_ms, 1e-12))
                   / math.log(HYPERVOLUME_LATENCY_RATIO))
    return accuracy, max(0.0, size), max(0.0, latency)


def hypervolume(points: list[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    """Exact volume dominated by ``points`` (minimised) inside the box up to ``reference``: the
    last axis is swept in slices, each slice's area computed the same way one dimension down.
    O(n^d) for n points in d dimensions: fronts here hold tens of points in 3 dimensions."""
    points = [p for p in points if all(v < r for v, r in zip(p, reference))]
    if not points:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in points)
    levels = sorted({p[-1] for p in points})
    volume = 0.0
    for index, level in enumerate(levels):
        top = levels[index + 1] if index + 1 < len(levels) else reference[-1]
        below = [p[:-1] for p in points if p[-1] <= level]
        volume += hypervolume(below, reference[:-1]) * (top - level)
    return volume


def feasible_hypervolume(records: list[TrialRecord], baseline: Measurements) -> float:
    """``HYPERVOLUME_DEFINITION`` over the feasible complete trials of ``records``."""
    points = [hypervolume_point(r.measurements, baseline) for r in records
              if r.state == COMPLETE and r.feasible and r.measurements is not None]
    return round(hypervolume(points, (HYPERVOLUME_REFERENCE,) * 3), 6)


def search_summary(records: list[TrialRecord], baseline: Measurements) -> dict[str, Any]:
    """Trials done, failed, rejected before training, stopped by a scheduler, feasible, and the
    hypervolume of the feasible front: what the progress bar, the printed summary and
    ``summary.json`` (``search_summary``) report."""
    states = [r.state for r in records]
    return {
        "trials_done": len(records),
        "complete": states.count(COMPLETE),
        "failed": states.count(FAILED),
        "rejected_before_training": states.count(REJECTED),
        "stopped_by_scheduler": sum(s not in (COMPLETE, FAILED, REJECTED) for s in states),
        "stopped_early": sum(bool(r.stopped_early) for r in records),  # successive halving / the accuracy budget
        "feasible": sum(r.feasible for r in records),
        "hypervolume": feasible_hypervolume(records, baseline),
        "hypervolume_definition": HYPERVOLUME_DEFINITION,
    }


def progress_text(records: list[TrialRecord], baseline: Measurements) -> str:
    """The progress bar's postfix."""
    s = search_summary(records, baseline)
    text = f"done {s['trials_done']}, failed {s['failed']}, rejected {s['rejected_before_training']}"
    if s["stopped_by_scheduler"]:
        text += f", stopped {s['stopped_by_scheduler']}"
    if s["stopped_early"]:
        text += f", stopped early {s['stopped_early']}"
    if s["hypervolume"] is not None:
        text += f" | HV {s['hypervolume']:.4f}"
    feasible = [r for r in records if r.feasible and r.measurements is not None]
    if feasible:
        m = max(feasible, key=lambda r: r.measurements.accuracy).measurements
        text += f" | best feasible: acc {m.accuracy:.4f}, {m.size_bytes / 1000:.1f} KB, {m.latency_ms:.3f} ms"
    return text
