"""The plugin manager: the only place that calls ``pm.hook.*``.

Built-in plugins are registered from ``slimforge.plugins.BUILTIN_PLUGINS``; third-party plugins
from the ``slimforge`` entry-point group (``SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` turns that off).
The core measurement defaults are registered first and marked ``trylast`` so any plugin's
measurement hook wins.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Any

import pluggy

from slimforge.core import hookspecs
from slimforge.core.errors import PluginError
from slimforge.core.technique import TechniqueRegistry

ENTRY_POINT_GROUP = "slimforge"


def _version() -> str:
    try:
        return metadata.version("slimforge")
    except metadata.PackageNotFoundError:
        return "dev"


class Plugins:
    """A configured pluggy manager plus the technique registry its plugins filled."""

    def __init__(self, *, load_entry_points: bool | None = None, extra_plugins: tuple[Any, ...] = ()):
        from slimforge.core.measure import DefaultMeasurements
        from slimforge.plugins import BUILTIN_PLUGINS

        self.pm = pluggy.PluginManager("slimforge")
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(DefaultMeasurements(), name="slimforge.core.measure")
        self._sources: dict[str, str] = {}
        builtin_source = f"slimforge {_version()}"
        for module_name in BUILTIN_PLUGINS:
            self._register(importlib.import_module(module_name), module_name, builtin_source)
        if load_entry_points is None:
            load_entry_points = not os.environ.get("SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD")
        if load_entry_points:
            self._load_entry_points()
        for plugin in extra_plugins:
            self._register(plugin, None, "extra")
        self.pm.hook.slimforge_addhooks.call_historic(kwargs={"pluginmanager": self.pm})
        self._check_unknown_hooks()
        self.registry = self._collect_techniques()

    def _register(self, plugin: Any, name: str | None, source: str) -> None:
        registered_name = self.pm.register(plugin, name=name)
        self._sources[registered_name] = source

    def _load_entry_points(self) -> None:
        for dist in metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or self.pm.has_plugin(ep.name):
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginError(f"plugin {ep.name!r} from {dist.metadata['Name']} failed to import: {exc}") from exc
                self._register(plugin, ep.name, f"{dist.metadata['Name']} {dist.version}")

    def _check_unknown_hooks(self) -> None:
        for plugin in self.pm.get_plugins():
            for attr in dir(plugin):
                if attr.startswith("slimforge_") and not hasattr(self.pm.hook, attr):
                    raise PluginError(f"plugin {self.pm.get_name(plugin)!r} implements unknown hook {attr!r}")

    def _collect_techniques(self) -> TechniqueRegistry:
        registry = TechniqueRegistry()
        # Call each plugin's implementation separately so every technique knows its source package.
        for impl in self.pm.hook.slimforge_register_techniques.get_hookimpls():
            registry.current_source = self._sources.get(impl.plugin_name, impl.plugin_name)
            impl.function(registry=registry)
        registry.current_source = "unknown"
        return registry

    # --- hook calls ------------------------------------------------------------------------------
    def configure(self, settings: dict) -> None:
        self.pm.hook.slimforge_configure.call_historic(kwargs={"config": settings})

    def search_start(self, settings, task, baseline) -> None:
        self.pm.hook.slimforge_search_start(settings=settings, task=task, baseline=baseline)

    def trial_start(self, number: int, plan) -> None:
        self.pm.hook.slimforge_trial_start(number=number, plan=plan)

    def trial_end(self, record) -> None:
        for links in self.pm.hook.slimforge_trial_end(record=record):
            if links:
                record.links.update(links)

    def search_end(self, result) -> None:
        members = {m.number: m for m in result.pareto}
        for per_trial in self.pm.hook.slimforge_search_end(result=result):
            for number, links in (per_trial or {}).items():
                if number in members:
                    members[number].links.update(links)

    def measure_size(self, path) -> int:
        return int(self.pm.hook.slimforge_measure_size(path=path))

    def measure_latency(self, model, example_inputs, device, settings):
        return self.pm.hook.slimforge_measure_latency(
            model=model, example_inputs=example_inputs, device=device, settings=settings)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a runtime plugin (e.g. the MLflow tracker) that only listens to lifecycle hooks."""
        self._register(plugin, name, "runtime")

    def unregister(self, plugin: Any) -> None:
        self.pm.unregister(plugin)

    def plugin_rows(self) -> list[dict[str, str]]:
        """One row per technique: name, family, stage, source package."""
        rows = []
        for cls in self.registry.classes():
            rows.append({"technique": cls.name, "family": cls.family.value, "stage": f"{cls.stage.value} ({cls.stage.name.lower()})",
                         "source": self.registry.source_of(cls.name), "description": cls.description})
        return rows
