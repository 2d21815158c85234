"""The plugin manager: the only place that calls ``pm.hook.*``.

Built-in plugins are registered from ``slimforge.plugins.BUILTIN_PLUGINS``; third-party plugins
from the ``slimforge`` entry-point group (``SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` turns that off)
and from the modules named in ``SLIMFORGE_PLUGINS`` (comma-separated).
The core measurement defaults are registered first and marked ``trylast`` so any plugin's
measurement hook wins.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from typing import Any

import pluggy

from slimforge.core import hookspecs
from slimforge.core.errors import PluginError
from slimforge.core.technique import Technique, TechniqueRegistry, family_name, needs_fine_tuning, stage_label

ENTRY_POINT_GROUP = "slimforge"


def _version() -> str:
    try:
        return metadata.version("slimforge")
    except metadata.PackageNotFoundError:
        return "dev"


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line: pluggy's signature errors span three, and a start-up warning
    is one line per plugin."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {'; '.join(lines)}"


def _technique_names(plugin: Any) -> list[str]:
    """Names of the technique classes a plugin object (usually its module) defines itself: what a
    user may ask for when the plugin failed to load."""
    if plugin is None or not hasattr(plugin, "__dict__"):
        return []
    home = getattr(plugin, "__name__", type(plugin).__module__)
    return [value.name for value in vars(plugin).values()
            if isinstance(value, type) and issubclass(value, Technique) and value.__module__ == home
            and isinstance(value.__dict__.get("name"), str)]


class Plugins:
    """A configured pluggy manager plus the technique registry its plugins filled."""

    def __init__(self, *, load_entry_points: bool | None = None, extra_plugins: tuple[Any, ...] = (),
                 strict: bool = False, disabled: tuple[str, ...] = ()):
        """``strict``: a third-party plugin that fails to import or register is fatal instead of
        being named on stderr and skipped.  ``disabled``: entry-point plugin names or technique
        names to leave out."""
        from slimforge.core.measure import DefaultMeasurements
        from slimforge.plugins import BUILTIN_PLUGINS

        self.strict, self.disabled = strict, set(disabled)
        self.skipped: list[tuple[str, str]] = []  # (plugin, reason) for third-party plugins left out
        self._failed: dict[str, str] = {}  # plugin -> reason, for the ones that failed (not disabled)
        self._failed_techniques: dict[str, str] = {}  # technique name -> the failed plugin providing it
        self._entry_point_plugins: set[str] = set()
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
        # SLIMFORGE_PLUGINS=mod1,mod2 registers importable modules as plugins without packaging
        # them (like pytest's -p); worker processes inherit it with the environment.
        for module_name in filter(None, (m.strip() for m in os.environ.get("SLIMFORGE_PLUGINS", "").split(","))):
            try:
                self._register(importlib.import_module(module_name), module_name, f"{module_name} (SLIMFORGE_PLUGINS)")
            except Exception as exc:
                self._fail(module_name, f"SLIMFORGE_PLUGINS: failed to load: {_one_line(exc)}", exc,
                           sys.modules.get(module_name))
                continue
            self._entry_point_plugins.add(module_name)
        for plugin in extra_plugins:
            # A plugin passed explicitly that its installed entry point already registered (a
            # package's tests run with the package installed): once is enough.
            if not self.pm.is_registered(plugin):
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
                source = f"{dist.metadata['Name']} {dist.version}"
                if ep.name in self.disabled:
                    self.skipped.append((ep.name, f"{source}: disabled by configuration"))
                    continue
                plugin = None
                try:
                    plugin = ep.load()
                    self._register(plugin, ep.name, source)
                except Exception as exc:  # import error, or pluggy rejecting a malformed hookimpl
                    self._fail(ep.name, f"{source}: failed to load: {_one_line(exc)}", exc, plugin)
                    continue
                self._entry_point_plugins.add(ep.name)

    def _fail(self, plugin: str, reason: str, exc: BaseException | None = None, obj: Any = None) -> None:
        """A third-party plugin failed: fatal in strict mode, otherwise named and skipped, on one
        line now; a later request for one of its techniques answers with the same reason
        (``TechniqueRegistry.get``).  ``obj`` is the plugin object when it imported."""
        if self.strict:
            raise PluginError(f"plugin {plugin!r} ({reason}); run without --strict-plugins to skip it") from exc
        self.skipped.append((plugin, reason))
        self._failed[plugin] = reason
        for name in (plugin, *_technique_names(obj)):
            self._failed_techniques.setdefault(name, plugin)
        print(f"slimforge: warning: skipping plugin {plugin!r}: {reason}", file=sys.stderr)

    def _check_unknown_hooks(self) -> None:
        for plugin in self.pm.get_plugins():
            for attr in dir(plugin):
                if not attr.startswith("slimforge_"):
                    continue
                # Registering a @hookimpl creates a spec-less caller for its name, so "has a
                # caller" is not "is a known hook": only a spec makes it one.
                caller = getattr(self.pm.hook, attr, None)
                if caller is None or not caller.has_spec():
                    label = getattr(plugin, "__name__", None) or type(plugin).__qualname__
                    name = self.pm.get_name(plugin)
                    if name in self._entry_point_plugins:
                        self.pm.unregister(plugin)
                        self._fail(name, f"{self._sources[name]}: implements unknown hook {attr!r}", obj=plugin)
                        break
                    raise PluginError(f"plugin {label!r} implements unknown hook {attr!r}")

    def _collect_techniques(self) -> TechniqueRegistry:
        registry = TechniqueRegistry()
        # Call each plugin's implementation separately so every technique knows its source
        # package, and a third-party plugin that fails to register is skipped alone.
        for impl in self.pm.hook.slimforge_register_techniques.get_hookimpls():
            source = self._sources.get(impl.plugin_name, impl.plugin_name)
            registry.current_source = source
            before = set(registry.names())
            try:
                impl.function(registry=registry)
            except Exception as exc:
                if impl.plugin_name not in self._entry_point_plugins:
                    raise  # a broken built-in or explicitly passed plugin: never hide it
                registry.remove(set(registry.names()) - before)
                self._fail(impl.plugin_name, f"{source}: failed to register techniques: {_one_line(exc)}", exc,
                           impl.plugin)
        registry.current_source = "unknown"
        registry.remove(self.disabled & set(registry.names()))
        registry.failed_plugins = dict(self._failed)
        registry.failed_techniques = {name: plugin for name, plugin in self._failed_techniques.items()
                                      if name not in registry}
        return registry

    # --- hook calls ------------------------------------------------------------------------------
    def configure(self, settings: dict) -> None:
        self.pm.hook.slimforge_configure.call_historic(kwargs={"config": settings})

    def search_trackers(self, settings: dict) -> list[Any]:
        return [t for t in self.pm.hook.slimforge_search_trackers(settings=settings, plugins=self) if t is not None]

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

    def search_stopped(self, error: BaseException) -> None:
        self.pm.hook.slimforge_search_stopped(error=error)

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
        """One row per technique: name, family, stage, whether it works without fine-tuning (joins
        ``--no-finetune``), source package."""
        rows = []
        for cls in self.registry.classes():
            rows.append({"technique": cls.name, "family": family_name(cls.family), "stage": stage_label(cls.stage),
                         "one-shot": "no" if needs_fine_tuning(cls) else "yes",
                         "source": self.registry.source_of(cls.name), "description": cls.description})
        return rows
