"""The Pareto front of feasible trials (accuracy up, size down, latency down), and which of its
members are registered in the Model Registry (``RegistrationFloor``).

Accuracy and size are exact (the metric on a fixed split, the bytes of a file), but latency is a
median of timed repeats on a shared machine and wobbles by a few percent.  With plain dominance a
trial that is worse on accuracy *and* size joins the front only because its latency came out
2 % lower.  So latency differences inside ``LATENCY_TOLERANCE`` count as ties here.  Optuna still
optimises the raw values; this only decides what we report and register.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from slimforge.search.records import COMPLETE, TrialRecord

LATENCY_TOLERANCE = 0.05  # relative; within it two latencies are treated as equal
# Without an accuracy budget, a collapsed, chance-level model is tiny and so never dominated.  A
# model registered for deployment (or shown on the front) must not be one, so by default the
# front holds only trials that lose at most this much against the uncompressed model.
DEFAULT_REGISTER_MAX_ACCURACY_DROP = 0.10


def _no_worse(a: TrialRecord, b: TrialRecord, tolerance: float) -> bool:
    ma, mb = a.measurements, b.measurements
    return (ma.accuracy >= mb.accuracy and ma.size_bytes <= mb.size_bytes
            and ma.latency_ms <= mb.latency_ms * (1 + tolerance))


def _strictly_better_somewhere(a: TrialRecord, b: TrialRecord, tolerance: float) -> bool:
    ma, mb = a.measurements, b.measurements
    return (ma.accuracy > mb.accuracy or ma.size_bytes < mb.size_bytes
            or ma.latency_ms * (1 + tolerance) < mb.latency_ms)


def dominates(a: TrialRecord, b: TrialRecord, tolerance: float = LATENCY_TOLERANCE) -> bool:
    return _no_worse(a, b, tolerance) and _strictly_better_somewhere(a, b, tolerance)


def pareto_front(records: Sequence[TrialRecord], tolerance: float = LATENCY_TOLERANCE,
                 min_accuracy: float | None = None) -> list[TrialRecord]:
    """Feasible, complete trials that no other feasible trial dominates, best accuracy first.
    Among exact duplicates (same accuracy and size, latency within tolerance) the earliest stays.
    ``min_accuracy`` (the search passes its registration floor): trials under it are not
    candidates, so a collapsed model, tiny and never dominated, stays off the front (it is still
    in the trial table and the summary)."""
    candidates = [r for r in records if r.state == COMPLETE and r.feasible
                  and (min_accuracy is None or r.measurements.accuracy >= min_accuracy - 1e-9)]
    front = []
    for record in candidates:
        if any(dominates(other, record, tolerance) for other in candidates if other is not record):
            continue
        if any(_no_worse(kept, record, tolerance) and _no_worse(record, kept, tolerance) for kept in front):
            continue  # a tie with a member already kept
        front.append(record)
    front.sort(key=lambda r: (-r.measurements.accuracy, r.measurements.size_bytes))
    return front


@dataclass(frozen=True)
class RegistrationFloor:
    """The accuracy a Pareto member needs to be registered, and the rule that set it."""

    min_accuracy: float
    rule: str  # e.g. "baseline 0.9840 - 10 pt (default)"

    def why_not_registered(self, record: TrialRecord) -> str | None:
        """None when ``record`` is registered; otherwise the reason, for the summary."""
        accuracy = record.measurements.accuracy
        if accuracy >= self.min_accuracy - 1e-9:  # "at least the floor": a member exactly on it is registered
            return None
        return f"accuracy {accuracy:.4f} is below the registration floor {self.min_accuracy:.4f} ({self.rule})"

    def to_dict(self) -> dict:
        return asdict(self)


def registration_floor(baseline_accuracy: float, *, min_accuracy: float | None = None,
                       max_accuracy_drop: float | None = None,
                       budget_min_accuracy: float | None = None) -> RegistrationFloor:
    """The floor the user set (``--register-min-accuracy``, ``--register-max-accuracy-drop``; with
    both, the stricter wins, as with budgets), else the default: the baseline minus
    ``DEFAULT_REGISTER_MAX_ACCURACY_DROP``, or the accuracy budget where that is looser.  A budget
    already decides what is feasible, so a user who asked for accuracy down to it gets every
    feasible member registered."""
    chosen = []
    if min_accuracy is not None:
        chosen.append((min_accuracy, f"--register-min-accuracy {min_accuracy:.4f}"))
    if max_accuracy_drop is not None:
        chosen.append((baseline_accuracy - max_accuracy_drop,
                       f"baseline {baseline_accuracy:.4f} - {max_accuracy_drop * 100:g} pt, --register-max-accuracy-drop"))
    if chosen:
        floor, rule = max(chosen)
    else:
        floor = baseline_accuracy - DEFAULT_REGISTER_MAX_ACCURACY_DROP
        rule = f"baseline {baseline_accuracy:.4f} - {DEFAULT_REGISTER_MAX_ACCURACY_DROP * 100:g} pt, the default"
        if budget_min_accuracy is not None and budget_min_accuracy < floor:
            floor, rule = budget_min_accuracy, "the accuracy budget, looser than the default"
    return RegistrationFloor(min_accuracy=round(floor, 6), rule=rule)
