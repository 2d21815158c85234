"""``run_search``: the Python API the CLI is a thin layer over.

Task + budgets + settings in, ``SearchResult`` out.  Selection uses the validation split only;
the test split is touched once, to report the final Pareto members next to the baseline.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from slimforge.core.compressed import save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, Measurements
from slimforge.core.plan import Plan
from slimforge.core.task import Task
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.pareto import pareto_front
from slimforge.search.planner import Planner
from slimforge.search.executor import failed_record
from slimforge.search.records import SearchResult, TrialRecord, record_from_dict

DEVICES = ("cpu", "cuda")


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
    workers: int = 1  # trials at once, each in its own worker process when > 1
    trial_timeout_s: float | None = None  # kill a trial (its worker process) after this many seconds
    trial_memory_limit: int | None = None  # bytes of extra address space a worker may use

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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_search(task: Task, budgets: Budgets, settings: SearchSettings = SearchSettings(),
               plugins: Plugins | None = None) -> SearchResult:
    from slimforge.search.backends.optuna import OptunaBackend

    if settings.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device: 'cuda' requested but torch sees no CUDA device; valid here: cpu")
    plugins = plugins or Plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    settings = settings.resolved(task)
    available = {"teacher", "training_data", "calibration_data"} | ({"gpu"} if settings.device.startswith("cuda") else set())
    planner = Planner(plugins.registry, settings.techniques, available=available)
    artifact_dir = settings.out_dir / "artifacts" / settings.study
    artifact_dir.mkdir(parents=True, exist_ok=True)
    runner = TrialRunner(task=task, plugins=plugins, budgets=budgets, artifact_dir=artifact_dir,
                         device=settings.device, latency=settings.latency)

    teacher_device = "cpu"
    baseline_path = settings.out_dir / "baseline.slim"
    save_model(task.teacher.to(teacher_device), baseline_path, task=task, plan=Plan())
    baseline, baseline_test = runner.measure(baseline_path, "val"), runner.measure(baseline_path, "test")
    budgets = runner.budgets = budgets.resolve(baseline.accuracy)
    _log(f"baseline (uncompressed): {task.metric_name} {baseline.accuracy:.4f} val / {baseline_test.accuracy:.4f} test, "
         f"{baseline.size_bytes / 1000:.1f} KB, {baseline.latency_ms:.3f} ms; budgets: {budgets.describe()}")

    tracker = None
    if settings.tracking:
        from slimforge.tracking.mlflow import MlflowTracker
        tracker = MlflowTracker(tracking_uri=settings.tracking_uri, experiment=settings.experiment,
                                registered_model=settings.registered_model)
        plugins.register(tracker, name="slimforge.tracking.mlflow")
    try:
        backend = OptunaBackend(storage=settings.storage, study_name=settings.study, seed=settings.seed, budgets=budgets)
        plugins.configure(settings.to_dict())
        plugins.search_start(settings=settings.to_dict() | {"budgets": budgets.to_dict()}, task=task, baseline=baseline)
        runner.history.extend(record_from_dict(r) for r in backend.records())
        _run_trials(backend, planner, runner, plugins, task, settings)
        records = [record_from_dict(r) for r in backend.records()]
        pareto = pareto_front(records)
        for member in pareto:  # the only place the test split is used
            member.test_measurements = runner.measure(member.artifact_path, "test")
        result = SearchResult(study_name=settings.study, task=task.name, budgets=budgets.to_dict(),
                              baseline=baseline, baseline_test=baseline_test, trials=records, pareto=pareto,
                              settings=settings.to_dict(), metric=task.metric_name)
        write_reports(result, settings.out_dir)  # before search_end: trackers attach these files
        plugins.search_end(result)
    finally:
        if tracker is not None:
            plugins.unregister(tracker)
    write_summary(result, settings.out_dir / "summary.json")  # again, now with registry links
    return result


def _run_trials(backend, planner: Planner, runner: TrialRunner, plugins: Plugins, task: Task,
                settings: SearchSettings) -> None:
    """Ask the backend for trials, run them (here or in worker processes), tell the results."""
    from tqdm.auto import tqdm

    from slimforge.search.space import OptunaSuggester

    done = backend.finished_count()
    remaining = max(0, settings.trials - done)
    if done:
        _log(f"study {settings.study!r}: resuming with {done} trial(s) already recorded; {remaining} to go")
    pool = _make_pool(task, runner, settings) if remaining else None
    started, launched = time.monotonic(), 0
    running: dict[int, tuple[object, dict, str, float]] = {}  # number -> (trial, plan, text, started)
    best: TrialRecord | None = None

    def launch():
        nonlocal launched
        trial = backend.ask()
        plan = planner.sample(OptunaSuggester(trial), task, seed=settings.seed + trial.number)
        plugins.trial_start(trial.number, plan)
        running[trial.number] = (trial, plan.to_dict(), plan.describe(), time.monotonic())
        launched += 1
        return trial, plan

    try:
        with tqdm(total=settings.trials, initial=done, desc="trials", unit="trial", disable=not settings.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            while launched < remaining or running:
                out_of_time = settings.timeout_s is not None and time.monotonic() - started > settings.timeout_s
                if out_of_time and launched < remaining:
                    _log(f"timeout of {settings.timeout_s:g} s reached; no new trials are started")
                    remaining = launched
                if pool is None:
                    if launched == remaining:
                        break
                    trial, plan = launch()
                    finished = [(trial.number, runner.run(plan, trial.number), None)]
                else:
                    while launched < remaining and pool.idle():
                        trial, plan = launch()
                        pool.submit(trial.number, plan.to_dict(), trial.number, [r.to_dict() for r in runner.history])
                    finished = pool.poll()
                for number, record, failure in finished:
                    trial, plan_dict, plan_text, began = running.pop(number)
                    if record is None:
                        record = failed_record(number, plan_dict, plan_text, failure, time.monotonic() - began)
                    plugins.trial_end(record)
                    backend.tell(trial, record)
                    runner.history.append(record)
                    if record.feasible and (best is None or record.measurements.accuracy > best.measurements.accuracy):
                        best = record
                    bar.set_postfix_str(_progress_text(record, best))
                    bar.update(1)
    finally:
        if pool is not None:
            pool.close()


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

    lock = settings.out_dir / "latency.lock"
    runner.latency_lock = lock
    config = WorkerConfig(task_source=task.source, budgets=dataclasses.asdict(runner.budgets),
                          artifact_dir=str(runner.artifact_dir), device=settings.device,
                          latency=dataclasses.asdict(settings.latency), strict_plugins=settings.strict_plugins,
                          disabled_plugins=settings.disabled_plugins, latency_lock=str(lock),
                          memory_limit_bytes=settings.trial_memory_limit)
    _log(f"starting {settings.workers} worker process(es)"
         + (f"; per-trial timeout {settings.trial_timeout_s:g} s" if settings.trial_timeout_s else ""))
    return ProcessPool(settings.workers, config, settings.trial_timeout_s)


def _progress_text(last: TrialRecord, best: TrialRecord | None) -> str:
    text = f"last: {last.state}"
    if best is not None:
        m = best.measurements
        text += f" | best feasible: acc {m.accuracy:.4f}, {m.size_bytes / 1000:.1f} KB, {m.latency_ms:.3f} ms"
    return text


def write_reports(result: SearchResult, out_dir: Path) -> None:
    """summary.json, trials.csv and pareto.png in ``out_dir``."""
    from slimforge.tracking.report import write_pareto_plot, write_trials_csv

    write_summary(result, out_dir / "summary.json")
    write_trials_csv(result, out_dir / "trials.csv")
    write_pareto_plot(result, out_dir / "pareto.png")


def write_summary(result: SearchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(path)
