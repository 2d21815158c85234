"""The search without fine-tuning on the character GPT, next to the fine-tuning search at equal wall time.

Issue 21's Show item: on the embedded sequence task ``text-chargpt`` (its trained teacher from the
cache), ``--no-finetune`` runs ``--trials`` trials (target: 100 in <= 10 CPU-minutes); then the
normal search, with every technique and fine-tuning, runs with ``--timeout`` equal to the one-shot
search's wall time (``--timeout`` stops *starting* trials, so the running one finishes: its wall
time is printed too).  Both are whole searches as ``slimforge search`` runs them: expert seeds,
MLflow tracking and registry (a temporary sqlite store), the same seed, no budgets.

CPU time is this process's and its children's user + system time (``resource.getrusage``), taken
around each search; the teacher's sensitivity (``core.sensitivity``, measured once per teacher and
cached) is reported apart, with the seconds it took when it was measured.  Printed: the cost per
trial and where a one-shot trial's time goes (one trial's phases timed again), and the two Pareto
fronts (size vs validation next-token accuracy, test accuracy beside it) side by side.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/one_shot_search.py --trials 100
"""

from __future__ import annotations

import argparse
import copy
import itertools
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimforge.app.api import SearchSettings, run_search
from slimforge.core.compressed import save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import evaluate, measure_artifact
from slimforge.core.plan import Plan
from slimforge.core.sensitivity import sensitivity_of
from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.records import TrialRecord


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def search(task, out: Path, label: str, **settings):
    settings = SearchSettings(out_dir=out / label, study=f"{label}-{int(time.time())}", progress=False,
                              tracking_uri=f"sqlite:///{out / 'mlflow.db'}", experiment=f"bench-{label}", **settings)
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = run_search(task, Budgets(), settings)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def phases(task, plan: Plan, out: Path) -> dict[str, float]:
    """One one-shot trial's phases, timed again outside the search (CPU seconds)."""
    plugins = Plugins()
    runner = TrialRunner(task=task, plugins=plugins, budgets=Budgets(), artifact_dir=out)
    times = {}

    def timed(name, fn):
        started = time.process_time()
        value = fn()
        times[name] = time.process_time() - started
        return value

    model, applied = timed("apply the plan (quantize)", lambda: runner._apply(copy.deepcopy(task.teacher), plan.steps,
                                                                           plan, TrialRecord(0, "", {}, "")))
    path = out / "phases.slim"
    timed("encode and save the artifact", lambda: save_model(model, path, task=task, plan=plan,
                                                             structure=[s.ctx.structure for s in applied]))
    timed("load + validation accuracy + latency (measure_artifact)",
          lambda: measure_artifact(path, task=task, plugins=plugins, split="val"))
    val = task.split("val")
    timed(f"  of which: validation accuracy alone ({len(val)} windows)", lambda: evaluate(model, val, task.metric))
    return times


def short_plan(plan: dict) -> str:
    """A plan in one short line: per-site values (bits, sparsity per weight site) as their range."""
    steps = []
    for step in plan["steps"]:
        knobs = []
        for name, value in step["config"].items():
            if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
                value = f"{min(value.values()):g}..{max(value.values()):g} over {len(value)} sites"
            if value not in (None, {}, []):
                knobs.append(f"{name}={value}")
        steps.append(f"{step['technique']}({', '.join(knobs)})")
    epochs = plan.get("recovery", {}).get("epochs", 0)
    return " > ".join(steps) + (f" + fine-tune {epochs} ep" if epochs else "")


def front_rows(result) -> list[tuple[int, float, float, str]]:
    return sorted(((m.measurements.size_bytes, m.measurements.accuracy, m.test_measurements.accuracy,
                    short_plan(m.plan)) for m in result.pareto), key=lambda row: row[0])


def print_search(label: str, result, wall: float, cpu: float) -> None:
    counts = result.counts()
    durations = [r.duration_s for r in result.trials]
    trained = sum(r.training_seconds or 0 for r in result.trials)
    overhead = result.loop_overhead() or {}
    print(f"[{label}] {len(result.trials)} trials in {wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / 60:.2f} CPU-min); "
          f"{counts['complete']} complete, {counts['failed']} failed, {counts['rejected']} rejected, "
          f"{counts['stopped_early']} stopped early; trial duration median {statistics.median(durations):.2f} s, "
          f"max {max(durations):.1f} s; recovery training {trained:.0f} s in all; loop overhead per trial "
          f"median {overhead.get('median', 0):.2f} s; front of {len(result.pareto)}")


def print_fronts(dense: int, fronts: dict[str, list]) -> None:
    labels = list(fronts)
    header = " | ".join(f"{label} KB | ratio | val % | test %" for label in labels)
    print(f"| # | {header} |")
    print("|---" * (1 + 4 * len(labels)) + "|")
    for i, rows in enumerate(itertools.zip_longest(*fronts.values())):
        cells = []
        for row in rows:
            cells.append(" | | | " if row is None else
                         f"{row[0] / 1000:.1f} | {dense / row[0]:.1f}x | {100 * row[1]:.2f} | {100 * row[2]:.2f}")
        print(f"| {i + 1} | {' | '.join(cells)} |")
    for label, rows in fronts.items():
        print(f"\n{label} front plans:")
        for i, row in enumerate(rows):
            print(f"  {i + 1}. {row[3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="text-chargpt")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-finetune", action="store_true", help="run only the search without fine-tuning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="sf-one-shot-search-"))
    task = load_task(args.task)
    _ = task.teacher
    cpu, wall = cpu_seconds(), time.perf_counter()
    sensitivity = sensitivity_of(task)
    print(f"sensitivity of the teacher: {len(sensitivity.sites)} sites on {sensitivity.samples} validation windows, "
          f"measured once in {sensitivity.seconds:.0f} s (cached; this run: {time.perf_counter() - wall:.1f} s wall, "
          f"{cpu_seconds() - cpu:.1f} s CPU)")

    one_shot, wall, cpu = search(task, out, "one-shot", trials=args.trials, seed=args.seed, finetune=False)
    dense = one_shot.baseline.size_bytes
    print(f"\ntask {args.task}: dense fp32 artifact {dense} B, val {100 * one_shot.baseline.accuracy:.2f} %, test "
          f"{100 * one_shot.baseline_test.accuracy:.2f} %, {one_shot.baseline.latency_ms:.2f} ms; torch threads "
          f"{torch.get_num_threads()}\n")
    print_search("no fine-tuning", one_shot, wall, cpu)
    print(f"  target: {args.trials} trials in <= 10 CPU-minutes: {'met' if cpu <= 600 else 'NOT met'} "
          f"({cpu / len(one_shot.trials):.2f} CPU-s per trial, search included)")
    member = min(one_shot.pareto, key=lambda m: m.measurements.size_bytes)
    print("  where a one-shot trial's time goes (the smallest front member's plan, timed again, CPU s):")
    for name, seconds in phases(task, Plan.from_dict(member.plan), out).items():
        print(f"    {name}: {seconds:.2f}")
    fronts = {"no fine-tuning": front_rows(one_shot)}
    if not args.skip_finetune:
        tuned, tuned_wall, tuned_cpu = search(task, out, "fine-tuning", trials=args.trials, seed=args.seed,
                                              timeout_s=wall)
        print_search(f"fine-tuning, --timeout {wall:.0f}", tuned, tuned_wall, tuned_cpu)
        fronts["fine-tuning"] = front_rows(tuned)
    print()
    print_fronts(dense, fronts)


if __name__ == "__main__":
    main()
