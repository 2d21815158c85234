"""Budgets: hard limits the sampler sees as constraints.

A violation is ``measured - limit`` in the limit's own unit (bytes, ms, metric points); a trial is
feasible when every violation is <= 0.  The sampler gets violations divided by the limit, so a
1 KB overshoot of a 60 KB budget and a 0.01 ms overshoot of 0.5 ms weigh alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from slimforge.core.errors import ConfigError, UnknownNameError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
# A sign is accepted so that "-5" is answered "must be > 0", not "cannot parse".
_SIZE_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, field: str = "--max-size") -> int:
    """``"150KB"`` -> 150000, ``"1.5MiB"`` -> 1572864, ``60000`` -> 60000 (KB = 1000 bytes)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):  # a TOML inf or nan: int() of it would raise
            raise ConfigError(f"{field}: must be a finite number of bytes, got {text}")
        if text <= 0:
            raise ConfigError(f"{field}: must be > 0, got {text}")
        return int(text)
    match = None if isinstance(text, bool) else _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(f"{field}: cannot parse {text!r}; give bytes or a number with one of "
                          "B, KB, KiB, MB, MiB, GB, GiB (e.g. 60KB)")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ConfigError(f"{field}: must be > 0, got {text!r}")
    return int(value)


def parse_positive_float(text, field: str) -> float:
    try:
        if isinstance(text, bool):
            raise TypeError
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field}: must be a positive number, got {text!r}")
    return value


