"""Ray Tune backend: the same define-by-run space, objective, budgets and records as the Optuna
backend, with trials run as Ray Tune trials (a local Ray, or a cluster via ``--ray-address``).

How it maps onto Ray (checked against Ray 2.60's ``ray.tune.search.optuna.OptunaSearch``):

- **Space.**  ``OptunaSearch`` accepts a define-by-run function ``space(trial)`` that may return a
  dict of constants.  Ours calls ``planner.sample(OptunaSuggester(trial), ...)`` (the very call the
  Optuna backend makes) and returns the plan, JSON-encoded, as one constant.  The Optuna study
  behind the searcher is *our* study (same storage, same TPE sampler), so the records land where
  the Optuna backend puts them and everything after the trial loop is shared
  (``search.engine``).  The searcher is a thin adapter over ``loop.TrialLoop``: its ``suggest`` is
  the loop's ``start``, its ``on_trial_complete`` the loop's ``finish``.
- **Objectives and constraints.**  ``OptunaSearch`` takes ``metric=[...]``/``mode=[...]`` for
  multi-objective studies, but has no way to pass constraints: its ``on_trial_complete`` only
  calls ``study.tell(values)``.  We override ``on_trial_complete`` to tell the trial through
  ``OptunaBackend.tell``: the record is stored on the trial and the budget violations reach TPE
  as the trial's constraints exactly as with the Optuna backend.  Nothing is folded into the
  objective values.
- **Cluster.**  ``--ray-address auto`` (or ``host:6379``) from a node of the cluster.  Ray Client
  (``ray://``) is refused: through it Tune runs the search loop on the head node, away from this
  process's study, trackers and progress bar.  ``connect`` joins the cluster before anything is
  written (no baseline, study or MLflow run yet): it probes the head's GCS itself, so a cluster
  that is not there, or that refuses this process's token, is one line naming the cause and the
  fix within seconds, where ``ray.init`` retries for ~20 s and then raises a bare
  ``ConnectionError``.  Token authentication is Ray's own: ``RAY_AUTH_MODE=token`` and the
  cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) in the
  environment of every ``ray start`` and of the driver; Ray workers inherit it from their node.
- **No shared filesystem.**  A trial writes its artifact to a directory local to its Ray worker,
  sends the bytes through Ray's object store to an ``ArtifactInbox`` actor pinned to the driver's
  node, which writes them into the search's artifact folder, and deletes its local copy.  The
  record that comes back (through Tune's result) names the driver-side path, and the Ray node it
  ran on (``links["ray_node_id"]``, ``links["ray_node_ip"]``).  The driver never reads a path
  written on another node.
- **Trainable.**  A function trainable builds its runner from the search's ``WorkerSpec`` (the
  task rebuilt from ``Task.source``) once per Ray worker process, runs the plan and reports the
  record.  Resources per trial: ``--cpus-per-trial``,
  ``--gpus-per-trial`` (fractions allowed).
- **ASHA** (``--scheduler asha``, optional).  The trial reports its validation score after every
  recovery epoch; ASHA stops trials whose score trails the others at the same epoch.  A stopped
  trial has no artifact and no measurements: it is recorded with state ``stopped`` (and told to
  Optuna as PRUNED), never counted as complete or failed.  ASHA ranks by accuracy alone, so it can
  stop a small, less accurate plan that the Pareto front would have kept: it trades front quality
  for throughput.

Latency stays honest under concurrency: every trial times under a per-host file lock
(``core.measure.latency_lock_path``), so two trials on one host never time at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from slimforge.core.errors import ConfigError, MissingDependencyError
from slimforge.core.plan import Plan
from slimforge.search.loop import TrialLoop
from slimforge.search.records import COMPLETE, STOPPED, TrialRecord, failed_record, record_from_dict
from slimforge.search.settings import RAY_CLIENT_REFUSED
from slimforge.search.study import WORKER_ATTR, log
from slimforge.search.workers import WorkerSpec

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
        # Artifacts are written here, on this worker's node, and shipped to the driver's inbox: the
        # search's artifact folder is a path on the driver's node, which this node may not have.
        local_dir = tempfile.TemporaryDirectory(prefix="slimforge-ray-trials-")  # removed with the runner
        spec = dataclasses.replace(WorkerSpec.from_dict(worker["spec"]), artifact_dir=local_dir.name)
        runner = spec.build_runner(runner_class=_make_runner_class())
        runner.local_dir = local_dir
        runner.report_epochs = worker["report_epochs"]
        _RUNNERS.clear()  # a reused process serves one search at a time
        _RUNNERS[key] = runner
    return _RUNNERS[key]


def _ship_artifact(record: TrialRecord, inbox) -> None:
    """Send the trial's artifact to the driver's inbox; the record then names the driver's copy,
    and the local file is gone (nothing on this node is left for anyone to read)."""
    import ray

    if not record.artifact_path:
        return
    local = Path(record.artifact_path)
    try:
        record.artifact_path = ray.get(inbox.put.remote(local.name, local.read_bytes()))
    finally:
        local.unlink(missing_ok=True)


def trainable(config: dict[str, Any], worker: dict[str, Any], inbox=None) -> None:
    """One Ray Tune trial: the plan from the searcher, run by this worker's ``TrialRunner``; its
    artifact goes to the driver through ``inbox`` (an ``ArtifactInbox`` actor)."""
    import ray
    from ray import tune

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
        _ship_artifact(record, inbox)
    context = ray.get_runtime_context()
    record.links.update(ray_node_id=context.get_node_id(), ray_node_ip=ray.util.get_node_ip_address())
    m = record.measurements
    final_score = m.accuracy if m is not None else (record.epoch_scores[-1] if record.epoch_scores else math.nan)
    tune.report({"final": True, "record": json.dumps(record.to_dict()), "state": record.state,
                 "node": socket.gethostname(), "epoch": len(record.epoch_scores), EPOCH_METRIC: final_score,
                 "accuracy": m.accuracy if m else math.nan, "size_bytes": m.size_bytes if m else math.nan,
                 "latency_ms": m.latency_ms if m else math.nan})


# --- driver side ---------------------------------------------------------------------------------

class ArtifactInbox:
    """Runs as a Ray actor on the driver's node (``num_cpus=0``: it takes no trial's slot) and
    writes the artifact bytes that trials send into the search's artifact folder there."""

    def __init__(self, artifact_dir: str):
        self.artifact_dir = Path(artifact_dir)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> str:
        path = self.artifact_dir / Path(name).name  # a bare file name: nothing is written elsewhere
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        partial.replace(path)  # atomic: the driver never sees half a file
        return str(path)


