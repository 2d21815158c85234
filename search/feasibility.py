"""When no trial meets every budget: which trials came closest, what each one violates and by how
much, and which budget to relax.  ``summary.json`` carries it (``closest_to_feasible``) and the
CLI prints it, so a search never ends with a bare "no model found".

Closeness is the sum of the violations, each relative to its limit (what the sampler sees).
Complete trials rank first: every budget was measured for them.  A trial rejected before
training only has its estimated size, so it cannot be judged on the other budgets.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from slimforge.search.budgets import budget_kinds
from slimforge.search.records import COMPLETE, FAILED, REJECTED, SearchResult, TrialRecord


def _kb(size: float) -> str:
    return f"{size / 1000:.1f} KB"


def _violation(budget: str, over: float, limit: float) -> dict[str, Any]:
    """One violated budget: what was measured, the limit, and by how much it is missed."""
    if budget == "accuracy":
        measured = limit - over
        text = f"accuracy {measured:.4f} < {limit:.4f} (short by {over * 100:.2f} pt)"
    elif budget == "size":
        measured = limit + over
        text = f"size {_kb(measured)} > {_kb(limit)} (over by {_kb(over)}, +{over / limit:.0%})"
    elif budget == "latency":
        measured = limit + over
        text = f"latency {measured:.3f} ms > {limit:g} ms (over by {over:.3f} ms, +{over / limit:.0%})"
    else:  # a budget kind without its own wording
        measured = limit + over
        text = f"{budget} {measured:g} misses the limit {limit:g} by {over:g}"
    return {"budget": budget, "flag": budget_kinds()[budget]["flag"], "limit": limit, "measured": measured, "over_by": over,
            "relative": over / abs(limit) if limit else math.inf, "text": text}


def _relaxed_value(violation: dict[str, Any], baseline_accuracy: float | None) -> str:
    """The flag value that would just admit the measured value."""
    measured = violation["measured"]
    if violation["budget"] == "size":
        return f"{math.ceil(measured / 100) / 10:g}KB"
    if violation["budget"] != "accuracy":
        return f"{math.ceil(measured * 1000) / 1000:g}"
    floor = math.floor(measured * 10000) / 10000
    text = f"{floor:g}"
    if baseline_accuracy is not None:
        text += f" (or --max-accuracy-drop {math.ceil((baseline_accuracy - floor) * 10000) / 100:g}pt)"
    return text


def closest_to_feasible(records: list[TrialRecord], budgets: dict[str, Any], baseline_accuracy: float | None = None,
                        limit: int = 3) -> dict[str, Any] | None:
    """None when some trial is feasible; otherwise the ``limit`` trials closest to feasibility
    (each with its violations), how many trials failed and why, and a one-line suggestion."""
    if any(r.feasible and r.state == COMPLETE for r in records):
        return None
    limits = {b: budgets.get(kind["limit_key"]) for b, kind in budget_kinds().items()}
    measured = [r for r in records if r.state in (COMPLETE, REJECTED) and any(v > 0 for v in r.violations.values())]

    def distance(r: TrialRecord) -> tuple:
        over = [_violation(b, v, limits[b]) for b, v in r.violations.items() if v > 0 and limits.get(b) is not None]
        return (r.state != COMPLETE, sum(o["relative"] for o in over))

    ranked = sorted(measured, key=lambda r: (*distance(r), r.number))
    closest = []
    for r in ranked[:limit]:
        over = [_violation(b, v, limits[b]) for b, v in sorted(r.violations.items()) if v > 0 and limits.get(b) is not None]
        text = "; ".join(o["text"] for o in over)
        if r.state == REJECTED:
            text += " (estimated before training; rejected untrained, other budgets not measured)"
        closest.append({"number": r.number, "state": r.state, "plan": r.plan_text, "violations": over, "text": text})

    failures = Counter(r.failure_reason for r in records if r.state == FAILED)
    complete = [c for c in closest if c["state"] == COMPLETE]
    if complete:
        best = min(complete, key=lambda c: (len(c["violations"]), sum(v["relative"] for v in c["violations"])))
        relax = " and ".join(f"{v['flag']} to {_relaxed_value(v, baseline_accuracy)}" for v in best["violations"])
        suggestion = f"relax {relax}: trial {best['number']} would then meet every budget"
    elif closest:
        v = closest[0]["violations"][0]
        suggestion = (f"every measured trial was rejected before training for its size; relax {v['flag']} to at least "
                      f"{_relaxed_value(v, baseline_accuracy)}, or enable techniques that shrink the model more")
    elif failures:
        reason, count = failures.most_common(1)[0]
        suggestion = (f"no trial completed: {sum(failures.values())} failed; most common reason ({count}x): {reason}")
    else:
        suggestion = "no trial finished; run more trials (--trials) or a longer --timeout"
    return {"trials": closest, "suggestion": suggestion, "failed": sum(failures.values()),
            "failure_reasons": dict(failures.most_common(3))}


def closest_for(result: SearchResult) -> dict[str, Any] | None:
    """``closest_to_feasible`` for a finished search (what ``summary.json`` and the CLI show)."""
    return closest_to_feasible(result.trials, result.budgets, result.baseline.accuracy)


def describe(closest: dict[str, Any]) -> list[str]:
    """Printable lines for ``closest_to_feasible``'s result."""
    lines = ["no trial met every budget; closest to feasibility:"]
    for c in closest["trials"]:
        lines.append(f"  trial {c['number']}: {c['text']}")
        lines.append(f"      plan: {c['plan']}")
    if closest["failed"]:
        lines.append(f"  ({closest['failed']} trial(s) failed: "
                     + "; ".join(f"{n}x {reason}" for reason, n in closest["failure_reasons"].items()) + ")")
    lines.append(f"suggestion: {closest['suggestion']}")
    return lines
