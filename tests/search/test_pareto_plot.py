"""pareto.png / pareto.html: the legend tells registered, below-floor and dominated trials apart,
and the registration floor and budgets are drawn."""

from __future__ import annotations

import re
import sys

import pytest

from slimforge.core.measure import Measurements
from slimforge.search import reports
from slimforge.search.records import COMPLETE, FAILED, SearchResult, TrialRecord


def _record(number, accuracy, size, latency, feasible=True, not_registered=None, state=COMPLETE):
    return TrialRecord(number=number, state=state, plan={}, plan_text=f"plan-{number}", feasible=feasible,
                       measurements=Measurements(accuracy, size, latency) if state == COMPLETE else None,
                       not_registered=not_registered)


def _result(tracking=True):
    trials = [_record(0, 0.97, 50_000, 0.30),                                   # front, registered
              _record(1, 0.60, 5_000, 0.20, not_registered="below the floor"),  # front, below the floor
              _record(2, 0.90, 60_000, 0.40),                                   # dominated by 0
              _record(3, 0.99, 900_000, 0.50, feasible=False),                  # breaks the size budget
              _record(4, 0, 0, 0, state=FAILED),
              _record(5, 0.30, 2_000, 0.20)]                                     # collapsed: off the front
    return SearchResult(study_name="s", task="t", budgets={"max_size_bytes": 100_000, "min_accuracy": 0.5},
                        baseline=Measurements(0.98, 1_000_000, 0.4), baseline_test=Measurements(0.97, 1_000_000, 0.4),
                        trials=trials, pareto=[trials[0], trials[1]], settings={"tracking": tracking},
                        registration_floor={"min_accuracy": 0.88, "rule": "baseline - 10 pt"})


def test_groups_put_every_complete_trial_in_exactly_one_legend_entry():
    groups = {label: [r.number for r in records] for label, records in reports.plot_groups(_result())}
    assert groups == {"Pareto, registered": [0], "Pareto, below the registration floor": [1],
                      "below the registration floor (off the front)": [5], "dominated (feasible)": [2],
                      "infeasible": [3]}
    untracked = [label for label, _ in reports.plot_groups(_result(tracking=False))]
    assert untracked[0] == "Pareto, at or above the floor (tracking off: not registered)"


def test_png_legend_names_the_groups_floor_and_budgets(tmp_path, monkeypatch):
    import matplotlib.figure

    legends = []
    real = matplotlib.figure.Figure.legend
    monkeypatch.setattr(matplotlib.figure.Figure, "legend",
                        lambda self, handles, labels, **kw: legends.append(list(labels)) or real(self, handles, labels, **kw))
    reports.write_pareto_plot(_result(), tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert legends == [["Pareto, registered", "Pareto, below the registration floor",
                        "below the registration floor (off the front)", "dominated (feasible)", "infeasible", "uncompressed", "size budget", "accuracy budget", "registration floor"]]


def test_html_holds_the_same_groups_with_hover_text(tmp_path):
    pytest.importorskip("plotly")
    path = reports.write_pareto_html(_result(), tmp_path / "pareto.html")
    html = path.read_text()
    names = set(re.findall(r'"name":"([^"]+)"', html))
    assert {"Pareto, registered", "Pareto, below the registration floor", "dominated (feasible)", "infeasible",
            "uncompressed"} <= names
    assert "registration floor" in html and "accuracy budget" in html
    assert "plan-1" in html and "acc 0.6000, 5.0 KB, 0.200 ms" in html  # the hover text


def test_without_plotly_the_html_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    reports.write_reports(_result(), tmp_path)
    assert (tmp_path / "pareto.png").exists() and not (tmp_path / "pareto.html").exists()
    assert "pareto.html not written: the interactive plot needs plotly (pip install 'slimforge[plot]')" in capsys.readouterr().err
