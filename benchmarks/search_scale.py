"""Search throughput and sampler quality on the embedded task.

1. Throughput: the same study size run with 1 and with 2 worker processes.  Prints trials per
   minute over the whole search (start-up, baseline and the Pareto members' test measurement
   included) and over the trial phase alone (first trial asked to last trial stored, from
   Optuna's timestamps); the median per-trial loop overhead (``SearchResult.loop_overhead``:
   the time from asking the study for a trial to storing its record, minus the trial's own
   apply / fine-tune / evaluate / save / measure time); and the efficiency of the second worker,
   (throughput with 2 / throughput with 1) - 1, both ways.
2. Sampler quality: hypervolume of the feasible front after N trials with the default sampler
   (multivariate TPE with constraints) and with Optuna's RandomSampler, same seed and budgets.

    python benchmarks/search_scale.py --trials 12 --hv-trials 40
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.search.engine import SearchSettings, run_search, search_summary

TECHNIQUES = ("magnitude_pruning", "int8_ptq", "weight_only_quant", "structured_pruning")


def timed_search(task, out: Path, **settings):
    started = time.perf_counter()
    result = run_search(task, Budgets.parse(max_accuracy_drop="2pt"),
                        SearchSettings(out_dir=out, tracking=False, progress=False, techniques=TECHNIQUES,
                                       study=f"{out.name}-{int(time.time())}", **settings))
    return result, time.perf_counter() - started


def trial_phase_seconds(out_dir: Path, study: str) -> float:
    """Seconds from the first trial's start to the last trial's end, by Optuna's timestamps."""
    import optuna

    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{out_dir / 'optuna.db'}").get_trials(deepcopy=False)
    return (max(t.datetime_complete for t in trials if t.datetime_complete)
            - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="trials per throughput run")
    parser.add_argument("--hv-trials", type=int, default=40, help="trials per sampler-quality run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = load_task()
    root = Path(tempfile.mkdtemp(prefix="sf-search-scale-"))

    rows = []
    for workers in (1, 2):
        # Worker processes even for 1, so both runs pay the same start-up and hand-off costs.
        result, wall = timed_search(task, root / f"w{workers}", trials=args.trials, seed=args.seed,
                                    workers=workers, trial_timeout_s=600)
        n = len(result.trials)
        overhead = result.loop_overhead()
        rows.append({"workers": workers, "trials": n, "wall": wall, "per_min": 60 * n / wall,
                     "steady_per_min": 60 * n / trial_phase_seconds(root / f"w{workers}", result.study_name),
                     "median_trial": statistics.median(r.duration_s for r in result.trials),
                     "overhead": overhead["median"], "overhead_max": overhead["max"]})
    print(f"Throughput ({args.trials} trials, techniques {', '.join(TECHNIQUES)}, worker processes, 1 torch thread each)")
    print(f"{'workers':>7} {'trials':>6} {'wall s':>7} {'trials/min':>10} {'steady/min':>10} {'median trial s':>14} "
          f"{'overhead s/trial':>16} {'(max)':>6}")
    for r in rows:
        print(f"{r['workers']:>7} {r['trials']:>6} {r['wall']:>7.1f} {r['per_min']:>10.2f} {r['steady_per_min']:>10.2f} "
              f"{r['median_trial']:>14.2f} {r['overhead']:>16.3f} {r['overhead_max']:>6.2f}")
    print("trials/min: whole search; steady/min: first trial asked to last trial stored; overhead: median per trial "
          "of (loop time - apply/fine-tune/evaluate/save/measure), target <= 0.3 s")
    print(f"efficiency of the second worker: {rows[1]['per_min'] / rows[0]['per_min'] - 1:.2f} whole search, "
          f"{rows[1]['steady_per_min'] / rows[0]['steady_per_min'] - 1:.2f} steady (target >= 0.8)\n")

    print(f"Sampler quality ({args.hv_trials} trials each, seed {args.seed}, accuracy drop <= 2 pt)")
    volumes = {}
    for sampler in ("tpe", "random"):
        result, wall = timed_search(task, root / sampler, trials=args.hv_trials, seed=args.seed, sampler=sampler)
        volumes[sampler] = search_summary(result.trials, result.baseline)["hypervolume"] or 0.0
        counts = result.counts()
        print(f"  {sampler:<6} hypervolume {volumes[sampler]:.4f}  feasible {counts['feasible']:>3}/{len(result.trials)}  "
              f"front {len(result.pareto)}  {wall:.0f} s")
    if volumes["random"]:
        print(f"TPE / random hypervolume: {volumes['tpe'] / volumes['random']:.2f}x (target >= 1.2x)")


if __name__ == "__main__":
    main()
