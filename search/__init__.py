"""Search: planner, budgets, objective and backends.  ``run_search`` is the Python API."""


def run_search(*args, **kwargs):
    """See ``slimforge.search.engine.run_search`` (imported lazily: it pulls in torch)."""
    from slimforge.search.engine import run_search as _run_search

    return _run_search(*args, **kwargs)
