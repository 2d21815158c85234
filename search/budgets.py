"""Budgets: hard limits the sampler sees as constraints.

A violation is ``measured - limit`` in the limit's own unit (bytes, ms, metric points); a trial is
feasible when every violation is <= 0.  The sampler gets violations divided by the limit, so a
1 KB overshoot of a 60 KB budget and a 0.01 ms overshoot of 0.5 ms weigh alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from slimforge.core.errors import ConfigError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, field: str = "--max-size") -> int:
    """``"150KB"`` -> 150000, ``"1.5MiB"`` -> 1572864, ``60000`` -> 60000 (KB = 1000 bytes)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
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


@dataclass(frozen=True, kw_only=True)
class Budgets:
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None
    min_accuracy: float | None = None
    # Relative floor: baseline validation metric minus this.  ``resolve`` turns it into an
    # absolute ``min_accuracy`` once the baseline is measured.
    max_accuracy_drop: float | None = None

    @classmethod
    def parse(cls, *, max_size=None, max_latency=None, min_accuracy=None, max_accuracy_drop=None,
              fields: dict[str, str] | None = None) -> Budgets:
        """``fields`` names where a value came from in error messages (default: its flag, e.g.
        ``{"max_size": "[budgets] max_size"}`` for a value read from a config file)."""
        name = {"max_size": "--max-size", "max_latency": "--max-latency", "min_accuracy": "--min-accuracy",
                "max_accuracy_drop": "--max-accuracy-drop"} | (fields or {})
        return cls(
            max_size_bytes=None if max_size is None else parse_size(max_size, name["max_size"]),
            max_latency_ms=None if max_latency is None else parse_positive_float(max_latency, name["max_latency"]),
            min_accuracy=None if min_accuracy is None else parse_accuracy(min_accuracy, name["min_accuracy"]),
            max_accuracy_drop=(None if max_accuracy_drop is None
                               else parse_accuracy_drop(max_accuracy_drop, name["max_accuracy_drop"])),
        )

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
        return any(v is not None for v in (self.max_size_bytes, self.max_latency_ms, self.min_accuracy,
                                           self.max_accuracy_drop))

    def violations(self, *, size_bytes=None, latency_ms=None, accuracy=None) -> dict[str, float]:
        """Absolute violations (measured - limit) of the budgets whose measurement is known."""
        out = {}
        if self.max_size_bytes is not None and size_bytes is not None:
            out["size"] = float(size_bytes - self.max_size_bytes)
        if self.max_latency_ms is not None and latency_ms is not None:
            out["latency"] = float(latency_ms - self.max_latency_ms)
        if self.min_accuracy is not None and accuracy is not None:
            out["accuracy"] = float(self.min_accuracy - accuracy)
        return out

    def normalized(self, violations: dict[str, float]) -> dict[str, float]:
        """Violations relative to their limit, for the sampler."""
        scale = {"size": self.max_size_bytes, "latency": self.max_latency_ms, "accuracy": self.min_accuracy}
        return {k: v / (scale[k] or 1.0) for k, v in violations.items()}

    @staticmethod
    def feasible(violations: dict[str, float]) -> bool:
        return all(v <= 0 for v in violations.values())

    def describe(self) -> str:
        parts = []
        if self.max_size_bytes is not None:
            parts.append(f"size <= {self.max_size_bytes / 1000:.1f} KB")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.min_accuracy is not None:
            parts.append(f"accuracy >= {self.min_accuracy:.4f}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop * 100:g} pt")
        return ", ".join(parts) or "no budgets"

    def to_dict(self) -> dict:
        return {"max_size_bytes": self.max_size_bytes, "max_latency_ms": self.max_latency_ms,
                "min_accuracy": self.min_accuracy, "max_accuracy_drop": self.max_accuracy_drop}
