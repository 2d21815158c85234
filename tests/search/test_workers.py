"""Search at scale with the Optuna backend: `slimforge worker` joins a running search through its
study's storage; the study's total holds however many processes ask; the search budget summary
(trials done, failed, rejected, hypervolume of the feasible front)."""

from __future__ import annotations

import json
import math
import subprocess
import time

import optuna
import pytest

import sf_testing_models
from slimforge.app.cli import main
from slimforge.core.measure import Measurements
from slimforge.search.reports import feasible_hypervolume, hypervolume, hypervolume_point, search_summary
from slimforge.search.settings import SearchSettings
from slimforge.search.study import SURPLUS_ATTR, WORKER_ATTR, claim_trial
from slimforge.search.records import COMPLETE, FAILED, REJECTED, SearchResult, TrialRecord

STUDY = "shared"


@pytest.mark.slow
def test_a_worker_process_shares_the_searchs_trials(tmp_path, subprocess_env, slimforge_cmd):
    """A search (--trials 4) and a `slimforge worker` on the same sqlite study, both as
    subprocesses started together: 4 trials in all, each run once and recorded once, and every
    trial (the worker's too) tracked by the search, which waits for the worker's last trial."""
    config = tmp_path / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    (tmp_path / "out").mkdir()
    search = subprocess.Popen(
        [*slimforge_cmd, "search", "--config", str(config), "--trials", "4", "--study", STUDY, "--storage", storage,
         "--techniques", "int8_ptq,magnitude_pruning", "--latency-repeats", "5", "--out", str(tmp_path / "out"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"],
        cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    worker = subprocess.run([*slimforge_cmd, "worker", "--storage", storage, "--study", STUDY, "--wait", "120",
                             "--no-progress"],
                            cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    search_out, search_err = search.communicate(timeout=300)
    assert worker.returncode == 0, worker.stderr
    assert search.returncode == 0, search_err
    assert time.monotonic() - started < 300

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(t["number"] for t in summary["trials"]) == [0, 1, 2, 3]
    assert all(t["state"] == COMPLETE for t in summary["trials"]), [t["failure_reason"] for t in summary["trials"]]
    assert summary["search_summary"]["trials_done"] == 4
    study = optuna.load_study(study_name=STUDY, storage=storage)
    counted = [t for t in study.get_trials() if not t.user_attrs.get(SURPLUS_ATTR)]
    assert len(counted) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    assert len(study.get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 0
    # How the 4 trials split between the two processes depends on scheduling (on a loaded machine
    # the search can finish before the worker has imported torch), so the test checks that the
    # split is consistent rather than that it is even.
    runners = {t.user_attrs[WORKER_ATTR] for t in counted}
    ran = int(worker.stdout.split("worker ran ")[1].split()[0])
    assert 0 <= ran <= 4
    assert len(runners) == (1 if ran in (0, 4) else 2), (ran, runners)
    # The loop overhead covers the trials this process ran, and is never negative: a trial run in
    # the search's process lies inside its loop time.
    overhead = summary["search_summary"]["loop_overhead_s"]
    assert (overhead is None) if ran == 4 else (overhead["trials"] == 4 - ran and 0 <= overhead["median"] <= overhead["max"])
    # The search logged the worker's trials too: one nested MLflow run per trial.
    assert all(t["links"].get("mlflow_run_id") or t["links"].get("mlflow_pending") for t in summary["trials"])


def test_worker_without_a_search_names_the_command_that_starts_one(capsys, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    code = main(["worker", "--storage", storage, "--study", "nothing-here", "--wait", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"slimforge search --storage {storage} --study nothing-here" in err


def test_a_study_holds_its_total_however_many_processes_ask():
    """Two processes that both saw room for one more trial both ask; the one numbered past the
    total is closed as surplus, never run, never counted."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    first, second = study.ask(), study.ask()  # both asked while the study held no trial
    assert claim_trial(study, first, total=1)
    assert not claim_trial(study, second, total=1)
    assert second.number == 1 and study.trials[1].state == optuna.trial.TrialState.FAIL
    assert study.trials[1].user_attrs[SURPLUS_ATTR] is True
    # Surplus asks do not count: raising the total later fills it with real trials.
    third = study.ask()
    assert claim_trial(study, third, total=2)
    assert WORKER_ATTR in study.trials[third.number].user_attrs


def test_settings_round_trip_through_the_study():
    settings = SearchSettings(trials=7, seed=3, techniques=("int8_ptq",), out_dir="x", disabled_plugins=("a",))
    assert SearchSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


# --- the search budget summary ------------------------------------------------------------------

BASELINE = Measurements(accuracy=0.98, size_bytes=1000, latency_ms=1.0)


def _record(number, state=COMPLETE, feasible=True, accuracy=0.9, size=500, latency=0.5) -> TrialRecord:
    measured = state == COMPLETE
    return TrialRecord(number=number, state=state, plan={}, plan_text="", feasible=feasible and measured,
                       measurements=Measurements(accuracy=accuracy, size_bytes=size, latency_ms=latency)
                       if measured else None)


def test_loop_overhead_is_loop_time_minus_the_trials_own_time():
    records = [_record(n) for n in range(4)]
    for record, own in zip(records, (1.0, 2.0, 3.0, 4.0)):
        record.duration_s = own
    result = SearchResult(study_name="s", task="t", budgets={}, baseline=BASELINE, baseline_test=BASELINE,
                          trials=records, pareto=[], loop_seconds={0: 1.1, 1: 2.3, 2: 3.2, 9: 5.0})
    overhead = result.loop_overhead()  # trial 3 ran elsewhere (no loop time); 9 is not a record
    assert overhead["trials"] == 3
    assert overhead["median"] == pytest.approx(0.2) and overhead["max"] == pytest.approx(0.3)
    assert SearchResult(study_name="s", task="t", budgets={}, baseline=BASELINE, baseline_test=BASELINE,
                        trials=records, pareto=[]).loop_overhead() is None


def test_hypervolume_is_on_log_size_and_latency_with_a_ten_point_accuracy_window():
    # (0.98 - 0.9) / 0.1 = 0.8; size 1 - log(2) / log(1000) = 0.8997; latency 1 - log(2) / log(10) = 0.6990.
    a, s, lat = 0.8, 1 - math.log(2) / math.log(1000), 1 - math.log(2) / math.log(10)
    assert hypervolume_point(_record(0).measurements, BASELINE) == pytest.approx((a, s, lat))
    one = (1.1 - a) * (1.1 - s) * (1.1 - lat)
    assert feasible_hypervolume([_record(0)], BASELINE) == pytest.approx(one, abs=1e-6)
    # Infeasible, failed and dominated trials add nothing; neither does a collapsed model (more
    # than 11 points under the baseline: outside the box, however small it is).
    noise = [_record(1, feasible=False, accuracy=0.99, size=10), _record(2, state=FAILED),
             _record(3, accuracy=0.85, size=600, latency=0.6), _record(4, accuracy=0.10, size=1)]
    assert feasible_hypervolume([_record(0), *noise], BASELINE) == pytest.approx(one, abs=1e-6)
    # On a log axis 100x smaller counts more than 20x smaller at the same accuracy and latency.
    assert (feasible_hypervolume([_record(5, size=10)], BASELINE)
            > feasible_hypervolume([_record(6, size=50)], BASELINE) > one)
    assert feasible_hypervolume([], BASELINE) == 0.0


def test_hypervolume_matches_inclusion_exclusion_for_two_points():
    p, q, ref = (0.2, 0.5, 0.4), (0.6, 0.1, 0.3), (1.0, 1.0, 1.0)
    volume = lambda x: (ref[0] - x[0]) * (ref[1] - x[1]) * (ref[2] - x[2])  # noqa: E731
    overlap = volume(tuple(max(a, b) for a, b in zip(p, q)))
    assert hypervolume([p, q], ref) == pytest.approx(volume(p) + volume(q) - overlap)
    assert hypervolume([p, (0.3, 0.6, 0.5)], ref) == pytest.approx(volume(p))  # a dominated point adds nothing


def test_search_summary_counts_what_the_progress_bar_and_summary_show():
    records = [_record(0), _record(1, state=FAILED), _record(2, state=REJECTED), _record(3, state="stopped"),
               _record(4, feasible=False)]
    summary = search_summary(records, BASELINE)
    assert {k: summary[k] for k in ("trials_done", "complete", "failed", "rejected_before_training",
                                    "stopped_by_scheduler", "feasible")} == {
        "trials_done": 5, "complete": 2, "failed": 1, "rejected_before_training": 1, "stopped_by_scheduler": 1,
        "feasible": 1}
    assert summary["hypervolume"] == feasible_hypervolume([_record(0)], BASELINE) > 0
    assert "reference point (1.1, 1.1, 1.1)" in summary["hypervolume_definition"]


def test_a_worker_killed_while_idle_is_replaced_not_fed(tmp_path):
    """A worker process that dies between trials (killed from outside) is replaced when the next
    trial is submitted, instead of the plan being written into a dead pipe."""
    from slimforge.core.plan import Plan
    from slimforge.search.executor import ProcessPool
    from slimforge.search.loop import StartedTrial
    from slimforge.search.workers import WorkerSpec

    spec = WorkerSpec(task_source={"builtin": "no-such-task"}, budgets={}, artifact_dir=str(tmp_path))
    pool = ProcessPool(1, spec)
    try:
        first = pool.workers[0]
        first.process.kill()
        first.process.join(timeout=30)
        pool.submit(StartedTrial(trial=optuna.trial.FixedTrial({}, number=0), plan=Plan(), asked=0.0), [])
        assert pool.workers[0] is not first and pool.workers[0].job is not None
    finally:
        pool.close()
