"""Never a bare "no model found": when no trial meets the budgets, summary.json and the printed
result name the closest trials, what each violates and by how much, and which budget to relax."""

from __future__ import annotations

import json

import pytest

import sf_testing_models
from slimforge.app.cli import main
from slimforge.core.measure import Measurements
from slimforge.search.feasibility import closest_to_feasible, describe
from slimforge.search.records import TrialRecord

BUDGETS = {"max_size_bytes": 50_000, "max_latency_ms": 0.5, "min_accuracy": 0.97, "max_accuracy_drop": None}


def record(number, state="complete", *, size=None, latency=None, accuracy=None, violations=None, reason=None):
    m = Measurements(accuracy=accuracy, size_bytes=size, latency_ms=latency) if state == "complete" else None
    return TrialRecord(number=number, state=state, plan={"steps": []}, plan_text=f"plan {number}", measurements=m,
                       violations=violations or {}, failure_reason=reason)


def test_nothing_when_a_trial_is_feasible():
    feasible = record(0, size=40_000, latency=0.4, accuracy=0.98, violations={"size": -10_000})
    feasible.feasible = True
    assert closest_to_feasible([feasible], BUDGETS) is None


def test_closest_complete_trials_first_with_each_violation_and_a_relaxation():
    records = [
        # over on size and accuracy
        record(0, size=90_000, latency=0.3, accuracy=0.95, violations={"size": 40_000, "latency": -0.2, "accuracy": 0.02}),
        # only over on size, by 10%: the closest
        record(1, size=55_000, latency=0.3, accuracy=0.975, violations={"size": 5_000, "latency": -0.2, "accuracy": -0.005}),
        # rejected before training: only its estimated size is known, so it ranks after complete ones
        record(2, "rejected", violations={"size": 1_000}),
        record(3, "failed", reason="TrainingDiverged: recovery training diverged: loss is nan at epoch 1"),
    ]
    closest = closest_to_feasible(records, BUDGETS, baseline_accuracy=0.985)
    assert [c["number"] for c in closest["trials"]] == [1, 0, 2]
    (size,) = closest["trials"][0]["violations"]
    assert size == {"budget": "size", "flag": "--max-size", "limit": 50_000, "measured": 55_000, "over_by": 5_000,
                    "relative": 0.1, "text": "size 55.0 KB > 50.0 KB (over by 5.0 KB, +10%)"}
    assert closest["trials"][1]["text"] == ("accuracy 0.9500 < 0.9700 (short by 2.00 pt); "
                                            "size 90.0 KB > 50.0 KB (over by 40.0 KB, +80%)")
    assert closest["trials"][2]["text"].endswith("(estimated before training; rejected untrained, other budgets not measured)")
    assert closest["suggestion"] == "relax --max-size to 55KB: trial 1 would then meet every budget"
    assert closest["failed"] == 1
    lines = describe(closest)
    assert lines[0] == "no trial met every budget; closest to feasibility:"
    assert lines[-1] == "suggestion: relax --max-size to 55KB: trial 1 would then meet every budget"
    assert "  (1 trial(s) failed: 1x TrainingDiverged: recovery training diverged: loss is nan at epoch 1)" in lines


def test_accuracy_relaxation_also_offers_the_drop_form():
    records = [record(0, size=10, latency=0.1, accuracy=0.9612, violations={"accuracy": 0.0088})]
    closest = closest_to_feasible(records, {"min_accuracy": 0.97}, baseline_accuracy=0.985)
    assert closest["suggestion"] == ("relax --min-accuracy to 0.9612 (or --max-accuracy-drop 2.38pt): "
                                     "trial 0 would then meet every budget")


def test_when_everything_failed_the_suggestion_names_the_reason():
    records = [record(n, "failed", reason="worker process died (exit code -9)") for n in range(3)]
    closest = closest_to_feasible(records, BUDGETS)
    assert closest["trials"] == []
    assert closest["suggestion"] == "no trial completed: 3 failed; most common reason (3x): worker process died (exit code -9)"


@pytest.mark.slow
def test_an_infeasible_search_reports_the_closest_trials(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.toml").write_text(sf_testing_models.task_toml())
    code = main(["search", "--config", "task.toml", "--trials", "3", "--techniques", "int8_ptq,magnitude_pruning",
                 "--max-size", "1KB", "--min-accuracy", "99%", "--out", "out", "--no-tracking", "--no-progress",
                 "--latency-repeats", "3"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pareto"] == []
    closest = summary["closest_to_feasible"]
    assert closest["trials"] and closest["suggestion"].startswith("relax ")
    for trial in closest["trials"]:
        assert trial["violations"] and all(v["over_by"] > 0 for v in trial["violations"])
    assert "no trial met every budget; closest to feasibility:" in out
    assert f"suggestion: {closest['suggestion']}" in out
    assert "no model found" not in out.lower()
