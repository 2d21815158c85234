"""The study as shared state: what every process of one search reads and writes in Optuna storage.

Several processes may run one study's trials (the search itself, ``slimforge worker`` on other
hosts, Ray Tune trials reported back to the search).  What they agree on lives here: which trials
count toward the total and who claims one (``claim_trial``), the settings a joining worker reads
(``store_settings`` / ``read_stored_settings``), and how a search resumes after a kill (closing
interrupted trials, removing the files they left).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from slimforge.core.errors import ConfigError
from slimforge.search.records import FAILED, TrialRecord

SETTINGS_ATTR = "slimforge_settings"  # study user attr: what `slimforge worker` needs to join
WORKER_ATTR = "slimforge_worker"  # trial user attr: host:pid of the process that ran it
SURPLUS_ATTR = "slimforge_surplus"  # trial user attr: asked past the study's total, never run


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def counted(study) -> int:
    """Trials that count toward the study's total: all but surplus asks."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR))


def claim_trial(study, trial, total: int) -> bool:
    """Keep ``trial`` (just asked) only if it is within the study's ``total``.

    Several processes may share a study (``slimforge worker``); two can see room for one more
    trial and both ask.  The storage numbers trials atomically, so the trial whose rank among the
    counted trials exceeds the total is surplus: it is closed as FAIL, tagged, never run and never
    counted.  Every process reaches the same verdict, so the study ends with exactly ``total``."""
    import optuna

    below = sum(1 for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and not t.user_attrs.get(SURPLUS_ATTR))
    if below >= total:
        trial.set_user_attr(SURPLUS_ATTR, True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    trial.set_user_attr(WORKER_ATTR, this_process())
    return True


def finish_trial(backend, plugins, trial, record: TrialRecord) -> None:
    """Record a finished trial so that a kill at any point loses nothing and duplicates nothing:
    the record is first saved with the still-running trial (``save_pending``), then trackers see it
    (the MLflow tracker keys its runs by study and trial number, so seeing a trial again after a
    resume reuses its run), then the backend closes the trial with the record and the links."""
    backend.save_pending(trial, record)
    plugins.trial_end(record)
    backend.tell(trial, record)


def close_interrupted(backend, plugins) -> None:
    """Close the trials a killed search left RUNNING: a trial measured before the kill keeps its
    record; any other is failed as interrupted, with its plan (``OptunaBackend.interrupted``)."""
    for trial, record in backend.interrupted():
        log(f"trial {record.number}: " + (record.failure_reason if record.state == FAILED
                                          else "recovered: it was measured before the search was stopped"))
        finish_trial(backend, plugins, trial, record)


def remove_orphaned_files(backend, artifact_dir: Path) -> list[tuple[str, str]]:
    """Delete the files a killed search left in the study's artifact folder that nothing will
    ever use; returns ``(file name, why)`` for each.  Called once interrupted trials are closed.

    Only a file of a trial the study knows and no process is running is touched, and never one a
    trial record names:
    - a temporary file of ``write_artifact``: the write was cut off (a finished one is renamed);
    - ``trial-NNNN.estimate.slim``: a size estimate, which lives only until its size is read;
    - ``trial-NNNN.slim`` of a trial that is not COMPLETE: written, then the search died before
      the trial was recorded, so it was closed as interrupted.
    A file of a trial the study does not know (another storage, or a trial asked by a worker after
    the study was read) is left alone: nothing proves it is an orphan."""
    import optuna

    from slimforge.core.artifact import temporary_target
    from slimforge.search.objective import TRIAL_FILE

    trials = {t.number: t for t in backend.study.get_trials(deepcopy=False)}
    named = {Path(r["artifact_path"]).name for r in backend.records() if r.get("artifact_path")}
    removed = []
    for path in sorted(artifact_dir.iterdir()):
        target = temporary_target(path.name)
        match = TRIAL_FILE.match(target or path.name)
        trial = trials.get(int(match["number"])) if match else None
        if (trial is None or trial.state == optuna.trial.TrialState.RUNNING or path.name in named
                or not path.is_file()):
            continue
        if target is not None:
            why = "cut-off write"
        elif match["estimate"]:
            why = "size estimate"
        elif trial.state != optuna.trial.TrialState.COMPLETE:
            why = f"trial {trial.number} not recorded complete"
        else:
            continue
        path.unlink(missing_ok=True)
        removed.append((path.name, why))
    if removed:
        log(f"removed {len(removed)} file(s) a killed search left in {artifact_dir}: "
            + ", ".join(f"{name} ({why})" for name, why in removed))
    return removed


def wait_for_other_workers(backend) -> None:
    """Trials that other processes (``slimforge worker``) are still running belong in this
    search's result: wait for them.  Ctrl-C stops waiting; they stay in the study either way."""
    import optuna

    def running():
        return backend.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    if not running():
        return
    log(f"waiting for {len(running())} trial(s) still running in other workers (Ctrl-C stops waiting; their "
        "results are recorded in the study when they finish)")
    try:
        while running():
            time.sleep(1.0)
    except KeyboardInterrupt:
        log("stopped waiting; the summary leaves out the trials still running")


def store_settings(backend, *, settings: dict, task_source: dict, task_name: str, budgets: dict,
                   artifact_dir: str, baseline: dict) -> None:
    """Everything ``slimforge worker`` needs to run this search's trials elsewhere.  Rewritten on
    every (resumed) run, so workers see the latest total and budgets."""
    backend.study.set_user_attr(SETTINGS_ATTR, {
        "version": 1, "settings": settings, "task_source": task_source, "task_name": task_name,
        "budgets": budgets,  # resolved: workers need no baseline
        "artifact_dir": artifact_dir, "baseline": baseline,
    })


def read_stored_settings(storage: str, study: str, wait_s: float = 0.0) -> dict[str, Any]:
    """The settings ``run_search`` stored in ``study``, waiting up to ``wait_s`` seconds for the
    search to create the study (a worker may be started before or with the search)."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        problem = ""
        try:
            stored = optuna.load_study(study_name=study, storage=storage).user_attrs.get(SETTINGS_ATTR)
        except KeyError:  # Optuna's "study not found"
            stored = None
        except Exception as exc:  # e.g. the sqlite file's folder does not exist yet, or the server is down
            stored, problem = None, f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if stored is not None:
            return stored
        if time.monotonic() >= deadline:
            raise ConfigError(f"--study: no slimforge search named {study!r} in {storage}{problem}; start it with "
                              f"'slimforge search --storage {storage} --study {study}' (workers join a search, "
                              "they do not start one)")
        if not announced and wait_s:
            log(f"waiting up to {wait_s:g} s for the search to create study {study!r} in {storage}")
            announced = True
        time.sleep(1.0)
