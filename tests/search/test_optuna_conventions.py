"""The study is stored the way other Optuna tools read it: named objectives, constraints in the
``constraints`` system attr (``study.best_trials`` and optuna-dashboard honour them), user attrs
as plain JSON values; and a study written the old way (attrs as JSON text, constraints as
``constraints:<kind>`` keys) still reads and resumes."""

from __future__ import annotations

import json
import time

import optuna

from slimforge.core.measure import Measurements
from slimforge.search.backends.optuna import CONSTRAINTS_ATTR, PLAN_ATTR, RECORD_ATTR, OptunaBackend
from slimforge.search.budgets import Budgets
from slimforge.search.records import COMPLETE, FAILED, REJECTED, TrialRecord

BUDGETS = Budgets(max_size_bytes=10_000, min_accuracy=0.9)


def _backend(tmp_path, budgets=BUDGETS, study="s") -> OptunaBackend:
    return OptunaBackend(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name=study, seed=0, budgets=budgets)


def _complete(number: int, accuracy: float, size: int, latency: float = 1.0) -> TrialRecord:
    violations = BUDGETS.violations(accuracy=accuracy, size_bytes=size, latency_ms=latency)
    return TrialRecord(number=number, state=COMPLETE, plan={"steps": []}, plan_text=f"plan {number}",
                       measurements=Measurements(accuracy=accuracy, size_bytes=size, latency_ms=latency),
                       violations=violations, feasible=Budgets.feasible(violations))


def _tell(backend: OptunaBackend, record: TrialRecord) -> None:
    trial = backend.ask()
    backend.started(trial, record.plan, record.plan_text)
    backend.tell(trial, record)


def test_best_trials_leaves_out_infeasible_trials(tmp_path):
    backend = _backend(tmp_path)
    # Trial 0 dominates on every objective but breaks the size budget; trial 1 is feasible.
    _tell(backend, _complete(0, accuracy=0.99, size=20_000, latency=0.5))
    _tell(backend, _complete(1, accuracy=0.95, size=9_000, latency=1.0))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.number for t in study.best_trials] == [1]
    # What optuna-dashboard reads: one list per trial, in the study's constraint_names order.
    assert study.user_attrs["constraint_names"] == ["size", "accuracy"]
    assert study.trials[0].system_attrs[CONSTRAINTS_ATTR] == [1.0, (0.9 - 0.99) / 0.9]
    assert all(c <= 0 for c in study.trials[1].system_attrs[CONSTRAINTS_ATTR])


def test_a_rejected_plan_is_an_infeasible_pruned_trial(tmp_path):
    backend = _backend(tmp_path)
    record = TrialRecord(number=0, state=REJECTED, plan={}, plan_text="big", violations={"size": 5_000.0})
    _tell(backend, record)
    trial = backend.study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.system_attrs[CONSTRAINTS_ATTR] == [0.5, 0.0]  # accuracy was never measured
    assert trial.user_attrs["feasible"] is False


def test_metric_names_and_plain_attrs(tmp_path):
    backend = _backend(tmp_path)
    _tell(backend, _complete(0, accuracy=0.95, size=9_000))
    _tell(backend, TrialRecord(number=1, state=FAILED, plan={}, plan_text="p", failure_reason="boom"))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["accuracy", "size_bytes", "latency_ms"]
    attrs = study.trials[0].user_attrs
    assert isinstance(attrs[RECORD_ATTR], dict) and attrs[RECORD_ATTR]["measurements"]["size_bytes"] == 9_000
    assert attrs["plan"] == "plan 0" and attrs["state"] == "complete" and attrs["feasible"] is True
    assert not any(isinstance(v, str) and v.lstrip().startswith("{") for v in attrs.values())
    assert study.trials[1].user_attrs["state"] == "failed"
    assert study.trials[1].user_attrs["failure_reason"] == "boom"


def test_a_study_written_the_old_way_reads_and_resumes(tmp_path, monkeypatch):
    """Before: the record and plan as JSON text, constraints through ``Trial.set_constraint``, no
    metric names; one trial finished and one left RUNNING by a kill.  An old trial has no owner
    and no heartbeat, so a resume closes it once the grace period has passed (here: 1 s)."""
    monkeypatch.setattr("slimforge.search.study.GRACE_S", 1)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize", "minimize"])
    done = study.ask()
    old = _complete(0, accuracy=0.95, size=9_000)
    done.set_user_attr(RECORD_ATTR, json.dumps(old.to_dict()))
    done.set_constraint("size", -0.1)
    study.tell(done, [0.95, 9_000, 1.0])
    running = study.ask()
    running.set_user_attr(PLAN_ATTR, json.dumps({"plan": {"steps": []}, "text": "old plan"}))
    time.sleep(1.2)  # past the grace period: the killed process's trial is stale

    backend = _backend(tmp_path)
    assert backend.records()[0]["measurements"]["size_bytes"] == 9_000
    assert backend.study.metric_names == ["accuracy", "size_bytes", "latency_ms"]
    closed = backend.study.trials[1]
    assert closed.state == optuna.trial.TrialState.FAIL and closed.user_attrs[RECORD_ATTR]["plan_text"] == "old plan"
    _tell(backend, _complete(2, accuracy=0.99, size=20_000))  # new format next to the old one
    assert [t.number for t in backend.study.best_trials] == [0]
