"""What it takes to run a search's trials somewhere else: a ``WorkerSpec``.

A worker process (``--workers``), a Ray Tune trial and ``slimforge worker`` on another host all
rebuild the task from ``Task.source`` (a built-in name or a config file) and build their own
``TrialRunner``.  The spec is plain data, so it crosses a pipe, Ray's object store or the study's
storage as it is; ``build_runner`` is the one place a runner is made from it, and
``require_rebuildable`` the one check that the task can be rebuilt at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.core.errors import ConfigError
from slimforge.core.measure import LatencySettings, latency_lock_path
from slimforge.search.budgets import Budgets

if TYPE_CHECKING:
    from slimforge.core.manager import Plugins
    from slimforge.core.task import Task
    from slimforge.search.objective import TrialRunner

REBUILDABLE_SOURCES = {"builtin", "config"}  # Task.source keys another process can rebuild a task from


def require_rebuildable(source: dict[str, Any], what: str) -> None:
    """Raise unless a task with this ``Task.source`` can be rebuilt in another process; ``what``
    names the feature that needs it (``--workers``, ``--backend ray``, ...)."""
    if not (REBUILDABLE_SOURCES & set(source)):
        raise ConfigError(f"{what}: need a task that another process can rebuild (a built-in task or a --config "
                          "file); this task was built in Python")


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """Everything a process needs to run this search's trials (plain data)."""

    task_source: dict[str, Any]
    budgets: dict[str, Any]  # resolved: a worker needs no baseline
    artifact_dir: str
    device: str = "cpu"
    latency: dict[str, Any] = dataclasses.field(default_factory=lambda: dataclasses.asdict(LatencySettings()))
    strict_plugins: bool = False
    disabled_plugins: tuple[str, ...] = ()
    latency_lock: str | None = None
    torch_threads: int | None = None  # None: torch's default (trials in the search's own process)
    # The registration floor: a trial that cannot reach it can never be on the front, so early
    # stopping treats it like an accuracy budget when the search has none (objective.early_stop).
    front_floor: float | None = None

    @classmethod
    def for_search(cls, task_source: dict[str, Any], budgets: Budgets, artifact_dir: Path | str, settings,
                   **overrides) -> WorkerSpec:
        """The spec of a search's trials; ``settings`` is its ``SearchSettings``."""
        return cls(task_source=task_source, budgets=dataclasses.asdict(budgets), artifact_dir=str(artifact_dir),
                   device=settings.device, latency=dataclasses.asdict(settings.latency),
                   strict_plugins=settings.strict_plugins, disabled_plugins=tuple(settings.disabled_plugins),
                   latency_lock=str(latency_lock_path()), **overrides)

    def build_runner(self, *, task: Task | None = None, plugins: Plugins | None = None,
                     runner_class: type[TrialRunner] | None = None) -> TrialRunner:
        """A ``TrialRunner`` for these trials.  ``task`` / ``plugins``: the ones this process
        already built (the search's own process); otherwise they are rebuilt here, once."""
        from slimforge.core.manager import Plugins
        from slimforge.core.task import task_from_source
        from slimforge.search.objective import TrialRunner

        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)
        if task is None:
            task = task_from_source(self.task_source)
            _ = task.teacher  # built now, at start-up, and not inside the first trial's time
        plugins = plugins or Plugins(strict=self.strict_plugins, disabled=self.disabled_plugins)
        runner = (runner_class or TrialRunner)(
            task=task, plugins=plugins, budgets=Budgets(**self.budgets), artifact_dir=Path(self.artifact_dir),
            device=self.device, latency=LatencySettings(**self.latency),
            latency_lock=Path(self.latency_lock) if self.latency_lock else None, front_floor=self.front_floor)
        runner.artifact_dir.mkdir(parents=True, exist_ok=True)
        return runner

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerSpec:
        return cls(**{**data, "disabled_plugins": tuple(data.get("disabled_plugins", ()))})
