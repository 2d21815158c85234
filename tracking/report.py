"""Search reports people look at: the Pareto front as a picture and the trials as a CSV table.

Written into the search's output folder and attached to the MLflow parent run.
"""

from __future__ import annotations

import csv
from pathlib import Path

from slimforge.search.records import COMPLETE, SearchResult

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
