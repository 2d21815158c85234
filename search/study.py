"""The study as shared state: what every process of one search reads and writes in Optuna storage.

Several processes may run one study's trials (the search itself, a second ``slimforge search`` of
the same ``--study``, ``slimforge worker`` on other hosts, Ray Tune trials reported back to the
search).  What they agree on lives here: which trials count toward the total and who claims one
(``claim_trial``), the settings a joining worker reads (``store_settings`` /
``read_stored_settings``), the techniques a study searches (``study_techniques``), and how a search
resumes after a kill (closing interrupted trials, removing the files they left).

Ownership of a RUNNING trial is a lease, never inferred from a second process merely being there.
The process that claims a trial records itself as its owner (host, pid, the pid's start time) and
renews the trial's heartbeat in Optuna's own heartbeat table (``RDBStorage(heartbeat_interval=...,
grace_period=...)``) while it runs.  A RUNNING trial is stale, and closed as interrupted, only when
its owner is on this host and no longer alive (so a resume right after ``kill -9`` proceeds at
once), or its owner is elsewhere and Optuna's ``_get_stale_trial_ids`` reports its heartbeat older
than the grace period (the database's clock decides, not the hosts').  A live owner's trials are
left to it: the new process joins, counts them toward the total and waits for them at the end.
Optuna's ``fail_stale_trials`` is not used: it sets FAIL directly, which would lose a trial that
was measured and saved (``save_pending``) before its process died.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from slimforge.core.errors import ConfigError
from slimforge.search.records import FAILED, TrialRecord

SETTINGS_ATTR = "slimforge_settings"  # study user attr: what `slimforge worker` needs to join
WORKER_ATTR = "slimforge_worker"  # trial user attr: host:pid of the process that ran it
SURPLUS_ATTR = "slimforge_surplus"  # trial user attr: asked past the study's total, never run
OWNER_ATTR = "slimforge_owner"  # trial user attr: {"host", "pid", "started"} of the process holding its lease
TECHNIQUES_ATTR = "slimforge_techniques"  # study user attr: the techniques it searches, fixed when it began
# A process renews its trials' heartbeats this often; a trial owned on another host is stale when
# its heartbeat is older than the grace period (many missed beats: a busy sqlite file delays some).
HEARTBEAT_S = 5
STORAGE_OPEN_ATTEMPTS = 5  # see study_storage: a concurrent first open of one database
GRACE_S = 60


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def study_storage(url: str):
    """The Optuna storage for ``url``, with heartbeats on: an ``RDBStorage`` (sqlite, PostgreSQL,
    MySQL) that records when each trial's owner last renewed its lease."""
    import optuna

    # Optuna warns that heartbeats are meant for Study.optimize; slimforge asks and tells itself
    # and renews the heartbeats itself (``_Heartbeats``).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    import sqlalchemy.exc

    # Two processes opening a database that does not exist yet both create Optuna's schema; the
    # slower one fails on the faster one's rows ("UNIQUE constraint failed: alembic_version",
    # "table ... already exists", "database is locked").  Opening again then finds the schema made.
    for attempt in range(STORAGE_OPEN_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == STORAGE_OPEN_ATTEMPTS - 1:
                raise
            time.sleep(0.25 * (attempt + 1))


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None where there is no
    /proc (then the pid's existence is all that is known)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def owner_record() -> dict[str, Any]:
    """This process as a trial's owner: the start time tells a reused pid from the one that claimed."""
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": stat[1] if stat else None}


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process ``owner`` (on this host) still runs: it exists, is no zombie, and
    started when it did when it claimed the trial."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and owner.get("started") in (None, stat[1])


def _owner(trial) -> dict[str, Any] | None:
    owner = trial.user_attrs.get(OWNER_ATTR)
    if isinstance(owner, dict):
        return owner
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")  # a trial claimed before leases
    return {"host": host, "pid": int(pid), "started": None} if host and pid.isdigit() else None


class _Heartbeats:
    """The trials this process holds, their heartbeats renewed every ``HEARTBEAT_S`` by one daemon
    thread for as long as the process lives: a killed process stops renewing by dying."""

    def __init__(self):
        self._held: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _enabled(storage) -> bool:
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

        return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)

    def hold(self, storage, trial_id: int) -> None:
        if not self._enabled(storage):
            return
        storage.record_heartbeat(trial_id)
        with self._lock:
            self._held[trial_id] = storage
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="slimforge-heartbeat", daemon=True)
                self._thread.start()

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.pop(trial_id, None)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                held = list(self._held.items())
            for trial_id, storage in held:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # e.g. a locked sqlite file: the next beat retries, the grace period is 12 beats
                    pass


HEARTBEATS = _Heartbeats()


