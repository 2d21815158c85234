"""Search throughput and sampler quality on the embedded task.

1. Throughput: the same study (random sampler, so the same plans) run with 1 and with 2 worker processes.  Prints trials per
   minute over the whole search (start-up, baseline and the Pareto members' test measurement
   included) and over the trial phase alone (first trial asked to last trial stored, from
   Optuna's timestamps); the median per-trial loop overhead (``SearchResult.loop_overhead``:
   the time from asking the study for a trial to storing its record, minus the trial's own
   apply / fine-tune / evaluate / save / measure time); and the efficiency of the second worker,
   (throughput with 2 / throughput with 1) - 1, both ways.
2. The machine's own ceiling for that efficiency: one fixed trial (the same plan every time) run
   back to back in one process, then in two processes at once (no search, no Optuna, no
   hand-off).  If two single-threaded trials cannot run side by side at full speed here, no search
   loop can reach an efficiency above this one.
3. Sampler quality: hypervolume of the feasible front after N trials with the default sampler
   (multivariate TPE with constraints) and with Optuna's RandomSampler, same seeds and budgets
   (``--hv-seeds`` seeds each; the ratio of the means is printed).
4. Shared study store (``--store-only`` runs this part alone): trials/s of one study shared by 1, 4
   and 16 processes, on SQLite (the default file store) and on PostgreSQL (``--postgres-url``).
   Each process makes slimforge's own bookkeeping calls for every trial (``OptunaBackend.ask``,
   ``study.claim_trial`` with its heartbeat lease, ``study.finish_trial``: pending record, tell,
   constraints) around a tiny trial that does no work, so the figure is the store's ceiling; a
   process that the store fails (SQLite's "database is locked") is counted, and the study is
   checked for lost or duplicated trials.

    python benchmarks/search_scale.py --trials 12 --hv-trials 40
    python benchmarks/search_scale.py --trials 40 --throughput-only
    python benchmarks/search_scale.py --store-only --postgres-url postgresql+psycopg://USER@HOST:PORT/DB
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from slimforge.core.sensitivity import sensitivity_of
from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search
from slimforge.search.reports import search_summary
from study_timing import trial_phase_seconds

TECHNIQUES = ("magnitude_pruning", "int8_ptq", "weight_only_quant", "structured_pruning")


def timed_search(task, out: Path, **settings):
    started = time.perf_counter()
    result = run_search(task, Budgets.parse(max_accuracy_drop="2pt"),
                        SearchSettings(out_dir=out, tracking=False, progress=False, techniques=TECHNIQUES,
                                       study=f"{out.name}-{int(time.time())}", **settings))
    return result, time.perf_counter() - started


CEILING_PLAN = {"steps": [{"technique": "magnitude_pruning", "config": {"default_sparsity": 0.8}},
                           {"technique": "weight_only_quant", "config": {"default_bits": 4}}],
                "recovery": {"epochs": 1, "lr": 0.001}, "seed": 0}


def _fixed_trials(repeats: int, barrier, out_dir: str, queue) -> None:
    """In a spawned process: wait for the others, then run the fixed trial ``repeats`` times."""
    import torch

    from slimforge.core.manager import Plugins
    from slimforge.core.plan import Plan
    from slimforge.search.budgets import Budgets
    from slimforge.search.objective import TrialRunner

    torch.set_num_threads(1)  # as the search's worker processes do
    task = load_task()
    _ = task.teacher
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    runner = TrialRunner(task=task, plugins=Plugins(), budgets=Budgets(), artifact_dir=Path(out_dir))
    plan = Plan.from_dict(CEILING_PLAN)
    runner.run(plan, 0)  # warm caches (teacher logits, kernels) outside the timed loop
    barrier.wait()
    started = time.perf_counter()
    for number in range(repeats):
        record = runner.run(plan, number)
        if record.state != "complete":  # reported to the parent, which would otherwise wait forever
            queue.put(f"ceiling trial failed: {record.failure_reason}")
            return
    queue.put(time.perf_counter() - started)


def machine_ceiling(repeats: int, root: Path) -> tuple[float, float, float]:
    """(seconds per trial alone, seconds per trial with two processes at once, efficiency)."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    per_trial = []
    for processes in (1, 2):
        barrier, queue = context.Barrier(processes), context.Queue()
        workers = [context.Process(target=_fixed_trials, args=(repeats, barrier, str(root / f"ceiling{processes}-{i}"), queue))
                   for i in range(processes)]
        for worker in workers:
            worker.start()
        walls = [queue.get() for _ in workers]
        for worker in workers:
            worker.join()
        if any(isinstance(wall, str) for wall in walls):
            raise SystemExit(next(wall for wall in walls if isinstance(wall, str)))
        per_trial.append(max(walls) / repeats)
    alone, together = per_trial
    return alone, together, 2 * alone / together - 1


