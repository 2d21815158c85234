"""What the terminal shows while a search runs: on a terminal, tqdm's bar with a live line for the
running trial (phase, epoch, plan); anywhere else (a log, CI, a pipe) one plain line per event and
never a carriage return; the printed Pareto table cut to the terminal's width."""

from __future__ import annotations

import io
from types import SimpleNamespace

from slimforge.app.cli import format_result
from slimforge.core.measure import LatencySettings, Measurements
from slimforge.search.budgets import Budgets
from slimforge.search.engine import run_search
from slimforge.search.loop import Progress
from slimforge.search.records import COMPLETE, SearchResult, TrialRecord
from slimforge.search.settings import SearchSettings

BASELINE = Measurements(accuracy=0.9, size_bytes=10_000, latency_ms=0.1)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(number: int, plan_text: str = "int8_ptq") -> TrialRecord:
    return TrialRecord(number=number, state=COMPLETE, plan={}, plan_text=plan_text, feasible=True,
                       measurements=Measurements(accuracy=0.85, size_bytes=2_500, latency_ms=0.05),
                       test_measurements=Measurements(accuracy=0.84, size_bytes=2_500, latency_ms=0.05))


def _progress(stream, records: list[TrialRecord], progress: bool = True) -> Progress:
    ctx = SimpleNamespace(settings=SimpleNamespace(trials=2, progress=progress), baseline=BASELINE,
                          runner=SimpleNamespace(history=[]),
                          backend=SimpleNamespace(records=lambda: [r.to_dict() for r in records]))
    return Progress(ctx, 0, stream=stream)


def _events(progress: Progress, records: list[TrialRecord]) -> None:
    progress.started(0, "magnitude_pruning(0.9) > int8_ptq")
    progress.phase(0, "fine-tuning", epochs=3)
    progress.phase(0, "fine-tuning", epoch=1, epochs=3, score=0.8123)
    records.append(_record(0))
    progress.finished(records[0])
    progress.close()


def test_not_a_terminal_gets_one_plain_line_per_event():
    stream, records = io.StringIO(), []
    _events(_progress(stream, records), records)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [
        "trial 0: started: magnitude_pruning(0.9) > int8_ptq",
        "trial 0: fine-tuning (3 epochs)",
        "trial 0: fine-tuning epoch 1/3, val 0.8123",
        "trial 0: complete, acc 0.8500, 2.5 KB, 0.050 ms, feasible [1/2] done 1, failed 0, rejected 0 | HV "
        f"{_hypervolume(records)} | best feasible: acc 0.8500, 2.5 KB, 0.050 ms",
    ]


def _hypervolume(records) -> str:
    from slimforge.search.reports import search_summary

    return f"{search_summary(records, BASELINE)['hypervolume']:.4f}"


def test_a_terminal_gets_the_bar_and_a_live_line_with_the_trials_phase():
    stream, records = _Terminal(), []
    progress = _progress(stream, records)
    assert progress.mode == "bar"
    progress.started(0, "magnitude_pruning(0.9) > int8_ptq")
    progress.phase(0, "fine-tuning", epoch=2, epochs=3, score=0.8123)
    assert "trial 0: fine-tuning epoch 2/3, val 0.8123 | magnitude_pruning(0.9) > int8_ptq" in stream.getvalue()
    records.append(_record(0))
    progress.finished(records[0])
    progress.close()
    assert "\r" in stream.getvalue() and "1/2" in stream.getvalue()  # tqdm redraws in place


def test_no_progress_prints_nothing():
    stream, records = io.StringIO(), []
    _events(_progress(stream, records, progress=False), records)
    assert stream.getvalue() == ""


def test_a_search_logged_to_a_file_has_no_carriage_returns(tiny_task, tmp_path, capsys):
    """A real search with the progress bar on, its stderr captured (not a terminal)."""
    settings = SearchSettings(trials=2, seed=3, techniques=("int8_ptq",), study="plain", out_dir=tmp_path / "out",
                              tracking=False, latency=LatencySettings(warmup=1, repeats=3))
    run_search(tiny_task, Budgets(), settings)
    err = capsys.readouterr().err
    assert "\r" not in err
    for number in (0, 1):
        assert f"trial {number}: started: int8_ptq" in err
        assert f"trial {number}: complete, acc " in err


def _result(plan_text: str) -> SearchResult:
    member = _record(3, plan_text)
    member.not_registered = "below the floor"
    return SearchResult(study_name="s", task="tiny", budgets={}, baseline=BASELINE, baseline_test=BASELINE,
                        trials=[member], pareto=[member],
                        registration_floor={"min_accuracy": 0.9, "rule": "baseline 0.9000 - 10 pt, the default"})


def test_the_pareto_table_fits_the_terminal_and_summary_json_keeps_the_whole_plan():
    plan = " > ".join(f"technique_{i}(knob={i}.123456)" for i in range(12))
    table = format_result(_result(plan), width=100).splitlines()
    (row,) = [line for line in table if line.startswith("    3 ")]
    assert len(row) < 100 and row.endswith("...") and plan.startswith(row.split("floor  ")[1][:-3])
    assert "(plans cut to the terminal's width; whole plans in summary.json, pareto[].plan_text)" in table
    # Not a terminal (width 0): whole plans, as a log wants them.
    assert any(line.endswith(plan) for line in format_result(_result(plan), width=0).splitlines())
