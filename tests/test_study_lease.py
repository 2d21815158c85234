"""Study ownership and resume, fast: a RUNNING trial is closed as interrupted only when its owner is
gone (a dead process on this host, or a heartbeat older than the grace period elsewhere), never
because a second process opened the study; a resumed study searches the techniques it began with or
refuses in one line; a crash while a trial is asked leaves nothing RUNNING.  The two-process and
uninstall runs, end to end: tests/test_kill_resume.py."""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest

from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import Measurements
from slimforge.search import study as study_module
from slimforge.search.backends.optuna import INTERRUPTED, RECORD_ATTR, OptunaBackend, attr_value
from slimforge.search.budgets import Budgets
from slimforge.search.loop import InProcess, SearchContext, TrialLoop
from slimforge.search.settings import SearchSettings
from slimforge.search.study import (HEARTBEATS, OWNER_ATTR, claim_trial, close_interrupted, record_techniques,
                                    running_trials, study_techniques)

RUNNING = optuna.trial.TrialState.RUNNING


@pytest.fixture
def backend(tmp_path):
    return OptunaBackend(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", seed=0, budgets=Budgets(),
                         close_interrupted=False)


def dead_owner() -> dict:
    """The owner record of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = study_module._proc_stat(proc.pid)
    proc.wait()
    return {"host": study_module.socket.gethostname(), "pid": proc.pid, "started": started[1] if started else None}


def claimed(backend, owner: dict | None = None):
    trial = backend.ask()
    assert claim_trial(backend.study, trial, total=10)
    if owner is not None:
        HEARTBEATS.release(trial._trial_id)  # its owner is another process: this one does not renew it
        trial.set_user_attr(OWNER_ATTR, owner)
    return trial


def states(backend) -> dict[int, str]:
    return {t.number: t.state.name for t in backend.study.get_trials(deepcopy=False)}


def test_a_second_process_leaves_a_live_owners_trial_and_closes_a_dead_ones(backend, capsys):
    live = claimed(backend)  # owned by this process, which is alive
    dead = claimed(backend, dead_owner())
    reused_pid = claimed(backend, study_module.owner_record() | {"started": "0"})  # this pid, another start time
    close_interrupted(backend, Plugins(load_entry_points=False))
    assert states(backend) == {live.number: "RUNNING", dead.number: "FAIL", reused_pid.number: "FAIL"}
    record = attr_value(backend.study.get_trials()[dead.number].user_attrs[RECORD_ATTR])
    assert record["failure_reason"] == INTERRUPTED
    err = capsys.readouterr().err
    assert f"trial(s) {live.number} still running in {study_module.this_process()}; this search joins them" in err
    HEARTBEATS.release(live._trial_id)


def test_a_trial_owned_on_another_host_is_stale_only_after_its_heartbeat_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "GRACE_S", 1)  # the storage takes it when the backend opens it
    backend = OptunaBackend(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", seed=0, budgets=Budgets(),
                            close_interrupted=False)
    trial = claimed(backend, {"host": "another-host", "pid": 1, "started": "1"})
    assert running_trials(backend.study) == (set(), {trial.number: "another-host:1"})  # heartbeat fresh
    time.sleep(2.5)  # the database clock counts whole seconds
    assert running_trials(backend.study)[0] == {trial.number}


def test_a_trial_asked_but_never_claimed_is_stale_only_once_the_grace_period_passed(backend, monkeypatch):
    trial = backend.ask()  # its process died before claiming it: no owner, no heartbeat
    assert running_trials(backend.study)[0] == set()
    monkeypatch.setattr(study_module, "GRACE_S", -1)
    assert running_trials(backend.study)[0] == {trial.number}


def test_a_resumed_study_searches_the_techniques_it_began_with(backend, capsys):
    storage = backend.study._storage._backend.url
    assert study_techniques(storage, "new-study", ["a", "b"], explicit=False) is None  # begins now
    record_techniques(backend, ["int8_ptq", "magnitude_pruning"])
    assert study_techniques(storage, "s", ["magnitude_pruning", "int8_ptq"], explicit=False) is None
    # A technique installed since is not searched: the space stays the one the study began with.
    assert study_techniques(storage, "s", ["int8_ptq", "magnitude_pruning", "low_rank"],
                            explicit=False) == ["int8_ptq", "magnitude_pruning"]
    assert "not searched, installed since: low_rank" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^--study: study 's' searches int8_ptq, magnitude_pruning \(fixed when it "
                                          r"began\), but magnitude_pruning cannot run here now .* start a new study "
                                          "with another --study name$"):
        study_techniques(storage, "s", ["int8_ptq"], explicit=False)
    with pytest.raises(ConfigError, match="^--techniques: study 's' searches int8_ptq, magnitude_pruning"):
        study_techniques(storage, "s", ["int8_ptq", "low_rank"], explicit=True)
    record_techniques(backend, ["low_rank"])  # recorded once, when the study began
    assert backend.study.user_attrs[study_module.TECHNIQUES_ATTR] == ["int8_ptq", "magnitude_pruning"]


def test_a_crash_while_a_trial_is_asked_leaves_it_failed_not_running(backend):
    class BrokenPlanner:
        def sample(self, space, task, seed):
            space.suggest_categorical("use.pruning", ["none", "magnitude_pruning"])
            raise ValueError("CategoricalDistribution does not support dynamic value space.")

    settings = SearchSettings(trials=3, study="s", progress=False)
    ctx = SearchContext(backend=backend, planner=BrokenPlanner(), runner=None, plugins=Plugins(load_entry_points=False),
                        task=None, settings=settings, baseline=Measurements(accuracy=1.0, size_bytes=1, latency_ms=1.0))
    with pytest.raises(ValueError, match="dynamic value space"):
        TrialLoop(ctx).run(InProcess(None))
    (trial,) = backend.study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert attr_value(trial.user_attrs[RECORD_ATTR])["failure_reason"] == (
        "could not sample a plan: ValueError: CategoricalDistribution does not support dynamic value space.")


def test_a_database_another_process_is_creating_is_opened_again_not_failed(tmp_path, monkeypatch):
    """Two searches starting on one new database both create Optuna's schema; the slower one's
    failure (here the IntegrityError CI met, "UNIQUE constraint failed: alembic_version") makes
    study_storage open it again, and a failure that persists is raised, not looped on."""
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", (), Exception("UNIQUE constraint failed"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert isinstance(study_module.study_storage(url), real) and len(calls) == 2

    def always(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", (), Exception("database is locked"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", always)
    calls.clear()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        study_module.study_storage(url)
    assert len(calls) == study_module.STORAGE_OPEN_ATTEMPTS
