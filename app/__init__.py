"""The application layer: the ``slimforge`` command line (``cli``) and the Python API (``api``).

It sits above every other layer and is the only one that knows them all: it builds the process's
``Plugins`` once, wires the MLflow tracker in (the search knows no tracker), and turns user input
into settings and budgets before anything heavy is imported.
"""
