"""What a search reports: ``summary.json``, the trials as a CSV table, the Pareto front as a
picture, and the search budget summary (trials done, failed, rejected, hypervolume of the
feasible front) that the progress bar, the printed result and ``summary.json`` share.

Written into the search's output folder before trackers see the end of the search (the MLflow
tracker attaches these files to the parent run).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from slimforge.core.files import write_json_atomic
from slimforge.core.measure import Measurements
from slimforge.search.feasibility import closest_for
from slimforge.search.records import COMPLETE, FAILED, REJECTED, SearchResult, TrialRecord

# Hypervolume of the feasible front over normalised objectives (all minimised):
# (1 - accuracy, size / baseline size, latency / baseline latency), reference point 1.1 in each.
HYPERVOLUME_REFERENCE = 1.1
HYPERVOLUME_DEFINITION = ("hypervolume of feasible complete trials over (1 - accuracy, size_bytes / baseline "
                          "size_bytes, latency_ms / baseline latency_ms), all minimised, reference point "
                          f"({HYPERVOLUME_REFERENCE}, {HYPERVOLUME_REFERENCE}, {HYPERVOLUME_REFERENCE}); "
                          f"the largest possible value is {HYPERVOLUME_REFERENCE ** 3:.3f}")

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


def write_pareto_plot(result: SearchResult, path: Path) -> Path:
    """Accuracy vs size and accuracy vs latency; feasible trials filled, infeasible hollow,
    Pareto members starred and numbered, budgets drawn as dashed lines, baseline as a diamond."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    complete = [r for r in result.trials if r.state == COMPLETE and r.measurements]
    pareto_numbers = {m.number for m in result.pareto}
    budgets = result.budgets
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = [("size_bytes", 1e-3, "artifact size (KB, log scale)", budgets.get("max_size_bytes")),
              ("latency_ms", 1.0, f"median latency (ms), {result.settings.get('device', 'cpu')}", budgets.get("max_latency_ms"))]
    for ax, (field, scale, label, limit) in zip(axes, panels):
        for feasible, style in ((True, dict(color="tab:blue", label="feasible")),
                                (False, dict(facecolors="none", edgecolors="tab:gray", label="infeasible"))):
            points = [r for r in complete if r.feasible == feasible and r.number not in pareto_numbers]
            ax.scatter([getattr(r.measurements, field) * scale for r in points],
                       [r.measurements.accuracy for r in points], s=28, **style)
        members = [r for r in complete if r.number in pareto_numbers]
        ax.scatter([getattr(r.measurements, field) * scale for r in members], [r.measurements.accuracy for r in members],
                   marker="*", s=160, color="tab:red", label="Pareto (registered)", zorder=3)
        for r in members:
            ax.annotate(str(r.number), (getattr(r.measurements, field) * scale, r.measurements.accuracy),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.scatter([getattr(result.baseline, field) * scale], [result.baseline.accuracy], marker="D", s=60,
                   color="black", label="uncompressed")
        if limit is not None:
            ax.axvline(limit * scale, color="tab:orange", linestyle="--", label="budget")
        if budgets.get("min_accuracy") is not None:
            ax.axhline(budgets["min_accuracy"], color="tab:orange", linestyle="--")
        if field == "size_bytes":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[1].legend(loc="lower right", fontsize=8)
    counts = result.counts()
    fig.suptitle(f"{result.task} - study {result.study_name}: {len(result.trials)} trials, {counts['feasible']} feasible, "
                 f"{len(result.pareto)} on the Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(result: SearchResult, out_dir: Path) -> None:
    """summary.json, trials.csv and pareto.png in ``out_dir``."""
    write_summary(result, out_dir / "summary.json")
    write_trials_csv(result, out_dir / "trials.csv")
    write_pareto_plot(result, out_dir / "pareto.png")


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


def feasible_hypervolume(records: list[TrialRecord], baseline: Measurements) -> float | None:
    """``HYPERVOLUME_DEFINITION``; None where Optuna's hypervolume routine is unavailable.

    Normalising by the uncompressed baseline makes the three axes commensurable and the value
    comparable across searches of the same task; points outside the reference box add nothing."""
    try:  # Optuna's WFG implementation; private module, stable since Optuna 4.
        import numpy as np
        from optuna._hypervolume import compute_hypervolume
    except ImportError:
        return None
    reference = HYPERVOLUME_REFERENCE
    points = []
    for record in records:
        m = record.measurements
        if record.state != COMPLETE or not record.feasible or m is None:
            continue
        point = (1.0 - m.accuracy, m.size_bytes / max(baseline.size_bytes, 1),
                 m.latency_ms / max(baseline.latency_ms, 1e-12))
        if all(v <= reference for v in point):
            points.append(point)
    if not points:
        return 0.0
    return float(compute_hypervolume(np.asarray(points, dtype=float), np.full(3, reference)))


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
    if s["hypervolume"] is not None:
        text += f" | HV {s['hypervolume']:.4f}"
    feasible = [r for r in records if r.feasible and r.measurements is not None]
    if feasible:
        m = max(feasible, key=lambda r: r.measurements.accuracy).measurements
        text += f" | best feasible: acc {m.accuracy:.4f}, {m.size_bytes / 1000:.1f} KB, {m.latency_ms:.3f} ms"
    return text
