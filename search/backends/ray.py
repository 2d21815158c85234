"""Ray Tune backend: the same define-by-run space, objective, budgets and records as the Optuna
backend, with trials run as Ray Tune trials (a local Ray, or a cluster via ``--ray-address``).

How it maps onto Ray (checked against Ray 2.60's ``ray.tune.search.optuna.OptunaSearch``):

- **Space.**  ``OptunaSearch`` accepts a define-by-run function ``space(trial)`` that may return a
  dict of constants.  Ours calls ``planner.sample(OptunaSuggester(trial), ...)`` (the very call the
  Optuna backend makes) and returns the plan, JSON-encoded, as one constant.  The Optuna study
  behind the searcher is *our* study (same storage, same TPE sampler), so the records land where
  the Optuna backend puts them and everything after the trial loop is shared
  (``search.engine``).
- **Objectives and constraints.**  ``OptunaSearch`` takes ``metric=[...]``/``mode=[...]`` for
  multi-objective studies, but has no way to pass constraints: its ``on_trial_complete`` only
  calls ``study.tell(values)``.  We override ``on_trial_complete`` to tell the trial through
  ``OptunaBackend.tell``: the record is stored on the trial and the budget violations reach TPE
  through ``Trial.set_constraint`` exactly as with the Optuna backend.  Nothing is folded into the
  objective values.
- **Cluster.**  ``--ray-address auto`` (or ``host:6379``) from a node of the cluster.  Ray Client
  (``ray://``) is refused: through it Tune runs the search loop on the head node, away from this
  process's study, trackers and progress bar.
- **Trainable.**  A function trainable rebuilds the task from ``Task.source`` (built-in name or
  config file) once per Ray worker process, with its own ``Plugins`` and ``TrialRunner``, runs
  the plan and reports the record.  Resources per trial: ``--cpus-per-trial``,
  ``--gpus-per-trial`` (fractions allowed).
- **ASHA** (``--scheduler asha``, optional).  The trial reports its validation score after every
  recovery epoch; ASHA stops trials whose score trails the others at the same epoch.  A stopped
  trial has no artifact and no measurements: it is recorded with state ``stopped`` (and told to
  Optuna as PRUNED), never counted as complete or failed.  ASHA ranks by accuracy alone, so it can
  stop a small, less accurate plan that the Pareto front would have kept: it trades front quality
  for throughput.

Latency stays honest under concurrency: every trial times under a per-host file lock
(``engine.latency_lock_path``), so two trials on one host never time at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from typing import Any

from slimforge.core.errors import ConfigError, MissingDependencyError
from slimforge.search.records import COMPLETE, TrialRecord, record_from_dict

STOPPED = "stopped"  # record state: ended early by the Ray scheduler, before it was measured
CONFIG_KEY = "slimforge"  # the one constant the space function returns: plan + trial number, as JSON
METRICS = ("accuracy", "size_bytes", "latency_ms")
MODES = ("max", "min", "min")  # Optuna's DIRECTIONS in Ray's words
EPOCH_METRIC = "epoch_score"  # what ASHA compares: validation score after each recovery epoch


def require_ray():
    """Import Ray Tune or raise the one-line install hint."""
    try:
        import ray
        from ray import tune  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("ray[tune]", "--backend ray (the Ray Tune backend)", extra="ray") from exc
    return ray


def check_task(task) -> None:
    if not ({"builtin", "config"} & set(task.source)):
        raise ConfigError("--backend ray: needs a task that Ray workers can rebuild (a built-in task or a --config "
                          "file); this task was built in Python")


# --- worker side ---------------------------------------------------------------------------------

_RUNNERS: dict[str, Any] = {}  # per worker process: the task (teacher, data) is built once, not per trial


def _make_runner_class():
    from slimforge.search.objective import TrialRunner

    class ReportingRunner(TrialRunner):
        """Reports the validation score after every recovery epoch when a scheduler listens.
        ``early_stop`` is the per-epoch callback the recovery loop already calls."""

        report_epochs = False

        def early_stop(self, log, epochs_left, size_estimate):
            if self.report_epochs and log.scores:
                from ray import tune

                # The final metrics are not known yet; Tune requires every result to carry them.
                tune.report({EPOCH_METRIC: log.scores[-1], "epoch": len(log.scores), "final": False,
                             **{name: math.nan for name in METRICS}})
            return super().early_stop(log, epochs_left, size_estimate)

    return ReportingRunner


def _runner(worker: dict[str, Any]):
    key = json.dumps(worker, sort_keys=True)
    if key not in _RUNNERS:
        from pathlib import Path

        import torch

        from slimforge.core.manager import Plugins
        from slimforge.core.measure import LatencySettings
        from slimforge.core.task import task_from_source
        from slimforge.search.budgets import Budgets

        # Threads as granted: N trials on N cores with default threads slow training many times over.
        torch.set_num_threads(max(1, int(worker["cpus_per_trial"])))
        task = task_from_source(worker["task_source"])
        _ = task.teacher
        runner = _make_runner_class()(
            task=task, plugins=Plugins(strict=worker["strict_plugins"], disabled=tuple(worker["disabled_plugins"])),
            budgets=Budgets(**worker["budgets"]), artifact_dir=Path(worker["artifact_dir"]), device=worker["device"],
            latency=LatencySettings(**worker["latency"]), latency_lock=Path(worker["latency_lock"]))
        runner.report_epochs = worker["report_epochs"]
        runner.artifact_dir.mkdir(parents=True, exist_ok=True)
        _RUNNERS.clear()  # a reused process serves one search at a time
        _RUNNERS[key] = runner
    return _RUNNERS[key]


def trainable(config: dict[str, Any], worker: dict[str, Any]) -> None:
    """One Ray Tune trial: the plan from the searcher, run by a ``TrialRunner`` in this worker."""
    from ray import tune

    from slimforge.core.plan import Plan
    from slimforge.search.executor import failed_record

    payload = json.loads(config[CONFIG_KEY])
    number, plan = payload["number"], Plan.from_dict(payload["plan"])
    started = time.monotonic()
    try:
        runner = _runner(worker)
    except Exception as exc:  # a task that cannot be rebuilt here fails the trial with the reason
        record = failed_record(number, payload["plan"], plan.describe(),
                               f"Ray worker could not build the task: {type(exc).__name__}: {exc}".splitlines()[0],
                               time.monotonic() - started)
    else:
        runner.history = [record_from_dict(r) for r in payload["history"]]
        record = runner.run(plan, number)
    m = record.measurements
    final_score = m.accuracy if m is not None else (record.epoch_scores[-1] if record.epoch_scores else math.nan)
    tune.report({"final": True, "record": json.dumps(record.to_dict()), "state": record.state,
                 "node": socket.gethostname(), "epoch": len(record.epoch_scores), EPOCH_METRIC: final_score,
                 "accuracy": m.accuracy if m else math.nan, "size_bytes": m.size_bytes if m else math.nan,
                 "latency_ms": m.latency_ms if m else math.nan})


# --- driver side ---------------------------------------------------------------------------------

def _history_for_workers(records: list[TrialRecord]) -> list[dict]:
    """What the early-stopping dominance rule reads: feasible complete trials, measurements only."""
    return [{"number": r.number, "state": r.state, "plan": {}, "plan_text": "", "feasible": True,
             "measurements": r.measurements.to_dict()}
            for r in records if r.state == COMPLETE and r.feasible and r.measurements is not None]


def _searcher_class():
    import optuna
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from slimforge.search import engine
    from slimforge.search.executor import failed_record
    from slimforge.search.space import OptunaSuggester

    class SlimforgeSearch(OptunaSearch):
        """``OptunaSearch`` over the search's own study, telling trials the slimforge way."""

        def __init__(self, ctx, progress: engine.Progress):
            self.ctx, self.progress = ctx, progress
            self.started = time.monotonic()
            self.running: dict[str, tuple[int, dict, str, float]] = {}  # ray id -> (number, plan, text, began)
            self.epoch_scores: dict[str, list[float]] = {}
            self.timed_out = False
            study = ctx.backend.study
            super().__init__(space=self._space, metric=list(METRICS), mode=list(MODES), sampler=study.sampler,
                             study_name=study.study_name, storage=study._storage)

        def _space(self, trial) -> dict[str, Any]:
            ctx = self.ctx
            plan = ctx.planner.sample(OptunaSuggester(trial), ctx.task, seed=ctx.settings.seed + trial.number)
            return {CONFIG_KEY: json.dumps({"number": trial.number, "plan": plan.to_dict()})}

        def suggest(self, trial_id: str):
            settings, study = self.ctx.settings, self.ctx.backend.study
            if settings.timeout_s is not None and time.monotonic() - self.started > settings.timeout_s:
                if not self.timed_out:
                    engine._log(f"timeout of {settings.timeout_s:g} s reached; no new trials are started")
                    self.timed_out = True
                return Searcher.FINISHED
            if engine._counted(study) >= settings.trials:
                return Searcher.FINISHED
            config = super().suggest(trial_id)
            trial = self._ot_trials[trial_id]
            if not engine.claim_trial(study, trial, settings.trials):
                return Searcher.FINISHED
            payload = json.loads(config[CONFIG_KEY])
            payload["history"] = _history_for_workers(self.ctx.runner.history)
            config[CONFIG_KEY] = json.dumps(payload)
            from slimforge.core.plan import Plan

            plan = Plan.from_dict(payload["plan"])
            self.ctx.plugins.trial_start(trial.number, plan)
            self.ctx.backend.started(trial, payload["plan"], plan.describe())  # a kill now still leaves the plan
            self.running[trial_id] = (trial.number, payload["plan"], plan.describe(), time.monotonic())
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if not result.get("final") and EPOCH_METRIC in result:
                self.epoch_scores.setdefault(trial_id, []).append(result[EPOCH_METRIC])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.running:
                return
            number, plan, plan_text, began = self.running.pop(trial_id)
            trial = self._ot_trials[trial_id]
            scores = self.epoch_scores.pop(trial_id, [])
            if result and result.get("final"):
                record = record_from_dict(json.loads(result["record"]))
                trial.set_user_attr(engine.WORKER_ATTR, result.get("node", "?"))
            elif error:
                record = failed_record(number, plan, plan_text, "the Ray trial raised or its worker process died "
                                       "(see the Ray logs)", time.monotonic() - began)
            else:
                # The result that made the scheduler stop the trial never reached on_trial_result.
                if result and EPOCH_METRIC in result and len(scores) < result.get("epoch", 0):
                    scores.append(result[EPOCH_METRIC])
                reason = (f"stopped by the ASHA scheduler after epoch {len(scores)}"
                          + (f": validation {scores[-1]:.4f} trailed other trials at that epoch" if scores else ""))
                record = TrialRecord(number=number, state=STOPPED, plan=plan, plan_text=plan_text,
                                     epoch_scores=scores, stopped_early=reason, duration_s=time.monotonic() - began)
            if record.state == STOPPED:
                # Optuna's word for a trial ended by a scheduler is PRUNED.  No measurements, so no
                # constraints either: the sampler learns nothing false from it.
                from slimforge.search.backends.optuna import RECORD_ATTR

                backend = self.ctx.backend
                backend.save_pending(trial, record)
                self.ctx.plugins.trial_end(record)
                trial.set_user_attr(RECORD_ATTR, json.dumps(record.to_dict()))  # now with the trackers' links
                backend.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                engine.finish_trial(self.ctx.backend, self.ctx.plugins, trial, record)
            self.progress.finished()

        # Ray checkpoints searchers by pickling them; the study in Optuna storage is this search's
        # durable state (resume with --study), and the context here does not pickle.
        def save(self, checkpoint_path: str) -> None:
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

    return SlimforgeSearch


