"""The planner: turns define-by-run suggestions into a ``Plan``.

For each family among the enabled techniques it asks which technique (or none) to use, so a plan
holds at most one technique per family; chosen techniques suggest their own configs under their
own name scope, and the steps are ordered by stage.  Recovery training is searched only when a
chosen technique needs it; a search without fine-tuning (``fine_tune=False``) plans only techniques
that need none, so its plans never train.

Composition rules (``Technique.cannot_follow`` / ``cannot_precede``) are honoured by construction:
families are decided in stage order, and a family's choices exclude techniques that conflict
with what is already chosen.  Optuna needs one fixed set of choices per parameter name, so a
restricted choice set gets its own name (``use.quantization[int8_ptq|none]``); the planner
therefore never samples an invalid combination instead of rejecting one after the fact.
"""

from __future__ import annotations

from collections.abc import Iterable

from slimforge.core.errors import ConfigError
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.task import Task
from slimforge.core.technique import (Technique, TechniqueRegistry, family_name, needs_fine_tuning,
                                      retrains_before_sharing)
from slimforge.core.space import Suggester, scoped

# Up to 6 epochs: the search's successive halving (search.objective) stops hopeless trials after
# epoch 1 or 3, so the long end of the range is paid for only by plans that are worth it.
RECOVERY_EPOCHS = (1, 6)
RECOVERY_LR = (1e-4, 3e-3)
BEFORE_SHARING_EPOCHS = (0, 6)  # 0 keeps the one-phase plan: the search decides whether retraining pays