def _start_inbox(ray, artifact_dir: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ArtifactInbox).options(scheduling_strategy=here).remote(artifact_dir)


def _history_for_workers(records: list[TrialRecord]) -> list[dict]:
    """What the early-stopping dominance rule reads: feasible complete trials, measurements only."""
    return [{"number": r.number, "state": r.state, "plan": {}, "plan_text": "", "feasible": True,
             "measurements": r.measurements.to_dict()}
            for r in records if r.state == COMPLETE and r.feasible and r.measurements is not None]


def _searcher_class():
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class SlimforgeSearch(OptunaSearch):
        """``OptunaSearch`` over the search's own study; starting and finishing a trial is the
        trial loop's (``TrialLoop.start`` / ``finish``), as for every backend."""

        def __init__(self, loop: TrialLoop):
            self.loop = loop
            self.running: dict[str, Any] = {}  # ray id -> loop.StartedTrial
            self.epoch_scores: dict[str, list[float]] = {}
            study = loop.ctx.backend.study
            super().__init__(space=self._space, metric=list(METRICS), mode=list(MODES), sampler=study.sampler,
                             study_name=study.study_name, storage=study._storage)

        def _space(self, trial) -> dict[str, Any]:
            plan = self.loop.plan_for(trial)
            return {CONFIG_KEY: json.dumps({"number": trial.number, "plan": plan.to_dict()})}

        def suggest(self, trial_id: str):
            asked = time.monotonic()
            if not self.loop.may_start():
                return Searcher.FINISHED
            config = super().suggest(trial_id)
            payload = json.loads(config[CONFIG_KEY])
            started = self.loop.start(trial=self._ot_trials[trial_id], plan=Plan.from_dict(payload["plan"]),
                                      asked=asked)
            if started is None:
                return Searcher.FINISHED
            payload["history"] = _history_for_workers(self.loop.ctx.runner.history)
            config[CONFIG_KEY] = json.dumps(payload)
            self.running[trial_id] = started
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if not result.get("final") and EPOCH_METRIC in result:
                self.epoch_scores.setdefault(trial_id, []).append(result[EPOCH_METRIC])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.running:
                return
            started = self.running.pop(trial_id)
            scores = self.epoch_scores.pop(trial_id, [])
            record, failure = None, None
            if result and result.get("final"):
                record = record_from_dict(json.loads(result["record"]))
                started.trial.set_user_attr(WORKER_ATTR, result.get("node", "?"))
            elif error:
                failure = "the Ray trial raised or its worker process died (see the Ray logs)"
            else:
                # The result that made the scheduler stop the trial never reached on_trial_result.
                if result and EPOCH_METRIC in result and len(scores) < result.get("epoch", 0):
                    scores.append(result[EPOCH_METRIC])
                reason = (f"stopped by the ASHA scheduler after epoch {len(scores)}"
                          + (f": validation {scores[-1]:.4f} trailed other trials at that epoch" if scores else ""))
                record = TrialRecord(number=started.number, state=STOPPED, plan=started.plan.to_dict(),
                                     plan_text=started.plan.describe(), epoch_scores=scores, stopped_early=reason,
                                     duration_s=time.monotonic() - started.asked)
            self.loop.finish(started, record, failure)

        # Ray checkpoints searchers by pickling them; the study in Optuna storage is this search's
        # durable state (resume with --study), and the loop here does not pickle.
        def save(self, checkpoint_path: str) -> None:
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

        def __getstate__(self):
            # Tune also pickles the searcher into OUT/ray/<study>/tuner.pkl for Tuner.restore; the
            # loop behind it (storage connections, trackers, the terminal stream) need not pickle,
            # and under a captured stream (pytest) cannot.
            return {}

    return SlimforgeSearch


