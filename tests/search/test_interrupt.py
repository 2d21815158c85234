"""Ctrl-C during a trial: the trial is closed FAIL with the reason "interrupted" right away (no
RUNNING trial left for a resume to find), the trackers see it like any trial, and the search
writes a partial summary.json and report before the KeyboardInterrupt goes on up; resuming the
study runs the rest."""

from __future__ import annotations

import json

import optuna
import pytest

from slimforge.core.hookspecs import hookimpl
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.search.backends.optuna import INTERRUPTED
from slimforge.search.budgets import Budgets
from slimforge.search.engine import run_search
from slimforge.search.objective import TrialRunner
from slimforge.search.settings import SearchSettings


class Seen:
    """A tracker-like plugin: the records trackers get."""

    def __init__(self):
        self.records = []

    @hookimpl
    def slimforge_trial_end(self, record):
        self.records.append(record)


@pytest.mark.slow  # two small searches (the interrupted one and its resume)
def test_ctrl_c_during_a_trial_fails_it_and_writes_a_partial_summary(tiny_task, tmp_path, monkeypatch, capsys):
    settings = SearchSettings(trials=3, seed=5, techniques=("int8_ptq",), study="ctrl-c", out_dir=tmp_path / "out",
                              tracking=False, progress=False, latency=LatencySettings(warmup=1, repeats=3))
    measure = TrialRunner.measure

    def measure_then_interrupt(self, artifact, split):  # the key is pressed while trial 1 is measured
        if "trial-0001" in str(artifact):
            raise KeyboardInterrupt
        return measure(self, artifact, split)

    monkeypatch.setattr(TrialRunner, "measure", measure_then_interrupt)
    seen = Seen()
    plugins = Plugins(load_entry_points=False)
    plugins.register(seen, name="seen")
    with pytest.raises(KeyboardInterrupt):
        run_search(tiny_task, Budgets(), settings, plugins=plugins)

    study = optuna.load_study(study_name="ctrl-c", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["failure_reason"] == INTERRUPTED
    assert [(r.number, r.state, r.failure_reason) for r in seen.records] == [(0, "complete", None),
                                                                              (1, "failed", INTERRUPTED)]
    assert seen.records[1].plan_text.startswith("int8_ptq") and seen.records[1].duration_s > 0

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["partial"]["stopped_by"] == "KeyboardInterrupt (Ctrl-C)"
    assert [(t["number"], t["state"]) for t in summary["trials"]] == [(0, "complete"), (1, "failed")]
    assert [m["number"] for m in summary["pareto"]] == [0] and summary["pareto"][0]["test_measurements"] is None
    assert "before registration" in summary["pareto"][0]["not_registered"]
    assert (tmp_path / "out" / "trials.csv").read_text().count("\n") == 3  # header + 2 trials
    assert "interrupted: partial summary of 2 recorded trial(s)" in capsys.readouterr().err

    # Resuming finds nothing to clean up and runs the missing trial.
    monkeypatch.setattr(TrialRunner, "measure", measure)
    result = run_search(tiny_task, Budgets(), settings, plugins=Plugins(load_entry_points=False))
    assert [r.state for r in result.trials] == ["complete", "failed", "complete"]
    assert "partial" not in json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "was stopped while this trial ran" not in capsys.readouterr().err.replace(INTERRUPTED, "")
