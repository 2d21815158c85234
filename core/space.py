"""The suggestion interface techniques see.  Plugins never import Optuna or Ray.

``Suggester`` is a protocol with Optuna's define-by-run vocabulary (the backend's adapter,
``slimforge.search.space.OptunaSuggester``, implements it over an ``optuna.Trial``);
``FixedSuggester`` answers from a dict or a seeded RNG for tests and the conformance kit.
``scoped`` prefixes parameter names so two techniques never collide (``magnitude_pruning.density``).

Knob style: a suggester's ``per_layer`` attribute says whether techniques ask one parameter per
weight site (``magnitude_pruning.density.fc1``, the old, wide space) or a few global knobs that
``core.sensitivity`` spreads over the sites (``magnitude_pruning.density`` +
``magnitude_pruning.allocation``).  The search asks global knobs unless told otherwise
(``--per-layer-knobs``); a suggester without the attribute is per-layer, which is what
hand-written configs and the tests' ``FixedSuggester`` name.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


class ScopedSuggester:
    """Prefixes every name with ``scope.``."""

    def __init__(self, inner: Suggester, scope: str):
        self.inner, self.scope = inner, scope
        self.per_layer = per_layer_knobs(inner)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self.inner.suggest_int(f"{self.scope}.{name}", low, high, step=step, log=log)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self.inner.suggest_float(f"{self.scope}.{name}", low, high, step=step, log=log)

    def suggest_categorical(self, name, choices):
        return self.inner.suggest_categorical(f"{self.scope}.{name}", choices)


def per_layer_knobs(space: Suggester) -> bool:
    """True when ``space`` wants one parameter per weight site (see the module docstring)."""
    return bool(getattr(space, "per_layer", True))


def scoped(space: Suggester, scope: str) -> Suggester:
    return ScopedSuggester(space, scope)


class FixedSuggester:
    """Answers from ``values`` where given, otherwise draws from a seeded RNG (deterministic)."""

    def __init__(self, values: dict[str, Any] | None = None, seed: int = 0, per_layer: bool = True):
        self.values = dict(values or {})
        self.per_layer = per_layer
        self.rng = random.Random(seed)
        self.asked: dict[str, Any] = {}

    def _answer(self, name: str, draw):
        value = self.values[name] if name in self.values else draw()
        self.asked[name] = value
        return value

    def suggest_int(self, name, low, high, *, step=1, log=False):
        def draw():
            if log:
                return int(round(math.exp(self.rng.uniform(math.log(low), math.log(high)))))
            return self.rng.randrange(low, high + 1, step)
        return self._answer(name, draw)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        def draw():
            if step:
                return round(low + step * self.rng.randint(0, int(round((high - low) / step))), 10)
            if log:
                return math.exp(self.rng.uniform(math.log(low), math.log(high)))
            return self.rng.uniform(low, high)
        return self._answer(name, draw)

    def suggest_categorical(self, name, choices):
        return self._answer(name, lambda: self.rng.choice(list(choices)))
