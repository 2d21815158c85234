"""Reliability under trial faults: a trial that raises, diverges (NaN/inf loss), exhausts its memory
limit, hangs past --trial-timeout or crashes its worker process is a failed record with its reason,
and the search goes on; and a search SIGKILLed at random moments resumes without losing or
duplicating a trial (kills at chosen points, one per phase: test_kill_resume.py).

Faults are injected by ``tests/sf_fault_plugins.py``, which the `slimforge` subprocesses load as a
plugin (``SLIMFORGE_PLUGINS``; their worker processes inherit it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

import sf_testing_models
from sf_reliability_checks import (check_artifacts_and_registry, check_one_mlflow_run_per_trial,
                                   check_only_recorded_artifacts_left, check_parent_runs_ended,
                                   check_study_and_summary, fault_env, search_argv, study_trials, tiny_config)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


# --- trial faults in worker processes -----------------------------------------------------------------

FAULT_MODES = ("raise", "nan", "inf", "oom", "hang", "crash", "ok")
TRIAL_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def faulty_search(subprocess_env, slimforge_cmd, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    config = root / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    env = fault_env(subprocess_env, SF_FAULT_MODES=",".join(FAULT_MODES))
    proc = subprocess.run([*slimforge_cmd, "search", "--config", str(config), "--techniques", "sf_fault",
                           "--trials", str(len(FAULT_MODES)), "--out", str(root / "out"), "--no-tracking",
                           "--no-progress", "--latency-repeats", "3", "--trial-timeout", str(TRIAL_TIMEOUT_S),
                           "--trial-memory-limit", "600MB"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {t["plan"]["steps"][0]["config"]["mode"]: t for t in summary["trials"]}, summary


@pytest.mark.parametrize("mode, reason", [
    ("raise", "RuntimeError: technique 'sf_fault' (sf_fault_plugins (SLIMFORGE_PLUGINS)) raised ValueError: "
              "injected fault: this technique always fails"),
    ("nan", "TrainingDiverged: recovery training diverged: loss is nan at epoch 1"),
    ("inf", "TrainingDiverged: recovery training diverged: loss is inf at epoch 1"),
    ("oom", "out of memory: RuntimeError: technique 'sf_fault' (sf_fault_plugins (SLIMFORGE_PLUGINS)) raised "
            "RuntimeError: [enforce fail at alloc_cpu.cpp:"),
    ("hang", f"trial exceeded --trial-timeout {TRIAL_TIMEOUT_S} s; its worker was killed"),
    ("crash", "worker process died (exit code 3)"),
])
def test_a_faulty_trial_is_failed_with_its_reason(faulty_search, mode, reason):
    trials, _ = faulty_search
    trial = trials[mode]
    assert trial["state"] == "failed"
    assert trial["failure_reason"].startswith(reason), trial["failure_reason"]
    assert trial["artifact_path"] is None


def test_the_search_goes_on_after_every_fault(faulty_search):
    trials, summary = faulty_search
    assert [t["plan"]["steps"][0]["config"]["mode"] for t in summary["trials"]] == list(FAULT_MODES)
    ok = trials["ok"]  # the last trial ran in a worker restarted after the hang and the crash
    assert ok["state"] == "complete" and os.path.exists(ok["artifact_path"])
    assert [m["number"] for m in summary["pareto"]] == [ok["number"]]


# --- kills from outside, at random moments ----------------------------------------------------------

# The moments are drawn from this seed, so a failure reproduces; SLIMFORGE_TEST_KILL_SEED tries others.
RANDOM_SEED = int(os.environ.get("SLIMFORGE_TEST_KILL_SEED", "20251128"))


def test_kill_at_random_moments(subprocess_env, slimforge_cmd, tmp_path):
    """Two runs of the tiny task's study are SIGKILLed at random moments (start-up, baseline,
    trials, MLflow, registration: wherever the clock falls), then a third finishes it."""
    rng = random.Random(RANDOM_SEED)
    trials = 5
    argv = search_argv(slimforge_cmd, tmp_path, ["--config", str(tiny_config(tmp_path))], seed=1, trials=trials)
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    env = fault_env(subprocess_env, SF_FAULT_SLEEP="measure:0.3")  # slows each trial a little: more moments to hit
    closed: dict[int, dict] = {}
    moments = []
    for _ in range(2):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        delay = rng.uniform(4.0, 14.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        moments.append((round(delay, 1), proc.returncode))
        if (tmp_path / "out" / "optuna.db").exists():
            try:
                for number, (state, record) in study_trials(storage).items():
                    if state != "RUNNING":
                        closed.setdefault(number, record)
            except KeyError:  # killed before the study was created
                pass
        time.sleep(0.1)
    final = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert final.returncode == 0, (moments, final.stderr[-3000:])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    check_study_and_summary(storage, summary, closed, trials)
    check_one_mlflow_run_per_trial(f"sqlite:///{tmp_path / 'mlflow.db'}", summary, trials)
    check_parent_runs_ended(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_only_recorded_artifacts_left(tmp_path, summary)
    check_artifacts_and_registry(tmp_path, summary, f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny-compressed")
    print("kill moments (seconds after start, exit code):", moments)
