"""The registration floor: Pareto members below it stay on the reported front (summary.json, the
printed table) but are not registered in the Model Registry, so a collapsed, chance-level model
that no budget kept off the front is never registered by default."""

from __future__ import annotations

import json

import pytest

from slimforge.core.errors import ConfigError
from slimforge.core.measure import LatencySettings, Measurements
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search
from slimforge.search.pareto import DEFAULT_REGISTER_MAX_ACCURACY_DROP, registration_floor
from slimforge.search.records import COMPLETE, TrialRecord

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASELINE = 0.98


def _member(accuracy: float) -> TrialRecord:
    return TrialRecord(number=0, state=COMPLETE, plan={}, plan_text="p", feasible=True,
                       measurements=Measurements(accuracy=accuracy, size_bytes=10, latency_ms=0.1))


def test_the_default_floor_is_ten_points_under_the_baseline():
    floor = registration_floor(BASELINE)
    assert DEFAULT_REGISTER_MAX_ACCURACY_DROP == 0.10
    assert floor.min_accuracy == 0.88 and "the default" in floor.rule
    assert floor.why_not_registered(_member(0.88)) is None  # "at least": on the floor is registered
    assert floor.why_not_registered(_member(0.1)) == ("accuracy 0.1000 is below the registration floor 0.8800 "
                                                      "(baseline 0.9800 - 10 pt, the default)")


@pytest.mark.parametrize("budget, expected", [
    (0.5, 0.5),    # a looser accuracy budget: the user asked for members down to it
    (0.97, 0.88),  # a stricter one already keeps weaker members off the front; the default stays
])
def test_an_accuracy_budget_lowers_the_default_floor_only_where_it_is_looser(budget, expected):
    assert registration_floor(BASELINE, budget_min_accuracy=budget).min_accuracy == expected


@pytest.mark.parametrize("kwargs, expected", [
    ({"min_accuracy": 0.5}, 0.5),
    ({"max_accuracy_drop": 0.02}, 0.96),
    ({"max_accuracy_drop": 1.0}, -0.02),  # 100 points: every member is registered
    ({"min_accuracy": 0.5, "max_accuracy_drop": 0.02}, 0.96),  # both: the stricter wins, as with budgets
    ({"min_accuracy": 0.97, "max_accuracy_drop": 0.02}, 0.97),
])
def test_a_floor_the_user_sets_replaces_the_default_and_ignores_the_budget(kwargs, expected):
    floor = registration_floor(BASELINE, budget_min_accuracy=0.3, **kwargs)
    assert floor.min_accuracy == expected and "--register-" in floor.rule


@pytest.mark.parametrize("field, flag", [("register_min_accuracy", "--register-min-accuracy"),
                                         ("register_max_accuracy_drop", "--register-max-accuracy-drop")])
def test_settings_refuse_a_floor_outside_0_and_1(field, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: must be a fraction between 0 and 1, got 1.5$"):
        SearchSettings(**{field: 1.5})


def _registered_trials(uri: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not client.search_registered_models():
        return []
    return sorted(int(v.tags["trial"]) for v in client.search_model_versions("name='tiny-compressed'"))


@pytest.mark.slow
def test_models_below_the_floor_stay_off_the_front(tiny_task, tmp_path, monkeypatch):
    """Seed 0's six trials of the tiny task give near-chance models next to accurate int8 ones (no
    budget makes them infeasible).  They stay in the trial table but off the front, so nothing
    collapsed is registered; resuming the study with the floor lowered puts them on it."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = SearchSettings(trials=6, seed=0, techniques=("int8_ptq", "magnitude_pruning"), study="floor",
                              out_dir=tmp_path / "out", tracking_uri=uri, progress=False,
                              latency=LatencySettings(warmup=1, repeats=3))
    result = run_search(tiny_task, Budgets(), settings)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    floor = summary["registration_floor"]
    assert floor["min_accuracy"] == round(result.baseline.accuracy - 0.10, 6)
    below = [t for t in summary["trials"] if t["state"] == "complete"
             and t["measurements"]["accuracy"] < floor["min_accuracy"]]
    assert below, "seed 0 no longer gives a model below the floor: pick a seed that does"
    assert summary["pareto"] and all(m["measurements"]["accuracy"] >= floor["min_accuracy"]
                                     for m in summary["pareto"])
    for member in summary["pareto"]:
        assert member["not_registered"] is None and "model_version" in member["links"]
    assert _registered_trials(uri) == sorted(m["number"] for m in summary["pareto"])

    lowered = run_search(tiny_task, Budgets(), SearchSettings(**{**settings.__dict__, "register_min_accuracy": 0.0}))
    assert {t["number"] for t in below} & {m.number for m in lowered.pareto}
    assert all(m.not_registered is None for m in lowered.pareto)
    assert _registered_trials(uri) == sorted(m.number for m in lowered.pareto)  # the others, once each