class _NoTrackers:
    def trial_end(self, record) -> None:
        pass


def _store_trials(storage: str, study: str, total: int, barrier, queue) -> None:
    """In a spawned process: claim and finish no-work trials until the study holds ``total``;
    puts (trials finished here, error or None)."""
    from slimforge.core.measure import Measurements
    from slimforge.search.backends.optuna import OptunaBackend
    from slimforge.search.records import COMPLETE, TrialRecord
    from slimforge.search.study import claim_trial, counted, finish_trial

    done = 0
    try:
        backend = OptunaBackend(storage=storage, study_name=study, seed=0, budgets=Budgets(),
                                close_interrupted=False, sampler_name="random")
        barrier.wait()
        while counted(backend.study) < total:
            trial = backend.ask()
            if not claim_trial(backend.study, trial, total):
                break
            finish_trial(backend, _NoTrackers(), trial, TrialRecord(
                number=trial.number, state=COMPLETE, plan={}, plan_text="", feasible=True,
                measurements=Measurements(accuracy=0.5, size_bytes=1000 + trial.number, latency_ms=1.0)))
            done += 1
    except Exception as exc:  # noqa: BLE001 - the store failed this process: count it, report why
        queue.put((done, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
        return
    queue.put((done, None))


def store_throughput(storage: str, processes: int, total: int) -> dict:
    """Trials/s of ``processes`` processes sharing one new study on ``storage``, from the moment all
    of them are ready to the last one's exit; plus what the study holds afterwards."""
    import multiprocessing as mp

    import optuna

    from slimforge.search.backends.optuna import OptunaBackend
    from slimforge.search.study import SURPLUS_ATTR

    study = f"store-{processes}-{time.time_ns()}"
    OptunaBackend(storage=storage, study_name=study, seed=0, budgets=Budgets(), sampler_name="random")
    context = mp.get_context("spawn")
    barrier, queue = context.Barrier(processes + 1), context.Queue()
    workers = [context.Process(target=_store_trials, args=(storage, study, total, barrier, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    results = [queue.get() for _ in workers]
    wall = time.perf_counter() - started
    for worker in workers:
        worker.join()
    trials = [t for t in optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
              if not t.user_attrs.get(SURPLUS_ATTR)]
    complete = [t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"processes": processes, "complete": len(complete), "wall": wall, "per_s": len(complete) / wall,
            "intact": sorted(complete) == list(range(total)),
            "errors": [error for _, error in results if error]}


def store_benchmark(root: Path, postgres_url: str | None, total: int) -> None:
    stores = [("sqlite", f"sqlite:///{root / 'store.db'}")] + ([("postgresql", postgres_url)] if postgres_url else [])
    print(f"Shared study store ({total} no-work trials per study; slimforge's ask/claim/finish calls per trial)")
    print(f"{'store':<10} {'processes':>9} {'complete':>8} {'wall s':>7} {'trials/s':>8} {'intact':>6}  failed processes")
    for name, url in stores:
        for processes in (1, 4, 16):
            r = store_throughput(url, processes, total)
            print(f"{name:<10} {processes:>9} {r['complete']:>8} {r['wall']:>7.1f} {r['per_s']:>8.1f} "
                  f"{'yes' if r['intact'] else 'NO':>6}  {len(r['errors'])}"
                  + (f" ({r['errors'][0]})" if r["errors"] else ""))
    if not postgres_url:
        print("(no --postgres-url: PostgreSQL not measured)")
    print("intact: the study's counted trials are exactly 0..N-1, all COMPLETE\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="trials per throughput run")
    parser.add_argument("--hv-trials", type=int, default=40, help="trials per sampler-quality run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hv-seeds", type=int, default=1, help="seeds per sampler for the hypervolume comparison")
    parser.add_argument("--ceiling-trials", type=int, default=6, help="fixed trials per process for the ceiling")
    parser.add_argument("--store-only", action="store_true", help="run only the shared study store comparison")
    parser.add_argument("--throughput-only", action="store_true",
                        help="run only the 1- vs 2-worker throughput and the machine's ceiling")
    parser.add_argument("--store-trials", type=int, default=160, help="trials per study in the store comparison")
    parser.add_argument("--postgres-url", help="a PostgreSQL database for the store comparison "
                                               "(postgresql+psycopg://USER@HOST:PORT/DB)")
    args = parser.parse_args()
    if args.store_only:
        store_benchmark(Path(tempfile.mkdtemp(prefix="sf-search-scale-")), args.postgres_url, args.store_trials)
        return
    task = load_task()
    root = Path(tempfile.mkdtemp(prefix="sf-search-scale-"))
    # Once-per-teacher costs (training it, measuring its sensitivity; both cached) paid before the
    # timed searches, or the first of them would carry them and the comparison would not be like
    # for like.
    sensitivity_of(task)

    rows = []
    for workers in (1, 2):
        # Worker processes even for 1, so both runs pay the same start-up and hand-off costs.  The
        # random sampler draws the same plans whatever the number of workers (the search process
        # asks for every plan), so both runs do the same work; TPE's plans would depend on which
        # trials had finished when each was asked.
        result, wall = timed_search(task, root / f"w{workers}", trials=args.trials, seed=args.seed,
                                    workers=workers, trial_timeout_s=600, sampler="random")
        n = len(result.trials)
        overhead = result.loop_overhead()
        rows.append({"workers": workers, "trials": n, "wall": wall, "per_min": 60 * n / wall,
                     "steady_per_min": 60 * n / trial_phase_seconds(result),
                     "median_trial": statistics.median(r.duration_s for r in result.trials),
                     "overhead": overhead["median"], "overhead_max": overhead["max"]})
    print(f"Throughput ({args.trials} trials, random sampler: the same plans for 1 and 2 workers; techniques "
          f"{', '.join(TECHNIQUES)}; worker processes, 1 torch thread each)")
    print(f"{'workers':>7} {'trials':>6} {'wall s':>7} {'trials/min':>10} {'steady/min':>10} {'median trial s':>14} "
          f"{'overhead s/trial':>16} {'(max)':>6}")
    for r in rows:
        print(f"{r['workers']:>7} {r['trials']:>6} {r['wall']:>7.1f} {r['per_min']:>10.2f} {r['steady_per_min']:>10.2f} "
              f"{r['median_trial']:>14.2f} {r['overhead']:>16.3f} {r['overhead_max']:>6.2f}")
    print("trials/min: whole search; steady/min: first trial asked to last trial stored; overhead: median per trial "
          "of (loop time - apply/fine-tune/evaluate/save/measure), target <= 0.3 s")
    print(f"efficiency of the second worker: {rows[1]['per_min'] / rows[0]['per_min'] - 1:.2f} whole search, "
          f"{rows[1]['steady_per_min'] / rows[0]['steady_per_min'] - 1:.2f} steady (target >= 0.8)\n")

    alone, together, ceiling = machine_ceiling(args.ceiling_trials, root)
    print(f"Machine ceiling: one fixed trial {alone:.2f} s alone, {together:.2f} s with a second process running the "
          f"same; efficiency of a second process {ceiling:.2f}\n")
    if args.throughput_only:
        return

    seeds = range(args.seed, args.seed + args.hv_seeds)
    print(f"Sampler quality ({args.hv_trials} trials each, seeds {', '.join(map(str, seeds))}, accuracy drop <= 2 pt)")
    volumes: dict[str, list[float]] = {"tpe": [], "random": []}
    for seed in seeds:
        for sampler in ("tpe", "random"):
            result, wall = timed_search(task, root / f"{sampler}{seed}", trials=args.hv_trials, seed=seed, sampler=sampler)
            volumes[sampler].append(search_summary(result.trials, result.baseline)["hypervolume"] or 0.0)
            counts = result.counts()
            print(f"  seed {seed} {sampler:<6} hypervolume {volumes[sampler][-1]:.4f}  feasible "
                  f"{counts['feasible']:>3}/{len(result.trials)}  front {len(result.pareto)}  {wall:.0f} s")
    tpe, random = (statistics.mean(volumes[k]) for k in ("tpe", "random"))
    if random:
        wins = sum(t > r for t, r in zip(volumes["tpe"], volumes["random"]))
        print(f"TPE / random mean hypervolume: {tpe:.4f} / {random:.4f} = {tpe / random:.2f}x (target >= 1.2x); "
              f"TPE higher in {wins} of {len(volumes['tpe'])} seeds")
    print()
    store_benchmark(root, args.postgres_url, args.store_trials)


if __name__ == "__main__":
    main()
