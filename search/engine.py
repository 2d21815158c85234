"""``run_search``: the Python API the CLI is a thin layer over.

Task + budgets + settings in, ``SearchResult`` out.  Selection uses the validation split only;
the test split is touched once, to report the final Pareto members next to the baseline.

Backends differ only in how trials are run (``_run_trials`` here for Optuna, in this process or
in worker processes; ``backends.ray.run_trials`` for Ray Tune).  Both keep the study in Optuna
storage, with every ``TrialRecord`` stored on its trial, so everything after the trial loop
(Pareto, test split, reports, MLflow) is shared and the two backends' results compare directly.

The study also stores the search's settings (``SETTINGS_ATTR``): ``slimforge worker`` reads them
to join a running search from another process or host (``run_worker``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from slimforge.core.compressed import save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, Measurements
from slimforge.core.plan import Plan
from slimforge.core.task import Task
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.pareto import pareto_front, registration_floor
from slimforge.search.planner import Planner
from slimforge.search.executor import failed_record
from slimforge.search.records import COMPLETE, FAILED, REJECTED, SearchResult, TrialRecord, record_from_dict

DEVICES = ("cpu", "cuda")
BACKENDS = ("optuna", "ray")
SCHEDULERS = ("fifo", "asha")
SETTINGS_ATTR = "slimforge_settings"  # study user attr: what `slimforge worker` needs to join
WORKER_ATTR = "slimforge_worker"  # trial user attr: host:pid of the process that ran it
SURPLUS_ATTR = "slimforge_surplus"  # trial user attr: asked past the study's total, never run
# Hypervolume of the feasible front over normalised objectives (all minimised):
# (1 - accuracy, size / baseline size, latency / baseline latency), reference point 1.1 in each.
HYPERVOLUME_REFERENCE = 1.1
HYPERVOLUME_DEFINITION = ("hypervolume of feasible complete trials over (1 - accuracy, size_bytes / baseline "
                          "size_bytes, latency_ms / baseline latency_ms), all minimised, reference point "
                          f"({HYPERVOLUME_REFERENCE}, {HYPERVOLUME_REFERENCE}, {HYPERVOLUME_REFERENCE}); "
                          f"the largest possible value is {HYPERVOLUME_REFERENCE ** 3:.3f}")


# Through Ray Client, Tune would run the searcher on the head node, away from this search's study,
# trackers and progress bar; a search joins the cluster from one of its nodes instead.
RAY_CLIENT_REFUSED = ("{source}: Ray Client addresses (ray://...) are not supported: Tune would run the search "
                      "loop on the head node. Run slimforge search on a node of the cluster with --ray-address auto "
                      "(or the head's host:6379)")


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How to search.  Defaults live here and nowhere else."""

    trials: int = 20  # total trials in the study; a resumed study runs only the missing ones
    timeout_s: float | None = None  # stop starting new trials after this many seconds
    seed: int = 0
    study: str | None = None  # None: a fresh, timestamped study; a name resumes that study
    storage: str | None = None  # Optuna RDB URL; None: sqlite file in out_dir
    out_dir: Path = Path("slimforge-out")
    techniques: tuple[str, ...] | None = None  # None: every registered technique
    disabled_plugins: tuple[str, ...] = ()  # entry-point plugin or technique names to leave out
    strict_plugins: bool = False  # a third-party plugin that fails to load is fatal, not skipped
    device: str = "cpu"
    latency: LatencySettings = field(default_factory=LatencySettings)
    tracking_uri: str | None = None  # None: sqlite:///mlflow.db in the working directory
    tracking: bool = True
    experiment: str = "slimforge"
    registered_model: str | None = None  # None: "<task>-compressed"
    progress: bool = True
    sampler: str = "tpe"  # Optuna sampler: tpe (multivariate TPE with constraints) or random
    workers: int = 1  # trials at once, each in its own worker process when > 1
    trial_timeout_s: float | None = None  # kill a trial (its worker process) after this many seconds
    trial_memory_limit: int | None = None  # bytes of extra address space a worker may use
    backend: str = "optuna"  # optuna: trials here or in worker processes; ray: Ray Tune trials
    ray_address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray on every CPU
    cpus_per_trial: float = 1.0  # Ray resources per trial (fractions allowed)
    gpus_per_trial: float = 0.0
    scheduler: str = "fifo"  # ray only: fifo runs every trial to the end; asha stops weak ones per epoch
    # Pareto members below a registration floor are reported, not registered.  Both None: the
    # default floor (``search.pareto.registration_floor``); with both set the stricter wins.
    register_min_accuracy: float | None = None  # a fraction, e.g. 0.9
    register_max_accuracy_drop: float | None = None  # from the baseline's validation metric, e.g. 0.1 (10 pt)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"--trials: must be >= 1, got {self.trials}")
        if self.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {self.workers}")
        if self.trial_timeout_s is not None and self.trial_timeout_s <= 0:
            raise ConfigError(f"--trial-timeout: must be > 0 seconds, got {self.trial_timeout_s}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"--timeout: must be > 0 seconds, got {self.timeout_s}")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"--device: unknown {self.device!r}; valid choices: {', '.join(DEVICES)}")
        if self.latency.cuda_graph and not self.device.startswith("cuda"):
            raise ConfigError("--latency-cuda-graph: CUDA graphs need --device cuda")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend: unknown {self.backend!r}; valid choices: {', '.join(BACKENDS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler: unknown {self.scheduler!r}; valid choices: {', '.join(SCHEDULERS)}")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"--cpus-per-trial: must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial: must be >= 0, got {self.gpus_per_trial}")
        for name, value in (("--register-min-accuracy", self.register_min_accuracy),
                            ("--register-max-accuracy-drop", self.register_max_accuracy_drop)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}: must be a fraction between 0 and 1, got {value}")
        if self.backend != "ray":
            for name, value, default in (("--ray-address", self.ray_address, None), ("--scheduler", self.scheduler, "fifo"),
                                         ("--cpus-per-trial", self.cpus_per_trial, 1.0),
                                         ("--gpus-per-trial", self.gpus_per_trial, 0.0)):
                if value != default:
                    raise ConfigError(f"{name}: only applies to --backend ray (this search uses --backend {self.backend})")
        else:
            if self.workers != 1:
                raise ConfigError("--workers: not used with --backend ray, which runs as many trials at once as the "
                                  "cluster's resources allow; set --cpus-per-trial / --gpus-per-trial instead")
            for name, value in (("--trial-timeout", self.trial_timeout_s), ("--trial-memory-limit", self.trial_memory_limit)):
                if value is not None:
                    raise ConfigError(f"{name}: not supported with --backend ray (Ray's memory monitor kills trials "
                                      "that exhaust memory); use --backend optuna")
            if self.ray_address and self.ray_address.startswith("ray://"):
                raise ConfigError(RAY_CLIENT_REFUSED.format(source="--ray-address"))
            if self.gpus_per_trial > 0 and not self.device.startswith("cuda"):
                raise ConfigError("--gpus-per-trial: GPUs are only used with --device cuda")
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    def resolved(self, task: Task) -> SearchSettings:
        study = self.study or f"{task.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        storage = self.storage or f"sqlite:///{(self.out_dir / 'optuna.db').resolve()}"
        tracking_uri = self.tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
        return dataclasses.replace(self, study=study, storage=storage, tracking_uri=tracking_uri,
                                   registered_model=self.registered_model or f"{task.name}-compressed")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSettings:
        """Inverse of ``to_dict`` (settings stored in a study travel as JSON); unknown keys, from
        a newer slimforge, are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["latency"] = LatencySettings(**kwargs.get("latency", {}))
        for key in ("techniques", "disabled_plugins"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@dataclass
class SearchContext:
    """What a backend's trial loop needs; everything after the loop is shared."""

    backend: Any  # OptunaBackend: the study, where every record is stored
    planner: Planner
    runner: TrialRunner
    plugins: Plugins
    task: Task
    settings: SearchSettings  # resolved
    baseline: Measurements
    # Per trial run by this process's loop: wall seconds from asking the backend for it to its
    # record being stored.  Minus the trial's own duration_s, that is the loop's overhead.
    loop_seconds: dict[int, float] = field(default_factory=dict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def latency_lock_path() -> Path:
    """One lock file per user and host: latency is never timed while another slimforge process of
    this user on this host (a worker process, a Ray trial, ``slimforge worker``) is timing.  Local
    on purpose: trials on other hosts do not disturb timing here, and flock over NFS is unreliable."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"slimforge-latency-{uid}.lock"


def _make_planner(plugins: Plugins, settings: SearchSettings) -> Planner:
    available = {"teacher", "training_data", "calibration_data"} | ({"gpu"} if settings.device.startswith("cuda") else set())
    return Planner(plugins.registry, settings.techniques, available=available)


def _check_device(settings: SearchSettings) -> None:
    if settings.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device: 'cuda' requested but torch sees no CUDA device; valid here: cpu")


def _measure_baseline(runner: TrialRunner, path: Path, task: Task, split: str) -> Measurements:
    """The uncompressed model on ``split``.  It is the user's own model, data and metric, so a
    failure here is bad input (wrong shapes, a metric that raises), reported on one line before any
    trial runs; a trial failing the same way would only be recorded as failed, over and over."""
    from slimforge.core.errors import SlimforgeError, TaskError

    try:
        return runner.measure(path, split)
    except SlimforgeError:
        raise
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise TaskError(f"task {task.name!r}: the uncompressed model fails on its own {split!r} data and metric: "
                        f"{type(exc).__name__}: {detail}") from exc


def run_search(task: Task, budgets: Budgets, settings: SearchSettings = SearchSettings(),
               plugins: Plugins | None = None) -> SearchResult:
    from slimforge.search.backends.optuna import OptunaBackend

    run_trials = _run_trials
    if settings.backend == "ray":
        from slimforge.search.backends import ray as ray_backend

        ray_backend.require_ray()  # fail in a second, not after the baseline is measured
        ray_backend.check_task(task)
        run_trials = ray_backend.run_trials
    _check_device(settings)  # the baseline is measured here, on the target device
    plugins = plugins or Plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    settings = settings.resolved(task)
    planner = _make_planner(plugins, settings)
    artifact_dir = (settings.out_dir / "artifacts" / settings.study).resolve()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    runner = TrialRunner(task=task, plugins=plugins, budgets=budgets, artifact_dir=artifact_dir,
                         device=settings.device, latency=settings.latency, latency_lock=latency_lock_path())

    teacher_device = "cpu"
    baseline_path = settings.out_dir / "baseline.slim"
    save_model(task.teacher.to(teacher_device), baseline_path, task=task, plan=Plan())
    baseline, baseline_test = _measure_baseline(runner, baseline_path, task, "val"), _measure_baseline(runner, baseline_path, task, "test")
    budgets = runner.budgets = budgets.resolve(baseline.accuracy)
    _log(f"baseline (uncompressed): {task.metric_name} {baseline.accuracy:.4f} val / {baseline_test.accuracy:.4f} test, "
         f"{baseline.size_bytes / 1000:.1f} KB, {baseline.latency_ms:.3f} ms; budgets: {budgets.describe()}")

    tracker = None
    if settings.tracking:
        from slimforge.tracking.mlflow import MlflowTracker
        tracker = MlflowTracker(tracking_uri=settings.tracking_uri, experiment=settings.experiment,
                                registered_model=settings.registered_model)
        plugins.register(tracker, name="slimforge.tracking.mlflow")
    search_started = False
    try:
        # Trials a killed search left RUNNING are closed below, once the trackers have started.
        backend = OptunaBackend(storage=settings.storage, study_name=settings.study, seed=settings.seed, budgets=budgets,
                                close_interrupted=False, sampler_name=settings.sampler)
        plugins.configure(settings.to_dict())
        plugins.search_start(settings=settings.to_dict() | {"budgets": budgets.to_dict()}, task=task, baseline=baseline)
        search_started = True
        _close_interrupted(backend, plugins)
        _log_removed(remove_orphaned_files(backend, artifact_dir), artifact_dir)
        # Only now may `slimforge worker`s join: a worker's RUNNING trial is not an interrupted one.
        _store_settings(backend, task, runner, settings, baseline)
        runner.history.extend(record_from_dict(r) for r in backend.records())
        ctx = SearchContext(backend=backend, planner=planner, runner=runner, plugins=plugins, task=task,
                            settings=settings, baseline=baseline)
        run_trials(ctx)
        _wait_for_other_workers(backend)
        records = [record_from_dict(r) for r in backend.records()]
        if tracker is not None:
            _adopt_untracked(records, plugins)
        pareto = pareto_front(records)
        floor = registration_floor(baseline.accuracy, min_accuracy=settings.register_min_accuracy,
                                   max_accuracy_drop=settings.register_max_accuracy_drop,
                                   budget_min_accuracy=budgets.min_accuracy)
        for member in pareto:  # the only place the test split is used
            member.test_measurements = runner.measure(member.artifact_path, "test")
            member.not_registered = floor.why_not_registered(member)
        result = SearchResult(study_name=settings.study, task=task.name, budgets=budgets.to_dict(),
                              baseline=baseline, baseline_test=baseline_test, trials=records, pareto=pareto,
                              settings=settings.to_dict(), metric=task.metric_name, loop_seconds=ctx.loop_seconds,
                              registration_floor=floor.to_dict())
        write_reports(result, settings.out_dir)  # before search_end: trackers attach these files
        plugins.search_end(result)
    except BaseException as exc:  # Ctrl-C included: the tracker ends its parent run KILLED, not RUNNING forever
        if search_started:
            plugins.search_stopped(exc)
        raise
    finally:
        if tracker is not None:
            plugins.unregister(tracker)
    write_summary(result, settings.out_dir / "summary.json")  # again, now with registry links
    return result


# --- the study as shared state ------------------------------------------------------------------

def _store_settings(backend, task: Task, runner: TrialRunner, settings: SearchSettings, baseline: Measurements) -> None:
    """Everything ``slimforge worker`` needs to run this search's trials elsewhere.  Rewritten on
    every (resumed) run, so workers see the latest total and budgets."""
    backend.study.set_user_attr(SETTINGS_ATTR, {
        "version": 1,
        "settings": settings.to_dict(),
        "task_source": task.source,
        "task_name": task.name,
        "budgets": dataclasses.asdict(runner.budgets),  # resolved: workers need no baseline
        "artifact_dir": str(runner.artifact_dir),
        "baseline": baseline.to_dict(),
    })


def _counted(study) -> int:
    """Trials that count toward the study's total: all but surplus asks."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR))


def claim_trial(study, trial, total: int) -> bool:
    """Keep ``trial`` (just asked) only if it is within the study's ``total``.

    Several processes may share a study (``slimforge worker``); two can see room for one more
    trial and both ask.  The storage numbers trials atomically, so the trial whose rank among the
    counted trials exceeds the total is surplus: it is closed as FAIL, tagged, never run and never
    counted.  Every process reaches the same verdict, so the study ends with exactly ``total``."""
    import optuna

    below = sum(1 for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and not t.user_attrs.get(SURPLUS_ATTR))
    if below >= total:
        trial.set_user_attr(SURPLUS_ATTR, True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    return True


def _wait_for_other_workers(backend) -> None:
    """Trials that other processes (``slimforge worker``) are still running belong in this
    search's result: wait for them.  Ctrl-C stops waiting; they stay in the study either way."""
    import optuna

    def running():
        return backend.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    if not running():
        return
    _log(f"waiting for {len(running())} trial(s) still running in other workers (Ctrl-C stops waiting; their "
         "results are recorded in the study when they finish)")
    try:
        while running():
            time.sleep(1.0)
    except KeyboardInterrupt:
        _log("stopped waiting; the summary leaves out the trials still running")


def _adopt_untracked(records: list[TrialRecord], plugins: Plugins) -> None:
    """Trials run by other processes (``slimforge worker``, which has no tracker) reach the
    trackers here, so every trial of the search has its nested MLflow run and Pareto members can
    be registered.  The tracker keys runs by study and trial, so a resumed search that adopts
    them again reuses their runs."""
    for record in records:
        if not any(key.startswith("mlflow") for key in record.links):
            plugins.trial_end(record)


# --- progress and the search budget summary ----------------------------------------------------

def feasible_hypervolume(records: list[TrialRecord], baseline: Measurements) -> float | None:
    """``HYPERVOLUME_DEFINITION``; None where Optuna's hypervolume routine is unavailable.

    Normalising by the uncompressed baseline makes the three axes commensurable and the value
    comparable across searches of the same task; points outside the reference box add nothing."""
    try:  # Optuna's WFG implementation; private module, stable since Optuna 4.
        import numpy as np
        from optuna._hypervolume import compute_hypervolume
    except ImportError:
        return None
    reference = HYPERVOLUME_REFERENCE
    points = []
    for record in records:
        m = record.measurements
        if record.state != COMPLETE or not record.feasible or m is None:
            continue
        point = (1.0 - m.accuracy, m.size_bytes / max(baseline.size_bytes, 1),
                 m.latency_ms / max(baseline.latency_ms, 1e-12))
        if all(v <= reference for v in point):
            points.append(point)
    if not points:
        return 0.0
    return float(compute_hypervolume(np.asarray(points, dtype=float), np.full(3, reference)))


def search_summary(records: list[TrialRecord], baseline: Measurements) -> dict[str, Any]:
    """Trials done, failed, rejected before training, stopped by a scheduler, feasible, and the
    hypervolume of the feasible front: what the progress bar, the printed summary and
    ``summary.json`` (``search_summary``) report."""
    states = [r.state for r in records]
    return {
        "trials_done": len(records),
        "complete": states.count(COMPLETE),
        "failed": states.count(FAILED),
        "rejected_before_training": states.count(REJECTED),
        "stopped_by_scheduler": sum(s not in (COMPLETE, FAILED, REJECTED) for s in states),
        "feasible": sum(r.feasible for r in records),
        "hypervolume": feasible_hypervolume(records, baseline),
        "hypervolume_definition": HYPERVOLUME_DEFINITION,
    }


class Progress:
    """The progress bar: its position and postfix come from the study, so trials finished by
    other workers count too."""

    def __init__(self, ctx: SearchContext, done: int):
        from tqdm.auto import tqdm

        self.ctx = ctx
        self.bar = tqdm(total=ctx.settings.trials, initial=done, desc="trials", unit="trial", file=sys.stderr,
                        disable=not ctx.settings.progress, dynamic_ncols=True)

    def finished(self) -> None:
        """Call after a record is stored; also refreshes the runner's history (early stopping)."""
        records = [record_from_dict(r) for r in self.ctx.backend.records()]
        self.ctx.runner.history = records
        self.bar.n = min(len(records), self.bar.total)
        self.bar.set_postfix_str(_progress_text(records, self.ctx.baseline))  # also redraws

    def close(self) -> None:
        self.bar.close()


def _progress_text(records: list[TrialRecord], baseline: Measurements) -> str:
    s = search_summary(records, baseline)
    text = f"done {s['trials_done']}, failed {s['failed']}, rejected {s['rejected_before_training']}"
    if s["stopped_by_scheduler"]:
        text += f", stopped {s['stopped_by_scheduler']}"
    if s["hypervolume"] is not None:
        text += f" | HV {s['hypervolume']:.4f}"
    feasible = [r for r in records if r.feasible and r.measurements is not None]
    if feasible:
        m = max(feasible, key=lambda r: r.measurements.accuracy).measurements
        text += f" | best feasible: acc {m.accuracy:.4f}, {m.size_bytes / 1000:.1f} KB, {m.latency_ms:.3f} ms"
    return text


# --- the Optuna trial loop ---------------------------------------------------------------------

def _run_trials(ctx: SearchContext) -> None:
    """Ask the backend for trials, run them (here or in worker processes), tell the results.

    Launches while the study holds fewer than ``settings.trials`` trials, counting those other
    processes (``slimforge worker``) have asked, so the total holds however many join."""
    from slimforge.search.space import OptunaSuggester

    backend, planner, runner, plugins, task, settings = (ctx.backend, ctx.planner, ctx.runner, ctx.plugins,
                                                         ctx.task, ctx.settings)
    done = _counted(backend.study)
    if done:
        _log(f"study {settings.study!r}: {done} trial(s) already recorded or running; "
             f"{max(0, settings.trials - done)} to go")
    pool = _make_pool(task, runner, settings) if done < settings.trials else None
    started, stop_launching = time.monotonic(), False
    running: dict[int, tuple[object, dict, str, float]] = {}  # number -> (trial, plan, text, started)

    def launch():
        asked = time.monotonic()
        if _counted(backend.study) >= settings.trials:
            return None
        trial = backend.ask()
        if not claim_trial(backend.study, trial, settings.trials):
            return None
        plan = planner.sample(OptunaSuggester(trial), task, seed=settings.seed + trial.number)
        backend.started(trial, plan.to_dict(), plan.describe())  # a kill now still leaves the plan
        plugins.trial_start(trial.number, plan)
        running[trial.number] = (trial, plan.to_dict(), plan.describe(), asked)
        return trial, plan

    progress = Progress(ctx, done)
    try:
        while True:
            if (not stop_launching and settings.timeout_s is not None
                    and time.monotonic() - started > settings.timeout_s):
                _log(f"timeout of {settings.timeout_s:g} s reached; no new trials are started")
                stop_launching = True
            if pool is None:
                launched = None if stop_launching else launch()
                if launched is None:
                    break
                trial, plan = launched
                finished = [(trial.number, runner.run(plan, trial.number), None)]
            else:
                while not stop_launching and pool.idle():
                    launched = launch()
                    if launched is None:
                        stop_launching = True
                        break
                    trial, plan = launched
                    pool.submit(trial.number, plan.to_dict(), trial.number, [r.to_dict() for r in runner.history])
                if not running:
                    break
                finished = pool.poll()
            for number, record, failure in finished:
                trial, plan_dict, plan_text, began = running.pop(number)
                if record is None:
                    record = failed_record(number, plan_dict, plan_text, failure, time.monotonic() - began)
                finish_trial(backend, plugins, trial, record)
                progress.finished()
                ctx.loop_seconds[number] = time.monotonic() - began
    finally:
        progress.close()
        if pool is not None:
            pool.close()


def finish_trial(backend, plugins: Plugins, trial, record: TrialRecord) -> None:
    """Record a finished trial so that a kill at any point loses nothing and duplicates nothing:
    the record is first saved with the still-running trial (``save_pending``), then trackers see it
    (the MLflow tracker keys its runs by study and trial number, so seeing a trial again after a
    resume reuses its run), then the backend closes the trial with the record and the links."""
    backend.save_pending(trial, record)
    plugins.trial_end(record)
    backend.tell(trial, record)


def _close_interrupted(backend, plugins: Plugins) -> None:
    """Close the trials a killed search left RUNNING: a trial measured before the kill keeps its
    record; any other is failed as interrupted, with its plan (``OptunaBackend.interrupted``)."""
    for trial, record in backend.interrupted():
        _log(f"trial {record.number}: " + (record.failure_reason if record.state == FAILED
                                           else "recovered: it was measured before the search was stopped"))
        finish_trial(backend, plugins, trial, record)


def remove_orphaned_files(backend, artifact_dir: Path) -> list[tuple[str, str]]:
    """Delete the files a killed search left in the study's artifact folder that nothing will
    ever use; returns ``(file name, why)`` for each.  Called once interrupted trials are closed.

    Only a file of a trial the study knows and no process is running is touched, and never one a
    trial record names:
    - a temporary file of ``write_artifact``: the write was cut off (a finished one is renamed);
    - ``trial-NNNN.estimate.slim``: a size estimate, which lives only until its size is read;
    - ``trial-NNNN.slim`` of a trial that is not COMPLETE: written, then the search died before
      the trial was recorded, so it was closed as interrupted.
    A file of a trial the study does not know (another storage, or a trial asked by a worker after
    the study was read) is left alone: nothing proves it is an orphan."""
    import optuna

    from slimforge.core.artifact import temporary_target
    from slimforge.search.objective import TRIAL_FILE

    trials = {t.number: t for t in backend.study.get_trials(deepcopy=False)}
    named = {Path(r["artifact_path"]).name for r in backend.records() if r.get("artifact_path")}
    removed = []
    for path in sorted(artifact_dir.iterdir()):
        target = temporary_target(path.name)
        match = TRIAL_FILE.match(target or path.name)
        trial = trials.get(int(match["number"])) if match else None
        if (trial is None or trial.state == optuna.trial.TrialState.RUNNING or path.name in named
                or not path.is_file()):
            continue
        if target is not None:
            why = "cut-off write"
        elif match["estimate"]:
            why = "size estimate"
        elif trial.state != optuna.trial.TrialState.COMPLETE:
            why = f"trial {trial.number} not recorded complete"
        else:
            continue
        path.unlink(missing_ok=True)
        removed.append((path.name, why))
    return removed


def _log_removed(removed: list[tuple[str, str]], artifact_dir: Path) -> None:
    if removed:
        _log(f"removed {len(removed)} file(s) a killed search left in {artifact_dir}: "
             + ", ".join(f"{name} ({why})" for name, why in removed))


def _make_pool(task: Task, runner: TrialRunner, settings: SearchSettings):
    """Worker processes when asked for (--workers > 1, --trial-timeout, --trial-memory-limit);
    None runs trials in this process."""
    wanted = settings.workers > 1 or settings.trial_timeout_s is not None or settings.trial_memory_limit is not None
    if not wanted:
        return None
    if not ({"builtin", "config"} & set(task.source)):
        raise ConfigError("--workers/--trial-timeout/--trial-memory-limit: need a task that worker processes can "
                          "rebuild (a built-in task or a --config file); this task was built in Python")
    from slimforge.search.executor import ProcessPool, WorkerConfig

    lock = runner.latency_lock or latency_lock_path()
    runner.latency_lock = lock
    config = WorkerConfig(task_source=task.source, budgets=dataclasses.asdict(runner.budgets),
                          artifact_dir=str(runner.artifact_dir), device=settings.device,
                          latency=dataclasses.asdict(settings.latency), strict_plugins=settings.strict_plugins,
                          disabled_plugins=settings.disabled_plugins, latency_lock=str(lock),
                          memory_limit_bytes=settings.trial_memory_limit)
    _log(f"starting {settings.workers} worker process(es)"
         + (f"; per-trial timeout {settings.trial_timeout_s:g} s" if settings.trial_timeout_s else ""))
    pool = ProcessPool(settings.workers, config, settings.trial_timeout_s)
    pool.wait_ready()
    return pool


# --- joining a running search from another process or host -------------------------------------

def read_stored_settings(storage: str, study: str, wait_s: float = 0.0) -> dict[str, Any]:
    """The settings ``run_search`` stored in ``study``, waiting up to ``wait_s`` seconds for the
    search to create the study (a worker may be started before or with the search)."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        problem = ""
        try:
            stored = optuna.load_study(study_name=study, storage=storage).user_attrs.get(SETTINGS_ATTR)
        except KeyError:  # Optuna's "study not found"
            stored = None
        except Exception as exc:  # e.g. the sqlite file's folder does not exist yet, or the server is down
            stored, problem = None, f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if stored is not None:
            return stored
        if time.monotonic() >= deadline:
            raise ConfigError(f"--study: no slimforge search named {study!r} in {storage}{problem}; start it with "
                              f"'slimforge search --storage {storage} --study {study}' (workers join a search, "
                              "they do not start one)")
        if not announced and wait_s:
            _log(f"waiting up to {wait_s:g} s for the search to create study {study!r} in {storage}")
            announced = True
        time.sleep(1.0)


def run_worker(*, storage: str, study: str, trials: int | None = None, progress: bool = True,
               wait_s: float = 60.0, plugins: Plugins | None = None) -> list[TrialRecord]:
    """Join the search ``study`` in ``storage`` (``slimforge worker``): rebuild its task, planner
    and trial runner from the settings the search stored, and run trials in this process until
    the study holds ``trials`` (default: the search's total).  Returns the records it ran.

    The study's storage must be reachable from here (PostgreSQL/MySQL across hosts; sqlite or a
    journal file on one host), and the search's artifact directory must be the same path here
    (a shared filesystem across hosts): the search reads every artifact back."""
    from slimforge.core.task import task_from_source
    from slimforge.search.backends.optuna import OptunaBackend

    stored = read_stored_settings(storage, study, wait_s)
    settings = SearchSettings.from_dict(stored["settings"])
    settings = dataclasses.replace(settings, storage=storage, study=study, progress=progress,
                                   trials=trials or settings.trials, workers=1, trial_timeout_s=None,
                                   trial_memory_limit=None, tracking=False, backend="optuna", scheduler="fifo",
                                   ray_address=None, cpus_per_trial=1.0, gpus_per_trial=0.0)
    _check_device(settings)
    if not ({"builtin", "config"} & set(stored["task_source"])):
        raise ConfigError(f"study {study!r}: its task was built in Python, so a worker cannot rebuild it; "
                          "workers need a built-in task or a --config file")
    task = task_from_source(stored["task_source"])
    plugins = plugins or Plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    planner = _make_planner(plugins, settings)
    runner = TrialRunner(task=task, plugins=plugins, budgets=Budgets(**stored["budgets"]),
                         artifact_dir=Path(stored["artifact_dir"]), device=settings.device,
                         latency=settings.latency, latency_lock=latency_lock_path())
    runner.artifact_dir.mkdir(parents=True, exist_ok=True)
    # The sampler's seed must differ from the search's: seeded identically, two processes would
    # draw the same start-up plans.  Trials stay reproducible through their plan (and its seed).
    worker_seed = settings.seed + 1_000_003 * (1 + os.getpid() % 997)
    backend = OptunaBackend(storage=storage, study_name=study, seed=worker_seed, budgets=runner.budgets,
                            close_interrupted=False)  # other workers' RUNNING trials are running
    mine_before = {r["number"] for r in backend.records()}
    _log(f"worker {socket.gethostname()}:{os.getpid()} joined study {study!r} ({stored['task_name']}); "
         f"running trials until it holds {settings.trials}")
    runner.history = [record_from_dict(r) for r in backend.records()]
    plugins.configure(settings.to_dict())
    _run_trials(SearchContext(backend=backend, planner=planner, runner=runner, plugins=plugins, task=task,
                              settings=settings, baseline=Measurements(**stored["baseline"])))
    host = f"{socket.gethostname()}:{os.getpid()}"
    by_number = {t.number: t for t in backend.study.get_trials(deepcopy=False)}
    return [record_from_dict(r) for r in backend.records()
            if r["number"] not in mine_before and by_number[r["number"]].user_attrs.get(WORKER_ATTR) == host]


# --- reports -----------------------------------------------------------------------------------

def write_reports(result: SearchResult, out_dir: Path) -> None:
    """summary.json, trials.csv and pareto.png in ``out_dir``."""
    from slimforge.tracking.report import write_pareto_plot, write_trials_csv

    write_summary(result, out_dir / "summary.json")
    write_trials_csv(result, out_dir / "trials.csv")
    write_pareto_plot(result, out_dir / "pareto.png")


def write_summary(result: SearchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["search_summary"] = search_summary(result.trials, result.baseline) | {"loop_overhead_s": result.loop_overhead()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
