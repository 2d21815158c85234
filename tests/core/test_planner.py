"""The planner: suggestions -> a Plan with at most one technique per family, ordered by stage."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from slimforge.core.errors import ConfigError, UnknownNameError
from slimforge.core.plan import Plan, Recovery
from slimforge.core.technique import Family, Stage, Technique, TechniqueRegistry
from slimforge.plugins.pruning.magnitude import MagnitudePruning
from slimforge.plugins.quantization.int8_ptq import Int8PTQ
from slimforge.core.planner import BEFORE_SHARING_EPOCHS, RECOVERY_EPOCHS, RECOVERY_LR, Planner
from slimforge.core.space import FixedSuggester


@dataclass(frozen=True, kw_only=True)
class _LevelConfig:
    level: int = 1


def _technique(name, family, stage, **attrs):
    def suggest(self, space, task):
        return _LevelConfig(level=space.suggest_int("level", 1, 4))

    return type(name, (Technique,), {"name": name, "family": family, "stage": stage, "Config": _LevelConfig,
                                     "suggest": suggest, **attrs})


OtherPruning = _technique("other_pruning", Family.PRUNING, Stage.PRUNING, needs_recovery=True)
Sparsify = _technique("sparsify", Family.SPARSITY, Stage.SPARSITY)
# Declared first in the list below but runs last: order must come from the stage.
LateSharing = _technique("late_sharing", Family.SHARING, Stage.SHARING)


def _registry(*classes) -> TechniqueRegistry:
    registry = TechniqueRegistry()
    for cls in classes or (MagnitudePruning, Int8PTQ, OtherPruning, Sparsify, LateSharing):
        registry.add(cls)
    return registry


class RecordingSuggester(FixedSuggester):
    """FixedSuggester that also remembers the choices offered for each categorical."""

    def __init__(self, values=None, seed=0):
        super().__init__(values, seed)
        self.choices: dict[str, list] = {}

    def suggest_categorical(self, name, choices):
        self.choices[name] = list(choices)
        return super().suggest_categorical(name, choices)


def test_at_most_one_technique_per_family_and_steps_in_stage_order(tiny_task):
    registry = _registry()
    planner = Planner(registry, ["late_sharing", "int8_ptq", "sparsify", "other_pruning", "magnitude_pruning"])
    seen_names = set()
    for seed in range(40):
        plan = planner.sample(FixedSuggester(seed=seed), tiny_task, seed=seed)
        families = [registry.get(name).family for name in plan.technique_names]
        assert len(families) == len(set(families)), plan.describe()
        stages = [registry.get(name).stage for name in plan.technique_names]
        assert stages == sorted(stages), plan.describe()
        assert plan.technique_names, "an empty plan is the baseline; the planner never spends a trial on it"
        seen_names.update(plan.technique_names)
    # the seeds above reach every technique, including both members of the pruning family
    assert seen_names == set(registry.names())


def test_one_categorical_per_family_offers_none_and_its_members(tiny_task):
    planner = Planner(_registry(), ["magnitude_pruning", "other_pruning", "int8_ptq"])
    space = RecordingSuggester({"use.pruning": "other_pruning"})
    planner.sample(space, tiny_task, seed=0)
    assert space.choices["use.pruning"] == ["none", "magnitude_pruning", "other_pruning"]
    assert space.choices["use.quantization"] == ["none", "int8_ptq"]


def test_order_comes_from_stage_not_from_the_order_given(tiny_task):
    planner = Planner(_registry(), ["late_sharing", "int8_ptq", "magnitude_pruning"])
    space = FixedSuggester({"use.pruning": "magnitude_pruning", "use.sharing": "late_sharing",
                            "use.quantization": "int8_ptq"})
    plan = planner.sample(space, tiny_task, seed=3)
    assert plan.technique_names == ["magnitude_pruning", "late_sharing", "int8_ptq"]
    assert plan.seed == 3


def test_sampling_is_deterministic_under_a_fixed_suggester(tiny_task):
    planner = Planner(_registry(MagnitudePruning, Int8PTQ))
    plans = [planner.sample(FixedSuggester(seed=seed), tiny_task, seed=0).to_json() for seed in (5, 5, 6, 7, 8)]
    assert plans[0] == plans[1]
    assert len(set(plans[1:])) > 1  # and the seed matters


def test_techniques_suggest_under_their_own_scope(tiny_task):
    planner = Planner(_registry(MagnitudePruning, Int8PTQ))
    space = FixedSuggester({"use.pruning": "magnitude_pruning", "use.quantization": "int8_ptq",
                            "magnitude_pruning.density.fc1": 0.25, "int8_ptq.observer": "minmax"}, seed=0)
    plan = planner.sample(space, tiny_task, seed=0)
    pruning, ptq = plan.steps
    assert pruning.config["sparsity"]["fc1"] == 0.75
    assert set(pruning.config["sparsity"]) == {"conv", "fc1", "fc2"}  # every weight layer of the teacher
    assert ptq.config["observer"] == "minmax"
    assert {"magnitude_pruning.density.conv", "magnitude_pruning.density.fc2",
            "int8_ptq.calibration_batches"} <= set(space.asked)


def test_recovery_is_searched_only_when_a_chosen_technique_needs_it(tiny_task):
    planner = Planner(_registry(MagnitudePruning, Int8PTQ))
    space = FixedSuggester({"use.pruning": "none", "use.quantization": "int8_ptq"})
    plan = planner.sample(space, tiny_task, seed=0)
    assert plan.technique_names == ["int8_ptq"]
    assert plan.recovery == Recovery()
    assert plan.recovery.epochs == 0
    assert not any(name.startswith("recovery.") for name in space.asked)

    space = FixedSuggester({"use.pruning": "magnitude_pruning", "use.quantization": "none"}, seed=1)
    plan = planner.sample(space, tiny_task, seed=0)
    assert plan.technique_names == ["magnitude_pruning"]
    assert RECOVERY_EPOCHS[0] <= plan.recovery.epochs <= RECOVERY_EPOCHS[1]
    assert RECOVERY_LR[0] <= plan.recovery.lr <= RECOVERY_LR[1]
    assert (space.asked["recovery.epochs"], space.asked["recovery.lr"]) == (plan.recovery.epochs, plan.recovery.lr)


def test_retraining_before_sharing_is_searched_only_when_sharing_follows_pruning(tiny_task):
    NeedySharing = _technique("needy_sharing", Family.SHARING, Stage.SHARING, needs_recovery=True)
    planner = Planner(_registry(MagnitudePruning, NeedySharing))
    space = FixedSuggester({"use.pruning": "magnitude_pruning", "use.sharing": "needy_sharing",
                            "recovery.before_sharing_epochs": 2})
    plan = planner.sample(space, tiny_task, seed=0)
    assert plan.technique_names == ["magnitude_pruning", "needy_sharing"]
    assert plan.recovery.before_sharing_epochs == 2
    assert BEFORE_SHARING_EPOCHS[0] == 0  # the search may keep the one-phase plan
    assert "retrain 2ep before sharing" in plan.describe()
    assert Plan.from_json(plan.to_json()) == plan

    for chosen in ({"use.pruning": "none", "use.sharing": "needy_sharing"},
                   {"use.pruning": "magnitude_pruning", "use.sharing": "none"}):
        space = FixedSuggester(chosen)
        plan = planner.sample(space, tiny_task, seed=0)
        assert plan.recovery.before_sharing_epochs == 0
        assert "recovery.before_sharing_epochs" not in space.asked
        assert "before_sharing_epochs" not in plan.to_dict()["recovery"]  # old plans stay byte-identical


def test_composition_rules_are_never_violated(tiny_task):
    Marker = _technique("marker", Family.SPARSITY, Stage.SPARSITY, cannot_precede=frozenset({"int8_ptq"}))
    registry = _registry(MagnitudePruning, Int8PTQ, Marker)
    planner = Planner(registry)
    combos = set()
    for seed in range(30):
        names = planner.sample(FixedSuggester(seed=seed), tiny_task, seed=0).technique_names
        assert not {"marker", "int8_ptq"} <= set(names)
        combos.add(tuple(names))
    assert ("marker",) in combos and ("int8_ptq",) in combos


def test_a_technique_useful_only_before_another_is_never_planned_without_it(tiny_task):
    """``must_precede``: activation-aware scaling alone compresses nothing; the planner samples it
    only with a quantizer after it, and refuses it when named without one."""
    Scaling = _technique("scaling", "scaling", Stage.SCALING, must_precede=frozenset({"int8_ptq"}))
    planner = Planner(_registry(MagnitudePruning, Int8PTQ, Scaling))
    combos = set()
    for seed in range(40):
        suggester = RecordingSuggester(seed=seed)
        names = planner.sample(suggester, tiny_task, seed=0).technique_names
        if "scaling" in names:
            assert names[-1] == "int8_ptq"
            # the quantization family was not asked: its one remaining choice was forced
            assert not any(name.startswith("use.quantization") for name in suggester.choices), suggester.choices
        combos.add(tuple(names))
    assert {("scaling", "int8_ptq"), ("magnitude_pruning", "scaling", "int8_ptq"), ("int8_ptq",)} <= combos
    # with its quantizer left out, it is never offered ...
    assert all("scaling" not in Planner(_registry(MagnitudePruning, Scaling), None).sample(
        FixedSuggester(seed=seed), tiny_task, seed=0).technique_names for seed in range(10))
    # ... and naming it alone says what it needs
    with pytest.raises(ConfigError, match=re.escape(
            "techniques: 'scaling' is useful only before one of int8_ptq; enable one of them too")):
        Planner(_registry(MagnitudePruning, Int8PTQ, Scaling), ["magnitude_pruning", "scaling"])


def test_plans_round_trip_through_json(tiny_task):
    planner = Planner(_registry(MagnitudePruning, Int8PTQ))
    for seed in range(5):
        plan = planner.sample(FixedSuggester(seed=seed), tiny_task, seed=seed)
        assert Plan.from_json(plan.to_json()) == plan


def test_unknown_technique_name_lists_valid_ones():
    with pytest.raises(UnknownNameError, match=re.escape(
            "technique: unknown 'int4_ptq'; valid choices: int8_ptq, magnitude_pruning")):
        Planner(_registry(MagnitudePruning, Int8PTQ), ["magnitude_pruning", "int4_ptq"])


def test_no_techniques_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape(
            "techniques: at least one technique must be enabled; valid choices: int8_ptq, magnitude_pruning")):
        Planner(_registry(MagnitudePruning, Int8PTQ), [])


def test_a_resumed_study_does_not_resample_the_plans_of_its_first_trials(tiny_task, tmp_path):
    """A seeded sampler restarts its random stream in every process; on resume the start-up
    (random) trials must continue the search, not repeat the plans already measured."""
    from slimforge.core.measure import Measurements
    from slimforge.search.backends.optuna import OptunaBackend
    from slimforge.search.budgets import Budgets
    from slimforge.search.records import COMPLETE, TrialRecord
    from slimforge.search.space import OptunaSuggester

    planner = Planner(_registry(MagnitudePruning, Int8PTQ))

    def evaluate(space, number):
        plan = planner.sample(space, tiny_task, seed=number)
        return TrialRecord(number, COMPLETE, plan.to_dict(), plan.describe(), feasible=True,
                           measurements=Measurements(accuracy=0.5, size_bytes=1000 + number, latency_ms=1.0))

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def run(trials):
        backend = OptunaBackend(storage=storage, study_name="resume", seed=0, budgets=Budgets())
        for _ in range(trials):
            trial = backend.ask()
            backend.tell(trial, evaluate(OptunaSuggester(trial), trial.number))
        return backend

    run(3)
    backend = run(3)
    params = [trial.params for trial in backend.study.get_trials(deepcopy=False)]
    assert len(params) == 6
    assert backend.finished_count() == 6
    assert [r["number"] for r in backend.records()] == list(range(6))
    for first, resumed in zip(params[:3], params[3:]):
        assert first != resumed
