"""The Pareto front of feasible trials: accuracy up, size down, latency down.

Accuracy and size are exact (the metric on a fixed split, the bytes of a file), but latency is a
median of timed repeats on a shared machine and wobbles by a few percent.  With plain dominance a
trial that is worse on accuracy *and* size joins the front only because its latency came out
2 % lower.  So latency differences inside ``LATENCY_TOLERANCE`` count as ties here.  Optuna still
optimises the raw values; this only decides what we report and register.
"""

from __future__ import annotations

from collections.abc import Sequence

from slimforge.search.records import COMPLETE, TrialRecord

LATENCY_TOLERANCE = 0.05  # relative; within it two latencies are treated as equal


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


def pareto_front(records: Sequence[TrialRecord], tolerance: float = LATENCY_TOLERANCE) -> list[TrialRecord]:
    """Feasible, complete trials that no other feasible trial dominates, best accuracy first.
    Among exact duplicates (same accuracy and size, latency within tolerance) the earliest stays."""
    candidates = [r for r in records if r.state == COMPLETE and r.feasible]
    front = []
    for record in candidates:
        if any(dominates(other, record, tolerance) for other in candidates if other is not record):
            continue
        if any(_no_worse(kept, record, tolerance) and _no_worse(record, kept, tolerance) for kept in front):
            continue  # a tie with a member already kept
        front.append(record)
    front.sort(key=lambda r: (-r.measurements.accuracy, r.measurements.size_bytes))
    return front
