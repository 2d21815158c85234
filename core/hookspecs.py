"""Every slimforge hook, in lifecycle order.

All hooks take keyword arguments only (pluggy's rule) and are prefixed ``slimforge_``.  Only
``slimforge.core.manager`` calls them; plugins implement them with ``@slimforge.core.hookimpl``.

Stability: hooks marked *stable* keep their signature within a major version; *provisional* ones may
still gain arguments (pluggy lets implementations accept a subset of arguments, so adding one is
not breaking for implementers).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("slimforge")
hookimpl = pluggy.HookimplMarker("slimforge")


# --- set-up -------------------------------------------------------------------------------------


@hookspec(historic=True)
def slimforge_addhooks(pluginmanager):
    """(stable) Add new hook specifications: ``pluginmanager.add_hookspecs(module)``.

    Historic: a plugin registered late still sees it.
    """


@hookspec(historic=True)
def slimforge_configure(config):
    """(provisional) Called once with the resolved search settings (a ``dict``) before a search.

    Historic, so a plugin loaded after configuration still receives it.
    """


@hookspec
def slimforge_register_techniques(registry):
    """(stable) Add technique classes to ``registry`` (a ``TechniqueRegistry``): ``registry.add(Cls)``.

    Every plugin's implementation runs; the planner later calls techniques directly, so no hook
    fans ``apply`` out to all plugins.  ``registry.add`` checks the rules the search relies on
    (name, stage with ``needs_recovery``, the ``suggest`` signature, a JSON round trip of the
    default config) and raises a one-line ``PluginError``; a third-party plugin whose
    implementation raises is skipped with one line on stderr, and a later request for one of its
    techniques answers "installed but failed to load" with that line.  The names a plugin may
    import are ``slimforge.plugins.api``'s.
    """


# --- search lifecycle: trackers and reporters listen here ---------------------------------------


@hookspec
def slimforge_search_trackers(settings, plugins):
    """(provisional) Return a tracker for one search (a plugin object implementing the lifecycle
    hooks below, e.g. the MLflow tracker), or None.  Called when the search's ``settings`` (a dict)
    are resolved, before ``slimforge_search_start``; each tracker is registered for that search
    and unregistered when it ends.  ``plugins`` is the search's ``Plugins`` (its registry loads
    artifacts).  This is how the layer above the search wires tracking in: the search itself
    knows no tracker."""


@hookspec
def slimforge_search_start(settings, task, baseline):
    """(provisional) A search begins.  ``settings`` is a dict, ``baseline`` the uncompressed
    ``Measurements`` on validation data.  Return values are ignored."""


@hookspec
def slimforge_trial_start(number, plan):
    """(provisional) Trial ``number`` is about to run ``plan``."""


@hookspec
def slimforge_trial_end(record):
    """(provisional) Trial finished (complete, rejected or failed); ``record`` is a ``TrialRecord``.

    Return a ``dict`` of links to attach to the record (e.g. ``{"mlflow_run_id": ...}``) or None;
    the dicts of all implementations are merged into ``record.links``.
    """


@hookspec
def slimforge_search_end(result):
    """(provisional) The search finished; ``result`` is a ``SearchResult`` whose Pareto members
    already carry test-split measurements.

    Return ``{trial_number: {link: value}}`` (e.g. registered model versions) or None; merged into
    each Pareto member's ``links``.
    """


@hookspec
def slimforge_search_stopped(error):
    """(provisional) A search that called ``slimforge_search_start`` ends without reaching
    ``slimforge_search_end``: ``error`` is the exception that stopped it (``KeyboardInterrupt``
    for Ctrl-C).  Trackers close what they opened at the start.  Return values are ignored.

    A search killed outright (SIGKILL, power loss) never gets here; the next search of the same
    study cleans up after it instead.
    """


# --- measurement: first non-None result wins; the core defaults are registered last ------------


@hookspec(firstresult=True)
def slimforge_measure_size(path):
    """(stable) Bytes of the artifact file at ``path``.  Core default: ``os.path.getsize``."""


@hookspec(firstresult=True)
def slimforge_measure_latency(model, example_inputs, device, settings):
    """(stable) Time one forward pass of ``model`` on ``device``; return a ``LatencyStats``.

    ``settings`` is a ``LatencySettings`` (warm-up, repeats, threads).  Core default: median of
    wall-clock repeats on CPU, CUDA events on GPU.
    """
