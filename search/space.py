"""The search backends' side of the suggestion interface: ``OptunaSuggester`` adapts an
``optuna.Trial`` (also the one Ray Tune's OptunaSearch hands out) to ``core.space.Suggester``,
the protocol techniques see.
"""

from __future__ import annotations

from typing import Any


class OptunaSuggester:
    """Adapter over ``optuna.trial.Trial`` (duck-typed, so this module imports no optuna)."""

    def __init__(self, trial: Any, per_layer: bool = False):
        self.trial = trial
        self.per_layer = per_layer  # core.space.per_layer_knobs: global knobs unless asked

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self.trial.suggest_int(name, low, high, step=step, log=log)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        value = self.trial.suggest_float(name, low, high, step=step, log=log)
        # Optuna's stepped floats carry binary noise (0.15000000000000002); round to the grid.
        return round(value, 10) if step else value

    def suggest_categorical(self, name, choices):
        return self.trial.suggest_categorical(name, list(choices))