def parse_accuracy(text, field: str = "--min-accuracy") -> float:
    """A metric floor as a fraction (0.97) or a percentage ("97%" or 97)."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise ConfigError(f"{field}: expected a fraction like 0.97 or a percentage like 97%, got {text!r}") from None
    if percent or value > 1.0:
        value /= 100.0
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{field}: must be between 0 and 1 (or 0% and 100%), got {text!r}")
    return value


def parse_accuracy_drop(text, field: str = "--max-accuracy-drop") -> float:
    """An allowed metric drop in points: "1pt", "1%", 1 or 0.01 all mean one point (0.01)."""
    raw = str(text).strip().lower()
    unit = "pt" if raw.endswith("pt") else "%" if raw.endswith("%") else ""
    try:
        value = float(raw.removesuffix(unit))
    except ValueError:
        raise ConfigError(f"{field}: expected points like 1pt, 0.5%, or a fraction like 0.01, got {text!r}") from None
    if unit or value >= 1.0:
        value /= 100.0
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{field}: must be between 0 and 100 points, got {text!r}")
    return value


def budget(flag: str, help: str, parse, *, kind: str | None = None, measured: str | None = None,
           upper: bool = True, show=str) -> Any:
    """A ``Budgets`` field and how it is given and checked.  ``flag`` is its command-line flag (its
    ``[budgets]`` key is the flag's name with underscores), ``parse(text, field)`` reads a value;
    ``kind`` names the violation (``record.violations[kind]``) of the measurement ``measured``,
    a limit from above (``upper``) or below; ``show`` prints a limit.  A budget without ``kind``
    is relative and ``Budgets.resolve`` folds it into another."""
    return field(default=None, metadata={"budget": {"flag": flag, "help": help, "parse": parse, "kind": kind,
                                                    "measured": measured, "upper": upper, "show": show}})


@dataclass(frozen=True, kw_only=True)
class Budgets:
    """Hard limits, declared once: the flags, ``[budgets]`` keys, violations, the sampler's
    constraints and the printed description all come from these fields.  A new budget kind is a
    new field here."""

    max_size_bytes: int | None = budget("--max-size", "artifact size limit: bytes or with a unit, e.g. 150KB, 1.5MB, "
                                        "60KiB", parse_size, kind="size", measured="size_bytes",
                                        show=lambda v: f"size <= {v / 1000:.1f} KB")
    max_latency_ms: float | None = budget("--max-latency", "median batch latency limit in ms on the target device, "
                                          "e.g. 0.5", parse_positive_float, kind="latency", measured="latency_ms",
                                          show=lambda v: f"latency <= {v:g} ms")
    min_accuracy: float | None = budget("--min-accuracy", "validation metric floor: 0.97 or 97%", parse_accuracy,
                                        kind="accuracy", measured="accuracy", upper=False,
                                        show=lambda v: f"accuracy >= {v:.4f}")
    # Relative floor: baseline validation metric minus this.  ``resolve`` turns it into an
    # absolute ``min_accuracy`` once the baseline is measured.
    max_accuracy_drop: float | None = budget("--max-accuracy-drop", "allowed drop from the uncompressed model's "
                                             "validation metric: 1pt (= 1% = 0.01); the stricter floor wins",
                                             parse_accuracy_drop, show=lambda v: f"accuracy drop <= {v * 100:g} pt")

    @classmethod
    def parse(cls, *, fields: dict[str, str] | None = None, **given) -> Budgets:
        """Budgets from user text, by ``[budgets]`` key (``max_size="60KB"``).  ``fields`` names
        where a value came from in error messages (default: its flag, e.g.
        ``{"max_size": "[budgets] max_size"}`` for a value read from a config file)."""
        known = budget_keys()
        for key in given:
            if key not in known:
                raise UnknownNameError("[budgets] key", key, known)
        kwargs = {}
        for f, meta in budget_fields():
            value = given.get(_key(meta))
            if value is not None:
                kwargs[f.name] = meta["parse"](value, (fields or {}).get(_key(meta), meta["flag"]))
        return cls(**kwargs)

    def resolve(self, baseline_accuracy: float) -> Budgets:
        """Fold ``max_accuracy_drop`` into ``min_accuracy`` (the stricter of the two wins)."""
        if self.max_accuracy_drop is None:
            return self
        floor = baseline_accuracy - self.max_accuracy_drop
        if self.min_accuracy is not None:
            floor = max(floor, self.min_accuracy)
        return dataclasses.replace(self, min_accuracy=round(floor, 6), max_accuracy_drop=None)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) is not None for f, _ in budget_fields())

    def violations(self, **measured: float | None) -> dict[str, float]:
        """Absolute violations (measured - limit, or limit - measured for a floor) of the budgets
        whose measurement is given, by kind: ``violations(size_bytes=..., accuracy=...)``."""
        out = {}
        for f, meta in budget_fields():
            limit, value = getattr(self, f.name), measured.get(meta["measured"]) if meta["kind"] else None
            if limit is not None and value is not None:
                out[meta["kind"]] = float(value - limit if meta["upper"] else limit - value)
        return out

    def normalized(self, violations: dict[str, float]) -> dict[str, float]:
        """Violations relative to their limit, for the sampler."""
        scale = {meta["kind"]: getattr(self, f.name) for f, meta in budget_fields() if meta["kind"]}
        return {k: v / (scale[k] or 1.0) for k, v in violations.items()}

    @staticmethod
    def feasible(violations: dict[str, float]) -> bool:
        return all(v <= 0 for v in violations.values())

    def resolution_warning(self, scored: int, metric_name: str = "accuracy") -> str | None:
        """One line when the accuracy-drop budget is finer than the validation split resolves: a
        metric averaged over ``scored`` predictions (``scored_predictions``) moves in steps of
        ``1 / scored``, so a drop under one step allows no extra error at all (2pt on a 39-example
        split, where one error costs 2.6 pt).  None when the budget is absent, zero (meant as "no
        extra error") or at least one step."""
        drop = self.max_accuracy_drop
        if drop is None or drop <= 0 or scored <= 0 or drop * scored >= 1:
            return None
        step = 100 / scored
        return (f"warning: the accuracy-drop budget ({drop * 100:g} pt) is finer than the validation split resolves: "
                f"{metric_name} over {scored} predictions moves in steps of {step:.3g} pt, so it allows no extra "
                f"error at all; allow at least {step:.3g} pt or validate on more data")

    def describe(self) -> str:
        parts = [meta["show"](getattr(self, f.name)) for f, meta in budget_fields() if getattr(self, f.name) is not None]
        return ", ".join(parts) or "no budgets"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f, _ in budget_fields()}


def scored_predictions(split) -> int:
    """How many predictions a validation metric averages over: one per example for a classifier
    (a scalar target), one per target element for a sequence model (each token), leaving out
    targets equal to ``core.outputs.IGNORE_INDEX`` (not scored)."""
    import torch  # here: budgets are parsed before torch is needed

    from slimforge.core.outputs import IGNORE_INDEX

    targets = split.tensors[-1] if isinstance(split, torch.utils.data.TensorDataset) else None
    if targets is not None:
        return int((targets != IGNORE_INDEX).sum()) if not targets.is_floating_point() else targets.numel()
    total = 0
    for _inputs, target in split:
        target = torch.as_tensor(target)
        total += int((target != IGNORE_INDEX).sum()) if not target.is_floating_point() else target.numel()
    return total


def budget_fields() -> list[tuple[dataclasses.Field, dict[str, Any]]]:
    return [(f, f.metadata["budget"]) for f in dataclasses.fields(Budgets)]


def _key(meta: dict[str, Any]) -> str:
    return meta["flag"].removeprefix("--").replace("-", "_")


def budget_keys() -> list[str]:
    """The ``[budgets]`` keys of a config file (and the keyword arguments of ``Budgets.parse``)."""
    return [_key(meta) for _, meta in budget_fields()]


def budget_kinds() -> dict[str, dict[str, Any]]:
    """Per violation kind (``size``, ...): its flag and the ``Budgets`` field holding its limit."""
    return {meta["kind"]: {"flag": meta["flag"], "limit_key": f.name} for f, meta in budget_fields() if meta["kind"]}


def docs_table() -> str:
    """The README's table of budgets (``tests/search/test_settings.py`` keeps it in step)."""
    rows = ["| flag | `[budgets]` key | what it limits |", "|---|---|---|"]
    rows += [f"| `{meta['flag']}` | `{_key(meta)}` | {meta['help']} |" for _, meta in budget_fields()]
    return "\n".join(rows)
