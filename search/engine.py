"""``run_search`` and ``run_worker``: a search from its task, budgets and settings to its result.

Selection uses the validation split only; the test split is touched once, to report the final
Pareto members next to the baseline.  The trial loop itself is ``loop.TrialLoop``; where trials
run is the backend's choice (this process, worker processes, Ray Tune).  Every backend keeps the
study in Optuna storage with each ``TrialRecord`` on its trial, so everything after the loop
(Pareto, test split, reports, trackers) is shared and the backends' results compare directly.

Trackers are not built here: the layer above (``slimforge.app``) registers a plugin that answers
the ``slimforge_search_trackers`` hook, and each tracker it returns listens to this search only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from slimforge.core.errors import ConfigError, SlimforgeError, TaskError
from slimforge.core.manager import Plugins
from slimforge.core.measure import Measurements, measure_artifact
from slimforge.core.planner import Planner
from slimforge.core.task import Task
from slimforge.search.budgets import Budgets, scored_predictions
from slimforge.search.loop import InProcess, SearchContext, TrialLoop
from slimforge.search.pareto import pareto_front, registration_floor
from slimforge.search.records import SearchResult, TrialRecord, record_from_dict
from slimforge.search.reports import write_partial_reports, write_reports, write_summary
from slimforge.search.settings import SearchSettings
from slimforge.search.study import (TECHNIQUES_ATTR, WORKER_ATTR, close_interrupted, log, read_stored_settings,
                                    record_techniques, remove_orphaned_files, store_settings, study_techniques,
                                    this_process, wait_for_other_workers)
from slimforge.search.workers import WorkerSpec, require_rebuildable

__all__ = ["SearchSettings", "run_search", "run_worker"]


def run_search(task: Task, budgets: Budgets, settings: SearchSettings = SearchSettings(),
               plugins: Plugins | None = None) -> SearchResult:
    """Search ``task`` under ``budgets``.  ``plugins``: the process's plugins (built from the
    settings when not given); trackers come from its ``slimforge_search_trackers`` hook."""
    from slimforge.core.compressed import save_model
    from slimforge.core.plan import Plan
    from slimforge.search.backends.optuna import OptunaBackend

    if settings.backend == "ray":
        from slimforge.search.backends.ray import connect, require_ray

        require_ray()  # fail in a second, not after the baseline is measured
        require_rebuildable(task.source, "--backend ray")
        connect(settings)  # join the cluster now: a cluster that refuses us leaves no study or parent run
    if settings.uses_worker_processes:
        require_rebuildable(task.source, "--workers/--trial-timeout/--trial-memory-limit")
    _check_device(settings)  # the baseline is measured here, on the target device
    plugins = plugins or Plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    settings = settings.resolved(task.name)
    planner = make_planner(plugins, settings)
    task.check_batch()  # float labels, out-of-range classes: refused before anything is written
    artifact_dir = (settings.out_dir / "artifacts" / settings.study).resolve()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    recorded = study_techniques(settings.storage, settings.study, [t.name for t in planner.techniques],
                                explicit=settings.techniques is not None)
    if recorded is not None:  # a resumed study searches the techniques it began with
        settings = dataclasses.replace(settings, techniques=tuple(recorded))
        planner = make_planner(plugins, settings)

    baseline_path = settings.out_dir / "baseline.slim"
    save_model(task.teacher.to("cpu"), baseline_path, task=task, plan=Plan())
    baseline, baseline_test = (_measure_baseline(baseline_path, task, plugins, settings, split) for split in ("val", "test"))
    resolution = budgets.resolution_warning(scored_predictions(task.split("val")), task.metric_name)
    budgets = budgets.resolve(baseline.accuracy)
    log(f"baseline (uncompressed): {task.metric_name} {baseline.accuracy:.4f} val / {baseline_test.accuracy:.4f} test, "
        f"{baseline.size_bytes / 1000:.1f} KB, {baseline.latency_ms:.3f} ms; budgets: {budgets.describe()}")
    if resolution:
        log(resolution)
    floor = registration_floor(baseline.accuracy, min_accuracy=settings.register_min_accuracy,
                               max_accuracy_drop=settings.register_max_accuracy_drop,
                               budget_min_accuracy=budgets.min_accuracy)
    spec = WorkerSpec.for_search(task.source, budgets, artifact_dir, settings, front_floor=floor.min_accuracy)
    runner = spec.build_runner(task=task, plugins=plugins)

    trackers = plugins.search_trackers(settings.to_dict())
    for tracker in trackers:
        plugins.register(tracker)
    search_started, reported, backend, ctx = False, False, None, None
    try:
        # Trials a killed search left RUNNING are closed below, once the trackers have started.
        backend = OptunaBackend(storage=settings.storage, study_name=settings.study, seed=settings.seed, budgets=budgets,
                                close_interrupted=False, sampler_name=settings.sampler)
        plugins.configure(settings.to_dict())
        plugins.search_start(settings=settings.to_dict() | {"budgets": budgets.to_dict()}, task=task, baseline=baseline)
        search_started = True
        record_techniques(backend, [t.name for t in planner.techniques])
        close_interrupted(backend, plugins)
        remove_orphaned_files(backend, artifact_dir)
        # Only now may `slimforge worker`s join: a worker's RUNNING trial is not an interrupted one.
        store_settings(backend, settings=settings.to_dict(), task_source=task.source, task_name=task.name,
                       budgets=dataclasses.asdict(budgets), artifact_dir=str(artifact_dir), baseline=baseline.to_dict())
        _enqueue_expert_seeds(backend, planner, task, baseline, budgets, settings)
        runner.history.extend(record_from_dict(r) for r in backend.records())
        ctx = SearchContext(backend=backend, planner=planner, runner=runner, plugins=plugins, task=task,
                            settings=settings, baseline=baseline)
        _run_trials(ctx, spec)
        wait_for_other_workers(backend, plugins)
        records = [record_from_dict(r) for r in backend.records()]
        if trackers:
            _adopt_untracked(records, plugins)
        pareto = pareto_front(records, min_accuracy=floor.min_accuracy)
        for member in pareto:  # the only place the test split is used
            member.test_measurements = runner.measure(member.artifact_path, "test")
            member.not_registered = floor.why_not_registered(member)
        result = SearchResult(study_name=settings.study, task=task.name, budgets=budgets.to_dict(),
                              baseline=baseline, baseline_test=baseline_test, trials=records, pareto=pareto,
                              settings=settings.to_dict(), metric=task.metric_name, loop_seconds=ctx.loop_seconds,
                              registration_floor=floor.to_dict())
        write_reports(result, settings.out_dir)  # before search_end: trackers attach these files
        reported = True
        plugins.search_end(result)
    except BaseException as exc:  # Ctrl-C included: the tracker ends its parent run KILLED, not RUNNING forever
        if search_started and isinstance(exc, KeyboardInterrupt) and not reported:  # else the whole report is there
            _write_partial(backend, ctx, task, budgets, settings, baseline, baseline_test, floor)
        if search_started:
            plugins.search_stopped(exc)
        raise
    finally:
        for tracker in trackers:
            plugins.unregister(tracker)
    write_summary(result, settings.out_dir / "summary.json")  # again, now with registry links
    return result


def _enqueue_expert_seeds(backend, planner: Planner, task: Task, baseline: Measurements, budgets: Budgets,
                          settings: SearchSettings) -> None:
    """A new study starts with the expert plans (``search.seeds``), up to a quarter of its trials.
    (Planning them measures the teacher's sensitivity, ``core.sensitivity``, if a seed's technique
    asks for it; otherwise the first plan that needs it does.)"""
    if not settings.expert_seeds or backend.study.get_trials(deepcopy=False):
        return
    if settings.per_layer_knobs:
        log("expert seeds: none (they are written in the global knobs; --per-layer-knobs searches per site)")
        return
    from slimforge.search.seeds import SEED_ATTR, seed_params

    seeds = seed_params(planner, task, baseline.size_bytes, budgets, limit=max(1, settings.trials // 4))
    for label, params in seeds:
        backend.study.enqueue_trial(params, user_attrs={SEED_ATTR: label})
    if seeds:
        log(f"expert seeds: {len(seeds)} plan(s) queued first: " + "; ".join(label for label, _ in seeds))


def _write_partial(backend, ctx, task: Task, budgets: Budgets, settings: SearchSettings, baseline: Measurements,
                   baseline_test: Measurements, floor) -> None:
    """Ctrl-C: the reports of the trials recorded so far, before the trackers end the search."""
    records = [record_from_dict(r) for r in backend.records()]
    result = SearchResult(study_name=settings.study, task=task.name, budgets=budgets.to_dict(), baseline=baseline,
                          baseline_test=baseline_test, trials=records, pareto=pareto_front(records, min_accuracy=floor.min_accuracy),
                          registration_floor=floor.to_dict(),
                          settings=settings.to_dict(), metric=task.metric_name,
                          loop_seconds=ctx.loop_seconds if ctx else {})
    try:
        write_partial_reports(result, settings.out_dir, "KeyboardInterrupt (Ctrl-C)")
    except Exception as exc:  # noqa: BLE001 - the interrupt goes on up either way; say what is missing
        log(f"interrupted: could not write the partial summary: {type(exc).__name__}: {exc}")
        return
    log(f"interrupted: partial summary of {len(records)} recorded trial(s) in {settings.out_dir / 'summary.json'}; "
        f"resume with --study {settings.study}")


def _run_trials(ctx: SearchContext, spec: WorkerSpec) -> None:
    """This process's share of the study's trials, run where the settings say."""
    settings = ctx.settings
    if settings.backend == "ray":
        from slimforge.search.backends import ray as ray_backend

        return ray_backend.run_trials(ctx, spec)
    loop = TrialLoop(ctx)
    if not settings.uses_worker_processes or loop.remaining() == 0:
        return loop.run(InProcess(ctx.runner))
    from slimforge.search.executor import ProcessPool

    log(f"starting {settings.workers} worker process(es)"
        + (f"; per-trial timeout {settings.trial_timeout_s:g} s" if settings.trial_timeout_s else ""))
    # N workers on N cores: oversubscribed threads slow training 30x here.
    pool = ProcessPool(settings.workers, dataclasses.replace(spec, torch_threads=1), settings.trial_timeout_s,
                       settings.trial_memory_limit)
    pool.wait_ready()
    return loop.run(pool)


def make_planner(plugins: Plugins, settings: SearchSettings) -> Planner:
    available = {"teacher", "training_data", "calibration_data"} | ({"gpu"} if settings.device.startswith("cuda") else set())
    return Planner(plugins.registry, settings.techniques, available=available, fine_tune=settings.finetune)


def _check_device(settings: SearchSettings) -> None:
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device: 'cuda' requested but torch sees no CUDA device; valid here: cpu")


def _measure_baseline(path: Path, task: Task, plugins: Plugins, settings: SearchSettings, split: str) -> Measurements:
    """The uncompressed model on ``split``.  It is the user's own model, data and metric, so a
    failure here is bad input (wrong shapes, a metric that raises), reported on one line before any
    trial runs; a trial failing the same way would only be recorded as failed, over and over."""
    from slimforge.core.measure import latency_lock_path

    try:
        return measure_artifact(path, task=task, plugins=plugins, split=split, device=settings.device,
                                latency=settings.latency, latency_lock=latency_lock_path())
    except SlimforgeError:
        raise
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise TaskError(f"task {task.name!r}: the uncompressed model fails on its own {split!r} data and metric: "
                        f"{type(exc).__name__}: {detail}") from exc


def _adopt_untracked(records: list[TrialRecord], plugins: Plugins) -> None:
    """Trials run by other processes (``slimforge worker``, which has no tracker) reach the
    trackers here, so every trial of the search has its nested run and Pareto members can be
    registered.  The tracker keys runs by study and trial, so adopting them again reuses them."""
    for record in records:
        if not any(key.startswith("mlflow") for key in record.links):
            plugins.trial_end(record)


def run_worker(*, storage: str, study: str, trials: int | None = None, progress: bool = True,
               wait_s: float = 60.0, plugins: Plugins | None = None) -> list[TrialRecord]:
    """Join the search ``study`` in ``storage`` (``slimforge worker``): rebuild its task, planner
    and trial runner from the settings the search stored, and run trials in this process until
    the study holds ``trials`` (default: the search's total).  Returns the records it ran.

    The study's storage must be reachable from here (PostgreSQL/MySQL across hosts; sqlite or a
    journal file on one host), and the search's artifact directory must be the same path here
    (a shared filesystem across hosts): the search reads every artifact back."""
    from slimforge.search.backends.optuna import OptunaBackend

    stored = read_stored_settings(storage, study, wait_s)
    settings = dataclasses.replace(SearchSettings.from_dict(stored["settings"]), storage=storage, study=study,
                                   progress=progress, trials=trials or stored["settings"]["trials"], workers=1,
                                   trial_timeout_s=None, trial_memory_limit=None, tracking=False, backend="optuna",
                                   scheduler="fifo", ray_address=None, cpus_per_trial=1.0, gpus_per_trial=0.0)
    _check_device(settings)
    require_rebuildable(stored["task_source"], f"slimforge worker: study {study!r}")
    plugins = plugins or Plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    spec = WorkerSpec.for_search(stored["task_source"], Budgets(**stored["budgets"]), stored["artifact_dir"], settings)
    runner = spec.build_runner(plugins=plugins)
    # The sampler's seed must differ from the search's: seeded identically, two processes would
    # draw the same start-up plans.  Trials stay reproducible through their plan (and its seed).
    worker_seed = settings.seed + 1_000_003 * (1 + os.getpid() % 997)
    backend = OptunaBackend(storage=storage, study_name=study, seed=worker_seed, budgets=runner.budgets,
                            close_interrupted=False)  # other workers' RUNNING trials are running
    recorded = backend.study.user_attrs.get(TECHNIQUES_ATTR)
    if recorded:  # the study's parameter space: a worker with other plugins installed searches it too
        settings = dataclasses.replace(settings, techniques=tuple(recorded))
    mine_before = {r["number"] for r in backend.records()}
    log(f"worker {this_process()} joined study {study!r} ({stored['task_name']}); running trials until it holds "
        f"{settings.trials}")
    runner.history = [record_from_dict(r) for r in backend.records()]
    plugins.configure(settings.to_dict())
    ctx = SearchContext(backend=backend, planner=make_planner(plugins, settings), runner=runner, plugins=plugins,
                        task=runner.task, settings=settings, baseline=Measurements(**stored["baseline"]))
    TrialLoop(ctx).run(InProcess(runner))
    by_number = {t.number: t for t in backend.study.get_trials(deepcopy=False)}
    return [record_from_dict(r) for r in backend.records()
            if r["number"] not in mine_before and by_number[r["number"]].user_attrs.get(WORKER_ATTR) == this_process()]