_JOINED: list[bool] = []  # [True] once ``connect`` started or joined a Ray that ``run_trials`` shuts down

GCS_PROBE_TIMEOUT_S = 3  # a listening head answers in milliseconds
TOKEN_FIX = ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
             "~/.ray/auth_token; `ray get-auth-token` on the head prints it) in this shell")


def connect(settings) -> None:
    """Join ``--ray-address`` / ``$RAY_ADDRESS`` (after ``probe_cluster``), else start a local Ray
    on every CPU; a Ray the caller started with ``ray.init`` is used as it is.  Called before the
    search writes anything, so a cluster that cannot be joined leaves nothing behind."""
    ray = require_ray()
    if ray.is_initialized():  # the caller's own ray.init (e.g. with fewer CPUs): use it as it is
        return
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    source = "--ray-address" if settings.ray_address else "$RAY_ADDRESS"
    if address and address.startswith("ray://"):
        raise ConfigError(RAY_CLIENT_REFUSED.format(source=source))
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                  configure_logging=True)
    if address:
        ray.init(address=probe_cluster(address, source), **common)
    else:
        ray.init(num_cpus=os.cpu_count(), **common)
    _JOINED[:] = [True]


def _token_here() -> bool:
    """Whether Ray would find a token in this process (its order: ``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``); an unreadable or empty file counts as none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def probe_cluster(address: str, source: str) -> str:
    """The head's ``host:port`` for ``address`` once its GCS has answered this process, or a
    one-line ``ConfigError`` naming why not (no cluster, nothing listening, token missing or
    refused) and the fix."""
    from ray._private.services import canonicalize_bootstrap_address
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"{source} {address}: no Ray cluster to join ({(str(exc).splitlines() or [''])[0]}); "
                          "start one with `ray start --head` or give the head's HOST:6379") from None
    if resolved is None:
        raise ConfigError(f"{source} {address}: no Ray cluster to join; start one with `ray start --head`")
    if os.environ.get("RAY_AUTH_MODE") == "token" and not _token_here():  # Ray's client would abort the process
        raise ConfigError(f"{source} {address}: RAY_AUTH_MODE=token but this process has no token: {TOKEN_FIX}")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=GCS_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{source} {address}: nothing is listening at {resolved} ({exc.strerror or exc}); start the "
                          f"head there with `ray start --head --port {port}` or give the head's HOST:PORT") from None
    try:
        GcsClient(address=resolved).internal_kv_get(b"session_name", namespace=b"session",
                                                    timeout=GCS_PROBE_TIMEOUT_S)
    except AuthenticationError as exc:
        cause = ("refused this process's token (not the cluster's)" if os.environ.get("RAY_AUTH_MODE") == "token"
                 else "requires token authentication and RAY_AUTH_MODE is not 'token' here")
        raise ConfigError(f"{source} {address}: the Ray cluster at {resolved} {cause}: {TOKEN_FIX}") from exc
    except Exception as exc:  # noqa: BLE001 - a GCS that does not answer in time
        raise ConfigError(f"{source} {address}: the Ray head at {resolved} did not answer "
                          f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}); "
                          "check `ray status` on the head") from None
    return resolved


def run_trials(ctx, spec: WorkerSpec) -> None:
    """This search's trials as Ray Tune trials: ``loop.SearchContext`` in, records stored in
    ``ctx.backend``; ``spec`` is what each Ray worker builds its runner from."""
    ray = require_ray()
    from ray import tune

    settings = ctx.settings
    import optuna

    loop = TrialLoop(ctx)
    # Queued trials (expert seeds) already count toward the total, and Tune's asks take them first.
    queued = len(ctx.backend.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    remaining = loop.remaining() + queued
    if remaining == 0:
        loop.close()
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; our bar reports progress
    connect(settings)  # run_search has already joined; this covers callers that have not
    inbox = None
    try:
        cluster = ray.cluster_resources()
        if settings.gpus_per_trial > 0 and cluster.get("GPU", 0) < settings.gpus_per_trial:
            raise ConfigError(f"--gpus-per-trial: {settings.gpus_per_trial:g} GPU(s) per trial, but the Ray cluster has "
                              f"{cluster.get('GPU', 0):g}")
        if cluster.get("CPU", 0) < settings.cpus_per_trial:
            raise ConfigError(f"--cpus-per-trial: {settings.cpus_per_trial:g} CPU(s) per trial, but the Ray cluster has "
                              f"{cluster.get('CPU', 0):g}")
        # Threads as granted: N trials on N cores with default threads slow training many times over.
        spec = dataclasses.replace(spec, torch_threads=max(1, int(settings.cpus_per_trial)))
        worker = {"spec": spec.to_dict(), "report_epochs": settings.scheduler == "asha"}
        inbox = _start_inbox(ray, spec.artifact_dir)
        scheduler = None
        if settings.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            from slimforge.core.planner import RECOVERY_EPOCHS

            # One result per recovery epoch plus the final one; never stop a trial for reaching
            # max_t (stop_last_trials=False): its final report carries the measurements.
            scheduler = ASHAScheduler(metric=EPOCH_METRIC, mode="max", time_attr="training_iteration",
                                      max_t=RECOVERY_EPOCHS[1] + 1, grace_period=1, reduction_factor=2,
                                      stop_last_trials=False)
        resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
        log(f"Ray: {cluster.get('CPU', 0):g} CPU(s), {cluster.get('GPU', 0):g} GPU(s); "
            f"{settings.cpus_per_trial:g} CPU / {settings.gpus_per_trial:g} GPU per trial"
            + (", ASHA scheduler" if scheduler else ""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray's deprecation chatter would bury the progress bar
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(trainable, worker=worker, inbox=inbox), resources),
                tune_config=tune.TuneConfig(search_alg=_searcher_class()(loop), scheduler=scheduler,
                                            num_samples=remaining),
                run_config=tune.RunConfig(name=settings.study, storage_path=str((settings.out_dir / "ray").resolve()),
                                          verbose=0),
            )
            tuner.fit()
    finally:
        loop.close()
        if inbox is not None:
            ray.kill(inbox)
        if _JOINED:
            _JOINED.clear()
            ray.shutdown()
