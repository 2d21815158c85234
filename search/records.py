"""What a search produces: one ``TrialRecord`` per trial and a ``SearchResult``."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from slimforge.core.measure import Measurements

COMPLETE, REJECTED, FAILED = "complete", "rejected", "failed"
STOPPED = "stopped"  # ended early by the Ray scheduler, before it was measured


@dataclass
class TrialRecord:
    number: int
    state: str  # complete | rejected (size broke the budget before training) | failed | stopped
    plan: dict[str, Any]
    plan_text: str
    measurements: Measurements | None = None  # on validation data
    violations: dict[str, float] = field(default_factory=dict)  # measured - limit, per budget
    feasible: bool = False
    artifact_path: str | None = None
    failure_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # recovery training loss per epoch
    epoch_scores: list[float] = field(default_factory=list)  # validation metric after each epoch
    stopped_early: str | None = None  # why recovery ended before its planned epochs
    training_seconds: float = 0.0
    size_estimate_bytes: int | None = None  # artifact size before fine-tuning
    duration_s: float = 0.0
    test_measurements: Measurements | None = None  # filled for Pareto members only
    links: dict[str, Any] = field(default_factory=dict)  # e.g. mlflow_run_id, registered version
    torch_threads: int | None = None  # CPU threads the trial trained with: float sums depend on it
    not_registered: str | None = None  # Pareto members only: why it is kept out of the Model Registry

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    study_name: str
    task: str
    budgets: dict[str, Any]
    baseline: Measurements  # uncompressed teacher, validation split
    baseline_test: Measurements  # same on test, to compare with Pareto members' test numbers
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    settings: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"  # name of the task metric that the "accuracy" fields hold
    loop_seconds: dict[int, float] = field(default_factory=dict)  # see SearchContext.loop_seconds
    registration_floor: dict[str, Any] | None = None  # RegistrationFloor.to_dict(): what Pareto members need to be registered

    def loop_overhead(self) -> dict[str, float] | None:
        """Per-trial time the search loop spent outside the trial itself (asking and telling the
        study, planning, handing the trial to a worker and getting its record back, tracking,
        the progress bar): loop seconds minus the trial's own ``duration_s``, which holds apply,
        fine-tune, evaluate, save and measure.  None when this process ran no trial."""
        by_number = {r.number: r for r in self.trials}
        extra = sorted(seconds - by_number[n].duration_s for n, seconds in self.loop_seconds.items() if n in by_number)
        if not extra:
            return None
        return {"median": statistics.median(extra), "max": extra[-1], "trials": len(extra)}

    def counts(self) -> dict[str, int]:
        out = {COMPLETE: 0, REJECTED: 0, FAILED: 0}
        for record in self.trials:
            out[record.state] = out.get(record.state, 0) + 1
        out["feasible"] = sum(r.feasible for r in self.trials)
        out["stopped_early"] = sum(r.stopped_early is not None for r in self.trials)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study_name,
            "task": self.task,
            "metric": self.metric,
            "budgets": self.budgets,
            "settings": self.settings,
            "baseline": {"val": self.baseline.to_dict(), "test": self.baseline_test.to_dict()},
            "counts": self.counts(),
            "trials": [r.to_dict() for r in self.trials],
            "pareto": [r.to_dict() for r in self.pareto],
            "registration_floor": self.registration_floor,
            "links": self.links,
        }


def record_from_dict(data: dict[str, Any]) -> TrialRecord:
    """Inverse of ``TrialRecord.to_dict`` (records cross process boundaries and storage as JSON)."""
    data = dict(data)
    for key in ("measurements", "test_measurements"):
        if data.get(key) is not None:
            data[key] = Measurements(**data[key])
    return TrialRecord(**data)


def failed_record(number: int, plan: dict, plan_text: str, reason: str, seconds: float) -> TrialRecord:
    """The record of a trial that ended without one of its own (its process died, timed out, or
    could not build the task)."""
    return TrialRecord(number=number, state=FAILED, plan=plan, plan_text=plan_text, failure_reason=reason,
                       duration_s=seconds)