def running_trials(study) -> tuple[set[int], dict[int, str]]:
    """The study's RUNNING trials split into (stale trial numbers, {live trial number: owner}).

    Stale: owned on this host by a process that is gone; owned elsewhere with a heartbeat older
    than the grace period; or never claimed (asked, then the process died) for longer than it.
    Anything else is live, owned by a process that still runs it."""
    import optuna

    storage, here = study._storage, socket.gethostname()
    expired = set(storage._get_stale_trial_ids(study._study_id)) if _Heartbeats._enabled(storage) else set()
    stale, live = set(), {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = _owner(trial)
        if owner is None:
            started = trial.datetime_start or datetime.datetime.now()
            dead = (datetime.datetime.now() - started).total_seconds() > GRACE_S
        elif owner.get("host") == here:
            dead = not owner_alive(owner)
        else:
            dead = trial._trial_id in expired
        if dead:
            stale.add(trial.number)
        else:
            live[trial.number] = f"{owner['host']}:{owner['pid']}" if owner else "a process that has not claimed it yet"
    return stale, live


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
    HEARTBEATS.hold(study._storage, trial._trial_id)  # first: an owner without a heartbeat would look stale elsewhere
    trial.set_user_attr(OWNER_ATTR, owner_record())
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
    HEARTBEATS.release(trial._trial_id)


def close_stale(backend, plugins) -> dict[int, str]:
    """Close the RUNNING trials whose owner is gone (``running_trials``): a trial measured before
    its process died keeps its record; any other is failed as interrupted, with its plan
    (``OptunaBackend.interrupted``).  Returns the live ones, ``{number: owner}``, left to their owners."""
    import optuna

    stale, live = running_trials(backend.study)
    for trial, record in backend.interrupted():
        if record.number not in stale:
            continue
        try:
            finish_trial(backend, plugins, trial, record)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process resuming the same study closed it first
        log(f"trial {record.number}: " + (record.failure_reason if record.state == FAILED
                                          else "recovered: it was measured before the search was stopped"))
    return live


def close_interrupted(backend, plugins) -> None:
    """On resume: close the trials killed processes left RUNNING, and join the live ones."""
    live = close_stale(backend, plugins)
    if live:
        owners = sorted(set(live.values()))
        log(f"study {backend.study.study_name!r}: trial(s) {', '.join(map(str, sorted(live)))} still running in "
            f"{', '.join(owners)}; this search joins them (they count toward the total and are waited for)")


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


def wait_for_other_workers(backend, plugins=None) -> None:
    """Trials that other processes (``slimforge worker``, another search) are still running belong
    in this search's result: wait for them.  With ``plugins``, a trial whose owner dies meanwhile
    is closed as interrupted (``close_stale``) instead of being waited for forever.  Ctrl-C stops
    waiting; they stay in the study either way."""
    import optuna

    def running():
        return backend.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    if not running():
        return
    log(f"waiting for {len(running())} trial(s) still running in other workers (Ctrl-C stops waiting; their "
        "results are recorded in the study when they finish)")
    try:
        checked = time.monotonic()
        while running():
            time.sleep(1.0)
            if plugins is not None and time.monotonic() - checked > HEARTBEAT_S:
                close_stale(backend, plugins)
                checked = time.monotonic()
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


def study_techniques(storage: str, study: str, planned: list[str], explicit: bool) -> list[str] | None:
    """The techniques a resumed ``study`` must search, or None to search ``planned`` (the
    techniques this run's planner would search; ``explicit``: named with ``--techniques``).

    A study's parameter space follows from its techniques (``use.<family>`` choices), and Optuna
    refuses a parameter whose choices change, so a study searches the set it began with
    (``record_techniques``) on every resume.  Techniques installed since are left out (and said
    so); a recorded technique that cannot run now, or a different ``--techniques``, is refused
    here, in one line, before any trial is asked."""
    import optuna

    try:
        recorded = optuna.load_study(study_name=study, storage=storage).user_attrs.get(TECHNIQUES_ATTR)
    except KeyError:  # no such study yet: it begins with this run
        return None
    if recorded is None or set(recorded) == set(planned):
        return None
    new_study = "or start a new study with another --study name"
    if explicit:
        raise ConfigError(f"--techniques: study {study!r} searches {', '.join(recorded)} (fixed when it began); this "
                          f"run names {', '.join(planned)}; resume it with those techniques (or without "
                          f"--techniques), {new_study}")
    missing = sorted(set(recorded) - set(planned))
    if missing:
        raise ConfigError(f"--study: study {study!r} searches {', '.join(recorded)} (fixed when it began), but "
                          f"{', '.join(missing)} cannot run here now (not installed, disabled, or needing a device "
                          f"this run lacks); resume it where they can, {new_study}")
    log(f"study {study!r} searches the {len(recorded)} techniques it began with; not searched, installed since: "
        f"{', '.join(sorted(set(planned) - set(recorded)))}")
    return list(recorded)


def record_techniques(backend, techniques: list[str]) -> None:
    """Fix the techniques of a study that has none recorded (it begins now, or began before they
    were recorded): every resume searches them (``study_techniques``)."""
    if TECHNIQUES_ATTR not in backend.study.user_attrs:
        backend.study.set_user_attr(TECHNIQUES_ATTR, sorted(techniques))


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
