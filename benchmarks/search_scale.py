"""Search throughput and sampler quality on the embedded task.

1. Throughput: the same study size run with 1 and with 2 worker processes.  Prints trials per
   minute, the median per-trial overhead (wall time of the search loop not spent inside
   TrialRunner.run: asking/telling Optuna, planning, storage, worker hand-off) and the
   efficiency of the second worker: (throughput with 2 / throughput with 1) - 1.
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
        inside = [r.duration_s for r in result.trials]
        overhead = (wall * workers - sum(inside)) / len(inside)
        rows.append((workers, len(result.trials), wall, 60 * len(result.trials) / wall,
                     statistics.median(inside), overhead))
    print(f"Throughput ({args.trials} trials, techniques {', '.join(TECHNIQUES)}, worker processes, 1 torch thread each)")
    print(f"{'workers':>7} {'trials':>6} {'wall s':>7} {'trials/min':>10} {'median trial s':>14} {'overhead s/trial':>16}")
    for workers, n, wall, tpm, median, overhead in rows:
        print(f"{workers:>7} {n:>6} {wall:>7.1f} {tpm:>10.2f} {median:>14.2f} {overhead:>16.2f}")
    print(f"efficiency of the second worker: {rows[1][3] / rows[0][3] - 1:.2f} (target >= 0.8)\n")

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