class Planner:
    def __init__(self, registry: TechniqueRegistry, techniques: Iterable[str] | None = None,
                 available: set[str] | None = None, fine_tune: bool = True):
        """``available``: what this search can offer techniques (see ``Technique.requires``);
        None means everything.  Techniques needing more are left out, or refused when named.
        ``fine_tune`` False: a search without fine-tuning, whose plans hold only the techniques
        that need none (``needs_fine_tuning``), so no plan trains; one that does is left out, or
        refused when named."""
        explicit = techniques is not None
        names = list(techniques) if explicit else registry.names()
        if not names:
            raise ConfigError("techniques: at least one technique must be enabled; valid choices: " + ", ".join(registry.names()))
        self.techniques: list[Technique] = [registry.get(name) for name in names]  # raises on unknown names
        self.fine_tune = fine_tune
        if not fine_tune:
            self.techniques = self._one_shot(registry, self.techniques, explicit)
        if available is not None:
            runnable = [t for t in self.techniques if t.requires <= available]
            missing = {t.name: sorted(t.requires - available) for t in self.techniques if t not in runnable}
            if explicit and missing:
                name, needs = next(iter(missing.items()))
                raise ConfigError(f"techniques: {name!r} needs {', '.join(needs)}, which this search does not have")
            self.techniques = runnable
            if not runnable:
                raise ConfigError("techniques: none of the enabled techniques can run here")
        enabled = {t.name for t in self.techniques}
        for technique in self.techniques:
            if explicit and technique.must_precede and not technique.must_precede & enabled:
                raise ConfigError(f"techniques: {technique.name!r} is useful only before one of "
                                  f"{', '.join(sorted(technique.must_precede))}; enable one of them too")
        self.by_family: dict[str, list[Technique]] = {}
        for technique in sorted(self.techniques, key=lambda t: (t.stage, t.name)):
            self.by_family.setdefault(family_name(technique.family), []).append(technique)

    def sample(self, space: Suggester, task: Task, seed: int) -> Plan:
        chosen: list[Technique] = []
        families = list(self.by_family.items())
        for index, (family, members) in enumerate(families):
            later = [t for _, others in families[index + 1:] for t in others]
            allowed = [t for t in members if not self._conflicts(t, chosen, later)]
            owed = self._owed(chosen)
            if owed and any(t.name in owed for t in allowed):
                # An earlier choice is useful only before one of these: this family must pick one.
                allowed = [t for t in allowed if t.name in owed]
                choices, name = [t.name for t in allowed], f"use.{family}[{'|'.join(t.name for t in allowed)}|required]"
            else:
                choices = ["none", *(t.name for t in allowed)]
                name = f"use.{family}" if len(allowed) == len(members) else f"use.{family}[{'|'.join(choices[1:]) or 'none'}]"
            if index == len(families) - 1 and not chosen and allowed:
                # An empty plan is the baseline, which is measured anyway: spend no trial on it.
                choices, name = [t.name for t in allowed], f"use.{family}[required]"
            pick = space.suggest_categorical(name, choices) if len(choices) > 1 else choices[0]
            chosen.extend(t for t in allowed if t.name == pick)
        chosen.sort(key=lambda t: (t.stage, t.name))
        steps = []
        for technique in chosen:
            config = technique.suggest(scoped(space, technique.name), task)
            steps.append(PlanStep(technique.name, technique.config_to_dict(config)))
        recovery = Recovery()
        if any(t.needs_recovery for t in chosen):
            # A technique may need more fine-tuning than the default range (a student trained
            # from a tenth of the teacher): the widest declared range wins, under its own name
            # because Optuna needs one fixed range per parameter name.
            low, high = RECOVERY_EPOCHS
            wanted = [t.recovery_epochs for t in chosen if t.recovery_epochs]
            name = "recovery.epochs"
            if wanted:
                low, high = min(r[0] for r in wanted), max(r[1] for r in wanted)
                name = f"recovery.epochs[{low}-{high}]"
            before_sharing = 0
            if retrains_before_sharing(t.stage for t in chosen):
                before_sharing = space.suggest_int("recovery.before_sharing_epochs", *BEFORE_SHARING_EPOCHS)
            recovery = Recovery(epochs=space.suggest_int(name, low, high),
                                lr=space.suggest_float("recovery.lr", *RECOVERY_LR, log=True),
                                before_sharing_epochs=before_sharing)
        return Plan(steps=tuple(steps), recovery=recovery, seed=seed)

    @staticmethod
    def _one_shot(registry: TechniqueRegistry, techniques: list[Technique], explicit: bool) -> list[Technique]:
        """The techniques a search without fine-tuning may plan."""
        one_shot = [t for t in techniques if not needs_fine_tuning(t)]
        valid = ", ".join(cls.name for cls in registry.classes() if not needs_fine_tuning(cls)) or "(none installed)"
        refused = [t.name for t in techniques if needs_fine_tuning(t)]
        if explicit and refused:
            raise ConfigError(f"techniques: {refused[0]!r} needs fine-tuning, which this search leaves out "
                              f"(--no-finetune / finetune = false); valid choices: {valid}")
        if not one_shot:
            raise ConfigError(f"techniques: none of the enabled techniques works without fine-tuning; valid choices: "
                              f"{valid}")
        return one_shot

    @classmethod
    def _conflicts(cls, candidate: Technique, chosen: list[Technique], later: list[Technique] = ()) -> bool:
        """True when ``candidate`` may not share a plan with the techniques already chosen, or is
        useful only before a technique (``must_precede``) that none of the ``later`` families can
        still add."""
        if candidate.must_follow and not any(t.name in candidate.must_follow for t in chosen):
            return True
        for other in chosen:
            first, second = sorted((other, candidate), key=lambda t: t.stage)
            if type(second).conflicts_with(type(first)):
                return True
        if candidate.must_precede:
            return not any(t.name in candidate.must_precede and not cls._conflicts(t, [*chosen, candidate])
                           for t in later)
        return False

    @staticmethod
    def _owed(chosen: list[Technique]) -> set[str]:
        """The techniques one of which must still come, for a chosen ``must_precede`` technique
        that nothing chosen after it satisfies yet (the intersection when several are owed)."""
        owed: set[str] | None = None
        for index, technique in enumerate(chosen):
            if technique.must_precede and not any(t.name in technique.must_precede for t in chosen[index + 1:]):
                owed = set(technique.must_precede) if owed is None else owed & technique.must_precede
        return owed or set()
