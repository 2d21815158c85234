"""Plans: ordered (technique, config) steps plus recovery-training settings and a seed.

A plan is what a trial reproduces from, so it must round-trip through JSON exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from slimforge.core.errors import ConfigError


@dataclass(frozen=True)
class PlanStep:
    technique: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recovery:
    """Fine-tuning after the structural stages.  ``epochs == 0`` means none.

    ``before_sharing_epochs`` retrains the pruned (or sparsified, factorized, student) model before
    a weight-sharing step clusters or merges its weights, as Deep Compression does (prune ->
    retrain -> cluster -> retrain): centroids drawn from retrained weights lose less.  That first
    phase trains with the task loss, holding pruning masks; distillation losses join in the main
    phase (tried in the first phase too: 92 % pruning -> k-means with KL distillation at alpha 0.3
    scored 0.919 val against 0.930 / 0.927 without it, over two seeds).  Planned only when a plan
    has a sharing step after another structural one."""

    epochs: int = 0
    lr: float = 1e-3
    before_sharing_epochs: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"recovery.epochs: must be >= 0, got {self.epochs}")
        if self.before_sharing_epochs < 0:
            raise ConfigError(f"recovery.before_sharing_epochs: must be >= 0, got {self.before_sharing_epochs}")
        if not self.lr > 0:
            raise ConfigError(f"recovery.lr: must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlanStep, ...] = ()
    recovery: Recovery = Recovery()
    seed: int = 0

    @property
    def technique_names(self) -> list[str]:
        return [step.technique for step in self.steps]

    def describe(self) -> str:
        """Short human-readable form, e.g. ``magnitude_pruning(sparsity=0.9) > int8_ptq``."""
        if not self.steps:
            return "baseline (no compression)"
        parts = []
        for step in self.steps:
            args = ",".join(f"{k}={_short(v)}" for k, v in step.config.items())
            parts.append(f"{step.technique}({args})" if args else step.technique)
        text = " > ".join(parts)
        if self.recovery.before_sharing_epochs:
            text += f" + retrain {self.recovery.before_sharing_epochs}ep before sharing"
        if self.recovery.epochs:
            text += f" + finetune {self.recovery.epochs}ep"
        return text

    def to_dict(self) -> dict[str, Any]:
        recovery = {"epochs": self.recovery.epochs, "lr": self.recovery.lr}
        if self.recovery.before_sharing_epochs:  # absent when 0: plans from before the field stay byte-identical
            recovery["before_sharing_epochs"] = self.recovery.before_sharing_epochs
        return {
            "steps": [{"technique": s.technique, "config": s.config} for s in self.steps],
            "recovery": recovery,
            "seed": self.seed,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        try:
            steps = tuple(PlanStep(s["technique"], dict(s.get("config", {}))) for s in data.get("steps", []))
            recovery = Recovery(**data.get("recovery", {}))
            return cls(steps=steps, recovery=recovery, seed=int(data.get("seed", 0)))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"plan: malformed ({exc})") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "/".join(f"{k}:{_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "/".join(_short(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)
