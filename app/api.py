"""The Python API: ``run_search`` with MLflow tracking wired in, as ``slimforge search`` runs it.

``slimforge.search.engine.run_search`` tracks only through the plugins it is given; this one adds
the MLflow tracker plugin (``slimforge.tracking.mlflow``) when the settings ask for tracking.
"""

from __future__ import annotations

from typing import Any

from slimforge.core.manager import Plugins
from slimforge.core.task import Task
from slimforge.search.budgets import Budgets
from slimforge.search.records import SearchResult
from slimforge.search.settings import SearchSettings

TRACKING_PLUGIN = "slimforge.tracking.mlflow"

__all__ = ["Budgets", "SearchSettings", "make_plugins", "run_search", "with_tracking"]


def make_plugins(*, strict: bool = False, disabled: tuple[str, ...] = (), **kwargs: Any) -> Plugins:
    """The process's plugins (built once, then passed to whatever needs a registry or hooks)."""
    return Plugins(strict=strict, disabled=tuple(disabled), **kwargs)


def with_tracking(plugins: Plugins, settings: SearchSettings) -> Plugins:
    """Register the MLflow tracker plugin when ``settings.tracking`` is on (and not yet there).
    Not imported otherwise: a search with ``--no-tracking`` never loads MLflow."""
    if settings.tracking and not plugins.pm.has_plugin(TRACKING_PLUGIN):
        from slimforge.tracking import mlflow as mlflow_tracking

        plugins.register(mlflow_tracking, name=TRACKING_PLUGIN)
    return plugins


def run_search(task: Task, budgets: Budgets, settings: SearchSettings = SearchSettings(),
               plugins: Plugins | None = None) -> SearchResult:
    """Search ``task`` under ``budgets`` (see ``slimforge.search.engine.run_search``), tracked in
    MLflow unless ``settings.tracking`` is off."""
    from slimforge.search.engine import run_search as run_untracked

    plugins = plugins or make_plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    return run_untracked(task, budgets, settings, with_tracking(plugins, settings))
