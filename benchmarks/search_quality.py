"""Search quality: does the search beat random sampling and the hand recipe?

Runs whole searches side by side in one run, several seeds each, and prints one row per search
and a summary per configuration:

- ``ours``: the default search (grouped TPE, global knobs allocated by sensitivity, expert seeds,
  successive halving);
- ``random``: random sampling of the same space, no expert seeds (what an AutoML tool must beat);
- ``per-layer``: TPE over one knob per weight site, no seeds (the space the search had before);
- ``nsga2`` / ``gp``: the same as ``ours`` with Optuna's NSGA-II or Gaussian-process sampler.

Per search: trials complete / stopped early (successive halving or the accuracy budget) /
rejected untrained, feasible trials, the largest feasible compression ratio (dense artifact bytes /
artifact bytes) with its validation and test accuracy, the hypervolume of the feasible front
(``search.reports.HYPERVOLUME_DEFINITION``: log size, log latency, a 10-point accuracy window),
wall and CPU seconds.  The hand Deep Compression pipeline's figure to beat is printed by
``benchmarks/compression.py --trials 0``.

    python benchmarks/search_quality.py --configs ours,random --seeds 0,1,2 --trials 40 --timeout 1200
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from slimforge.core.measure import LatencySettings
from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.search.engine import run_search
from slimforge.search.records import COMPLETE, REJECTED
from slimforge.search.reports import search_summary
from slimforge.search.settings import SearchSettings

CONFIGS = {
    "ours": {},
    "random": {"sampler": "random", "expert_seeds": False},
    "per-layer": {"per_layer_knobs": True, "expert_seeds": False},
    "nsga2": {"sampler": "nsga2"},
    "gp": {"sampler": "gp"},
}
TECHNIQUES = ("magnitude_pruning", "gradient_pruning", "fisher_pruning", "structured_pruning", "kmeans_clustering",
              "weight_only_quant", "int8_ptq", "knowledge_distillation")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist-lenet5")
    parser.add_argument("--configs", default="ours,random", help=f"comma-separated from {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds after which a search starts no trial")
    parser.add_argument("--max-drop", type=float, default=0.005, help="accuracy budget: drop from the baseline")
    parser.add_argument("--max-size", type=int, default=None, help="size budget in bytes (default none)")
    parser.add_argument("--techniques", default=",".join(TECHNIQUES))
    parser.add_argument("--out", type=Path, default=Path("/tmp/slimforge-search-quality"))
    args = parser.parse_args()
    args.techniques = args.techniques.split(",")
    task = load_task(args.task)
    rows = []
    print("| config | seed | trials | complete | stopped early | rejected | feasible | best ratio | val | test "
          "| hypervolume | wall s | CPU s | smallest feasible plan |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    # "smallest feasible plan" starts with the expert seed's name when that trial was one
    for seed in (int(s) for s in args.seeds.split(",")):
        for config in args.configs.split(","):
            budgets = Budgets(max_size_bytes=args.max_size, max_accuracy_drop=args.max_drop)
            row = one_search_with(task, config, seed, budgets, args)
            rows.append(row)
            print(f"| {config} | {seed} | {row['trials']} | {row['complete']} | {row['stopped']} | {row['rejected']} | "
                  f"{row['feasible']} | {fmt(row['ratio'], '.1f')}x | {fmt(row['val'], '.4f')} | "
                  f"{fmt(row['test'], '.4f')} | {row['hv']:.4f} | {row['wall']:.0f} | {row['cpu']:.0f} | "
                  f"{row['best_from'] + row['best_plan'][:160]} |", flush=True)
    print()
    print("| config | mean hypervolume (spread) | mean best ratio | searches >= 50x | stopped early / complete |")
    print("|---|---|---:|---:|---:|")
    for config in args.configs.split(","):
        mine = [r for r in rows if r["config"] == config]
        hv = [r["hv"] for r in mine]
        ratios = [r["ratio"] or 0.0 for r in mine]
        print(f"| {config} | {statistics.mean(hv):.4f} ({min(hv):.4f}-{max(hv):.4f}) | {statistics.mean(ratios):.1f}x | "
              f"{sum(r >= 50 for r in ratios)} of {len(mine)} | {sum(r['stopped'] for r in mine)} / "
              f"{sum(r['complete'] for r in mine)} |")
    by = {c: statistics.mean(r["hv"] for r in rows if r["config"] == c) for c in args.configs.split(",")}
    if "ours" in by and "random" in by and by["random"] > 0:
        print(f"\nhypervolume ours / random: {by['ours'] / by['random']:.2f}x (target >= 1.2x)")
    sys.stdout.flush()


def one_search_with(task, config: str, seed: int, budgets: Budgets, args) -> dict:
    settings = SearchSettings(trials=args.trials, timeout_s=args.timeout, seed=seed, techniques=tuple(args.techniques),
                              study=f"{config}-{seed}", out_dir=args.out / f"{config}-{seed}", tracking=False,
                              progress=False, latency=LatencySettings(warmup=5, repeats=30), **CONFIGS[config])
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run_search(task, budgets, settings)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    dense = result.baseline.size_bytes
    complete = [r for r in result.trials if r.state == COMPLETE]
    feasible = [r for r in complete if r.feasible]
    best = min(feasible, key=lambda r: r.measurements.size_bytes, default=None)
    member = next((m for m in result.pareto if best is not None and m.number == best.number), None)
    return {
        "config": config, "seed": seed, "trials": len(result.trials), "complete": len(complete),
        "stopped": sum(bool(r.stopped_early) for r in complete),
        "rejected": sum(r.state == REJECTED for r in result.trials), "feasible": len(feasible),
        "ratio": dense / best.measurements.size_bytes if best else None,
        "val": best.measurements.accuracy if best else None,
        "test": member.test_measurements.accuracy if member is not None and member.test_measurements else None,
        "best_plan": best.plan_text if best else "-",
        "best_from": next((f"({note}) " for note in (best.notes if best else []) if note.startswith("expert seed")), ""), "hv": search_summary(result.trials, result.baseline)["hypervolume"],
        "wall": wall, "cpu": cpu,
    }


if __name__ == "__main__":
    main()
