"""Does distillation help the search?  Same task, trials and seed, with and without it.

  without:  magnitude_pruning, structured_pruning, weight_only_quant, int8_ptq
  with:     the same + parameter_distillation + knowledge_distillation

Both searches run under the same accuracy budget.  Printed: each feasible Pareto front
(accuracy vs size), the 2-D hypervolume of each front over (1 - val accuracy, size / dense size)
with reference point (budget floor, 1.0), how many points of one front are dominated by the
other, and the smallest feasible size each found.  A third search asks for > 100x
(--max-size = dense / 100) with distillation enabled.

    python benchmarks/distillation_search.py --trials 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search

BASE = ("magnitude_pruning", "structured_pruning", "weight_only_quant", "int8_ptq")
DISTILL = ("parameter_distillation", "knowledge_distillation")


def front_points(result):
    return [(m.measurements.accuracy, m.measurements.size_bytes, m.test_measurements.accuracy, m.plan_text)
            for m in result.pareto]


def hypervolume_2d(points, floor: float, dense_bytes: int) -> float:
    """Area dominated by the front in (error, size fraction) below (1 - floor, 1.0)."""
    ref_error, ref_size = 1.0 - floor, 1.0
    pts = sorted({(1.0 - acc, size / dense_bytes) for acc, size, *_ in points
                  if 1.0 - acc <= ref_error and size / dense_bytes <= ref_size})
    area, best_size = 0.0, ref_size
    for i, (error, size) in enumerate(pts):
        best_size = min(best_size, size)
        next_error = pts[i + 1][0] if i + 1 < len(pts) else ref_error
        area += (next_error - error) * (ref_size - best_size)
    return area


def dominated(points, others) -> int:
    return sum(any(a2 >= a1 and s2 <= s1 and (a2 > a1 or s2 < s1) for a2, s2, *_ in others) for a1, s1, *_ in points)


def search(task, techniques, budgets, trials, seed, out):
    settings = SearchSettings(trials=trials, seed=seed, techniques=techniques, out_dir=out, tracking=False,
                              progress=False, study=f"bench-{len(techniques)}-{int(time.time())}")
    started = time.perf_counter()
    result = run_search(task, budgets, settings)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop", default="1pt", help="accuracy budget for the comparison (default 1pt)")
    parser.add_argument("--x100-only", action="store_true", help="run only the > 100x search")
    args = parser.parse_args()
    task = load_task()
    out = Path(tempfile.mkdtemp(prefix="sf-distill-search-"))
    budgets = Budgets.parse(max_accuracy_drop=args.drop)
    runs = {}
    for label, techniques in () if args.x100_only else (("without", BASE), ("with", BASE + DISTILL)):
        result, seconds = search(task, techniques, budgets, args.trials, args.seed, out / label)
        runs[label] = (result, seconds)
    if args.x100_only:
        return x100(task, args, out)
    dense = runs["without"][0].baseline.size_bytes
    floor = runs["without"][0].budgets["min_accuracy"]
    print(f"dense fp32 artifact {dense} B, val {runs['without'][0].baseline.accuracy:.4f}; budget: val accuracy >= {floor:.4f}; "
          f"{args.trials} trials each, seed {args.seed}\n")
    fronts = {label: front_points(r) for label, (r, _) in runs.items()}
    for label, (result, seconds) in runs.items():
        pts = fronts[label]
        other = fronts["with" if label == "without" else "without"]
        smallest = min((s for _, s, *_ in pts), default=None)
        print(f"[{label} distillation] {seconds:.0f} s, {result.counts()['feasible']} feasible trials, front of {len(pts)}; "
              f"hypervolume {hypervolume_2d(pts, floor, dense):.4f}; {dominated(pts, other)} of its points dominated "
              f"by the other front; smallest feasible {smallest} B"
              + (f" ({dense / smallest:.0f}x)" if smallest else ""))
        for acc, size, test, plan in pts:
            print(f"    val {acc:.4f}  test {test:.4f}  {size:>8} B  {dense / size:6.1f}x  {plan}")
        print()
    x100(task, args, out)


def x100(task, args, out) -> None:
    from slimforge.core.compressed import save_model
    from slimforge.core.plan import Plan

    dense = save_model(task.teacher, out / "dense.slim", task=task, plan=Plan())
    target = dense // 100
    result, seconds = search(task, ("parameter_distillation", "knowledge_distillation", "weight_only_quant"),
                             Budgets.parse(max_size=target, max_accuracy_drop="2pt"), args.trials, args.seed, out / "x100")
    pts = front_points(result)
    print(f"[>100x ask: --max-size {target} B, drop <= 2pt, with distillation] {seconds:.0f} s, "
          f"{result.counts()['feasible']} feasible, front of {len(pts)}")
    for acc, size, test, plan in pts:
        print(f"    val {acc:.4f}  test {test:.4f}  {size:>8} B  {dense / size:6.1f}x  {plan}")
    if not pts:
        closest = sorted((r for r in result.trials if r.measurements), key=lambda r: r.measurements.size_bytes)[:3]
        for r in closest:
            print(f"    (infeasible) val {r.measurements.accuracy:.4f}  {r.measurements.size_bytes} B  {r.plan_text}")


if __name__ == "__main__":
    main()
