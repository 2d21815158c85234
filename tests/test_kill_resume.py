"""Kill -9: a `slimforge search` SIGKILLed while it trains, measures, logs to MLflow, writes an
artifact or registers a model, then resumed with the same --study, loses nothing and duplicates
nothing.  Every trial the study had closed before a kill comes back unchanged, exactly once, in the
study, in summary.json and in MLflow; a trial measured and logged but not yet recorded by the study
is recovered as measured; trials cut off are failed as interrupted with their plan; no half-written
artifact is recorded or registered, and every registered artifact loads.

Kill points come from ``tests/sf_fault_plugins.py`` (``SF_FAULT=POINT:N``), loaded as a plugin.
The tiny task runs by default (six `slimforge` processes take about a minute here); the embedded
MNIST task runs the same sequence with ``SLIMFORGE_TEST_EMBEDDED_KILL=1`` (about three minutes on a
shared 2-core machine).  Kills from outside at random moments: ``test_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from sf_reliability_checks import (STUDY, check_artifacts_and_registry, check_one_mlflow_run_per_trial,
                                   check_only_recorded_artifacts_left, check_parent_runs_ended,
                                   check_study_and_summary, fault_env, search_argv, study_trials, tiny_config)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TRIALS = 6
# Each run of the study is SIGKILLed at one point, chosen so every run has work to do: seed 0's
# first trial fine-tunes, and a resumed study continues where the last run stopped.
KILLS = [
    ("train", "train:1"),        # first optimizer step of trial 0
    ("measure", "measure:3"),    # timing trial 1's artifact (calls 1-2 time the baseline)
    ("mlflow", "mlflow:2"),      # trial 2 logged to MLflow, not yet recorded by the study (call 1 closes trial 1)
    ("artifact", "write:2"),     # trial 3's first artifact file half written (write 1 is the baseline)
    ("registry", "register:1"),  # every trial done; registering the first Pareto member
]
TASKS = {
    "tiny": ("tiny-compressed", lambda root: ["--config", str(tiny_config(root))]),
    "embedded": ("mnist-lenet5-compressed", lambda root: []),
}


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def killed_and_resumed(request, subprocess_env, slimforge_cmd, tmp_path_factory):
    if request.param == "embedded":
        if not os.environ.get("SLIMFORGE_TEST_EMBEDDED_KILL"):
            pytest.skip("set SLIMFORGE_TEST_EMBEDDED_KILL=1 to run the kill sequence on the embedded MNIST task")
        request.getfixturevalue("embedded_teacher")  # trained and cached once per session
    model_name, task_args = TASKS[request.param]
    root = tmp_path_factory.mktemp(f"kill-{request.param}")
    storage = f"sqlite:///{root / 'out' / 'optuna.db'}"
    argv = search_argv(slimforge_cmd, root, task_args(root), seed=0, trials=TRIALS)
    log = root / "faults.log"
    closed_before_a_kill: dict[int, dict] = {}  # trial -> record, for trials the study had closed
    runs = []
    for name, fault in [*KILLS, ("final", None)]:
        env = fault_env(subprocess_env, SF_FAULT_LOG=str(log), **({"SF_FAULT": fault} if fault else {}))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root, timeout=600)
        runs.append((name, fault, proc))
        if fault is None:
            break
        assert proc.returncode == -signal.SIGKILL, (name, proc.returncode, proc.stderr[-3000:])
        for number, (state, record) in study_trials(storage).items():
            if state != "RUNNING":
                closed_before_a_kill.setdefault(number, record)
    summary = json.loads((root / "out" / "summary.json").read_text())
    return dict(root=root, storage=storage, runs=runs, log=log, closed=closed_before_a_kill, summary=summary,
                model=model_name, uri=f"sqlite:///{root / 'mlflow.db'}")


def test_every_kill_point_was_reached_and_the_last_run_finished(killed_and_resumed):
    k = killed_and_resumed
    assert k["log"].read_text().split() == [fault for _, fault in KILLS]
    _, _, final = k["runs"][-1]
    assert final.returncode == 0, final.stderr[-3000:]


def test_each_trial_is_in_the_study_and_summary_exactly_once(killed_and_resumed):
    k = killed_and_resumed
    assert k["closed"]
    check_study_and_summary(k["storage"], k["summary"], k["closed"], TRIALS)


def test_trials_cut_off_are_failed_with_their_plan_and_a_measured_one_is_kept(killed_and_resumed):
    by_number = {t["number"]: t for t in killed_and_resumed["summary"]["trials"]}
    for number in (0, 1, 3):  # killed while training, measuring, writing its artifact
        trial = by_number[number]
        assert trial["state"] == "failed"
        assert trial["failure_reason"] == "interrupted (the search was stopped while this trial ran)"
        assert trial["plan"]["steps"] and not trial["plan_text"].startswith("(unknown"), "the plan survives the kill"
    # Trial 2 was measured and logged to MLflow, then the search died before the study recorded it:
    # it is recovered as measured, neither failed nor rerun.
    recovered = by_number[2]
    assert recovered["state"] in ("complete", "rejected")
    assert "recovered on resume: measured before the search was stopped" in recovered["notes"]


def test_mlflow_has_exactly_one_run_per_trial(killed_and_resumed):
    k = killed_and_resumed
    check_one_mlflow_run_per_trial(k["uri"], k["summary"], TRIALS)


def test_each_killed_search_run_is_ended_killed_by_the_run_that_resumed_it(killed_and_resumed):
    runs = check_parent_runs_ended(killed_and_resumed["uri"])
    assert len(runs) == len(KILLS) + 1  # every kill point comes after the search opened its run
    for killed, resumer in zip(runs, runs[1:]):
        assert killed.info.status == "KILLED"
        assert killed.data.tags["slimforge.resumed_by"] == resumer.info.run_id


def test_no_half_written_artifact_is_recorded_or_registered(killed_and_resumed):
    k = killed_and_resumed
    artifact_dir = k["root"] / "out" / "artifacts" / STUDY
    # The kill mid-write left a temporary file (removed on resume), never a file under an artifact's name.
    assert not (artifact_dir / "trial-0003.slim").exists()
    assert k["summary"]["pareto"], "the registry kill needs Pareto members"
    check_artifacts_and_registry(k["root"], k["summary"], k["uri"], k["model"])


def test_resuming_removes_the_files_a_kill_left_and_only_those(killed_and_resumed):
    k = killed_and_resumed
    kill_names = [name for name, _ in KILLS]

    def removal_lines(after_kill: str) -> list[str]:
        _, _, resumed = k["runs"][kill_names.index(after_kill) + 1]
        return [line for line in resumed.stderr.splitlines() if line.startswith("removed ")]

    (line,) = removal_lines("artifact")  # one line says what was removed
    assert ".trial-0003." in line and ".tmp (cut-off write)" in line, line
    (line,) = removal_lines("measure")  # trial 1's artifact was written, then the search died timing it
    assert "trial-0001.slim (trial 1 not recorded complete)" in line, line
    check_only_recorded_artifacts_left(k["root"], k["summary"])


# --- two searchers on one study; a resume after the installed techniques changed ----------------------

def _running(storage: str) -> list[int]:
    import optuna

    if not storage.endswith("optuna.db") or not os.path.exists(storage.removeprefix("sqlite:///")):
        return []  # the search has not created its study yet
    import sqlalchemy.exc

    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
    except KeyError:  # the file is there, the study not yet
        return []
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
        return []  # the search is creating Optuna's schema in that file right now: look again later
    return [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]


def test_two_searches_of_one_study_lose_nothing_and_record_each_trial_once(subprocess_env, slimforge_cmd, tmp_path):
    """A second `slimforge search --study kill` started while the first runs a trial joins the study
    instead of closing that trial as interrupted: both finish, every trial is recorded once in Optuna
    and in MLflow, none is interrupted, and every artifact a record names is there and decodes.  The
    first search sleeps 6 s while timing each artifact, so it always holds a RUNNING trial, and has
    trials left when the second one (which takes its own baseline first) reaches the study."""
    import optuna

    from slimforge.search.study import SURPLUS_ATTR

    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    trials = 8
    argv = search_argv(slimforge_cmd, tmp_path, ["--config", str(tiny_config(tmp_path))], seed=0, trials=trials)
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env=fault_env(subprocess_env, SF_FAULT_SLEEP="measure:6"))
    deadline = time.monotonic() + 300
    while not _running(storage) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(storage), first.communicate()[1][-3000:]
    second = subprocess.run(argv[:argv.index("--seed") + 1] + ["1"] + argv[argv.index("--seed") + 2:],
                            capture_output=True, text=True, cwd=tmp_path, env=fault_env(subprocess_env), timeout=600)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "this search joins them" in second.stderr, second.stderr[-3000:]  # it met a live trial of the first
    assert "interrupted" not in first_err + second.stderr

    recorded = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    counted = [t for t in recorded if not t.user_attrs.get(SURPLUS_ATTR)]
    assert [t.number for t in counted] == list(range(trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted), [t.state for t in counted]
    owners = {t.user_attrs["slimforge_worker"] for t in counted}
    assert len(owners) == 2, owners  # both processes ran trials
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [t["number"] for t in summary["trials"]] == list(range(trials))
    check_one_mlflow_run_per_trial(f"sqlite:///{tmp_path / 'mlflow.db'}", summary, trials)
    check_only_recorded_artifacts_left(tmp_path, summary)
    check_artifacts_and_registry(tmp_path, summary, f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny-compressed",
                                 concurrent=True)


def test_a_resume_after_the_installed_techniques_changed_never_crashes(subprocess_env, slimforge_cmd, tmp_path):
    """A study that began with the test-only technique sf_fault installed (``SLIMFORGE_PLUGINS``) is
    refused in one line when resumed without it, before any trial is asked; a study that began
    without it resumes with it installed and keeps searching the techniques it began with.  Before,
    both crashed in Optuna ("CategoricalDistribution does not support dynamic value space") and left
    a trial RUNNING."""
    import optuna

    config = str(tiny_config(tmp_path))
    with_plugin = fault_env(subprocess_env)
    without = {k: v for k, v in with_plugin.items() if k != "SLIMFORGE_PLUGINS"}

    def search(study: str, trials: int, env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([*slimforge_cmd, "search", "--config", config, "--study", study, "--trials", str(trials),
                               "--out", str(tmp_path / "out"), "--no-tracking", "--no-progress", "--latency-repeats", "3"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    def trials(study: str) -> list:
        return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}").get_trials()

    first = search("began-with", 1, with_plugin)
    assert first.returncode == 0, first.stderr[-3000:]
    refused = search("began-with", 2, without)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("slimforge: error: --study: study 'began-with' searches ") and \
        "but sf_fault cannot run here now" in line and line.endswith("start a new study with another --study name"), line
    assert [t.number for t in trials("began-with")] == [0]  # no trial asked by the refused run
    assert "RUNNING" not in [t.state.name for t in trials("began-with")]

    first = search("began-without", 1, without)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = search("began-without", 2, with_plugin)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not searched, installed since: sf_fault" in resumed.stderr
    recorded = trials("began-without")
    # Each trial ran its plan (a plan may still fail on the tiny task; none failed to be sampled).
    assert len(recorded) == 2 and all(t.state.name != "RUNNING" for t in recorded)
    assert not any("could not sample" in str(t.user_attrs.get("failure_reason")) for t in recorded)
    assert not any("sf_fault" in str(t.params) for t in recorded)
