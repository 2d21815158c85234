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
from slimforge.search.records import SearchResult, TrialRecord

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

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"--trials: must be >= 1, got {self.trials}")
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
        runner.history.extend(_record_from_dict(r) for r in backend.records())
        _run_trials(backend, planner, runner, plugins, task, settings)
        records = [_record_from_dict(r) for r in backend.records()]
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
    from tqdm.auto import tqdm

    done = backend.finished_count()
    remaining = max(0, settings.trials - done)
    if done:
        _log(f"study {settings.study!r}: resuming with {done} trial(s) already recorded; {remaining} to go")
    started = time.monotonic()
    best: TrialRecord | None = None
    with tqdm(total=settings.trials, initial=done, desc="trials", unit="trial", disable=not settings.progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for _ in range(remaining):
            if settings.timeout_s is not None and time.monotonic() - started > settings.timeout_s:
                _log(f"timeout of {settings.timeout_s:g} s reached; stopping before the next trial")
                break

            def evaluate(space, number):
                plan = planner.sample(space, task, seed=settings.seed + number)
                plugins.trial_start(number, plan)
                record = runner.run(plan, number)
                plugins.trial_end(record)
                return record

            record = backend.run_one(evaluate)
            runner.history.append(record)
            if record.feasible and (best is None or record.measurements.accuracy > best.measurements.accuracy):
                best = record
            bar.set_postfix_str(_progress_text(record, best))
            bar.update(1)


def _progress_text(last: TrialRecord, best: TrialRecord | None) -> str:
    text = f"last: {last.state}"
    if best is not None:
        m = best.measurements
        text += f" | best feasible: acc {m.accuracy:.4f}, {m.size_bytes / 1000:.1f} KB, {m.latency_ms:.3f} ms"
    return text


def _record_from_dict(data: dict) -> TrialRecord:
    data = dict(data)
    for key in ("measurements", "test_measurements"):
        if data.get(key) is not None:
            data[key] = Measurements(**data[key])
    return TrialRecord(**data)


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