def _init_ray(settings):
    """Connect to ``--ray-address`` / ``$RAY_ADDRESS``, else start a local Ray on every CPU.
    Returns True when this call started Ray (and should shut it down)."""
    ray = require_ray()
    if ray.is_initialized():  # the caller's own ray.init (e.g. with fewer CPUs): use it as it is
        return False
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        from slimforge.search.engine import RAY_CLIENT_REFUSED

        raise ConfigError(RAY_CLIENT_REFUSED.format(source="--ray-address" if settings.ray_address else "$RAY_ADDRESS"))
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                  configure_logging=True)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=os.cpu_count(), **common)
    return True


def run_trials(ctx) -> None:
    """The Ray Tune trial loop: ``engine.SearchContext`` in, records stored in ``ctx.backend``."""
    import dataclasses
    from pathlib import Path

    from slimforge.search import engine

    ray = require_ray()
    from ray import tune

    settings = ctx.settings
    done = engine._counted(ctx.backend.study)
    remaining = max(0, settings.trials - done)
    if done:
        engine._log(f"study {settings.study!r}: {done} trial(s) already recorded or running; {remaining} to go")
    if remaining == 0:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; our bar reports progress
    started_ray = _init_ray(settings)
    progress = engine.Progress(ctx, done)
    try:
        cluster = ray.cluster_resources()
        if settings.gpus_per_trial > 0 and cluster.get("GPU", 0) < settings.gpus_per_trial:
            raise ConfigError(f"--gpus-per-trial: {settings.gpus_per_trial:g} GPU(s) per trial, but the Ray cluster has "
                              f"{cluster.get('GPU', 0):g}")
        if cluster.get("CPU", 0) < settings.cpus_per_trial:
            raise ConfigError(f"--cpus-per-trial: {settings.cpus_per_trial:g} CPU(s) per trial, but the Ray cluster has "
                              f"{cluster.get('CPU', 0):g}")
        worker = {"task_source": ctx.task.source, "budgets": dataclasses.asdict(ctx.runner.budgets),
                  "artifact_dir": str(Path(ctx.runner.artifact_dir).resolve()), "device": settings.device,
                  "latency": dataclasses.asdict(settings.latency), "strict_plugins": settings.strict_plugins,
                  "disabled_plugins": list(settings.disabled_plugins),
                  "latency_lock": str(engine.latency_lock_path()), "cpus_per_trial": settings.cpus_per_trial,
                  "report_epochs": settings.scheduler == "asha"}
        scheduler = None
        if settings.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            from slimforge.search.planner import RECOVERY_EPOCHS

            # One result per recovery epoch plus the final one; never stop a trial for reaching
            # max_t (stop_last_trials=False): its final report carries the measurements.
            scheduler = ASHAScheduler(metric=EPOCH_METRIC, mode="max", time_attr="training_iteration",
                                      max_t=RECOVERY_EPOCHS[1] + 1, grace_period=1, reduction_factor=2,
                                      stop_last_trials=False)
        resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
        engine._log(f"Ray: {cluster.get('CPU', 0):g} CPU(s), {cluster.get('GPU', 0):g} GPU(s); "
                    f"{settings.cpus_per_trial:g} CPU / {settings.gpus_per_trial:g} GPU per trial"
                    + (", ASHA scheduler" if scheduler else ""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray's deprecation chatter would bury the progress bar
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(trainable, worker=worker), resources),
                tune_config=tune.TuneConfig(search_alg=_searcher_class()(ctx, progress), scheduler=scheduler,
                                            num_samples=remaining),
                run_config=tune.RunConfig(name=settings.study, storage_path=str((settings.out_dir / "ray").resolve()),
                                          verbose=0),
            )
            tuner.fit()
    finally:
        progress.close()
        if started_ray:
            ray.shutdown()
