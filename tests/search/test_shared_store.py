"""A shared study store for many concurrent searchers: 16 processes on one PostgreSQL study lose
and duplicate nothing.

Each process runs slimforge's own trial bookkeeping (``OptunaBackend.ask``, ``study.claim_trial``,
``study.finish_trial``: the calls ``TrialLoop`` makes for every backend and ``slimforge worker``)
with a tiny trial (no model: a record computed from the trial number), until the study holds its
total.  The study must end with exactly ``TOTAL`` counted trials, numbered 0..TOTAL-1 without
gaps, each COMPLETE with its own record, each run by exactly one process; a trial two processes
asked for beyond the total is the surplus that ``claim_trial`` closes, never a counted one.

PostgreSQL, not Optuna's JournalStorage: slimforge's leases (a dead owner's RUNNING trial is
closed, a live one's left alone) use the heartbeats of ``RDBStorage``; ``JournalStorage`` has none.

The server is started by the test (``initdb`` into a temp dir, ``pg_ctl start`` on a free port,
stopped at teardown), as the ``postgres`` user when run as root (PostgreSQL refuses root); the test
skips, saying why, when the PostgreSQL server binaries or ``psycopg`` are missing.  CI needs the
Debian packages ``postgresql`` (initdb, pg_ctl) and ``pip install 'psycopg[binary]'``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PROCESSES = 16
TOTAL = 48


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'psycopg[binary]'")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    root = Path(tempfile.mkdtemp(prefix="sf-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, timeout=120)
    try:
        subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", "slimforge", "--auth", "trust"]), **run)
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200",
                                        "start"]), **run)
        yield f"postgresql+psycopg://slimforge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), check=False,
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


class _NoTrackers:
    def trial_end(self, record) -> None:
        pass


def _tiny_trials(storage: str, study: str, total: int, barrier) -> None:
    """One searcher process: claim and finish tiny trials until the study holds ``total``."""
    from slimforge.core.measure import Measurements
    from slimforge.search.backends.optuna import OptunaBackend
    from slimforge.search.budgets import Budgets
    from slimforge.search.records import COMPLETE, TrialRecord
    from slimforge.search.study import claim_trial, counted, finish_trial, this_process

    backend = OptunaBackend(storage=storage, study_name=study, seed=0, budgets=Budgets(), close_interrupted=False,
                            sampler_name="random")
    barrier.wait()  # every process starts asking at once: the worst case for the store
    while counted(backend.study) < total:
        trial = backend.ask()
        if not claim_trial(backend.study, trial, total):
            break
        n = trial.number
        record = TrialRecord(number=n, state=COMPLETE, plan={}, plan_text=f"tiny {n}", feasible=True,
                             measurements=Measurements(accuracy=1 / (n + 2), size_bytes=1000 + n, latency_ms=1.0),
                             notes=[f"ran in {this_process()}"])
        finish_trial(backend, _NoTrackers(), trial, record)


def test_sixteen_processes_on_one_postgresql_study_lose_and_duplicate_nothing(postgres_url):
    import optuna

    from slimforge.search.backends.optuna import RECORD_ATTR, OptunaBackend
    from slimforge.search.budgets import Budgets
    from slimforge.search.study import SURPLUS_ATTR, WORKER_ATTR

    OptunaBackend(storage=postgres_url, study_name="shared", seed=0, budgets=Budgets(), sampler_name="random")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    processes = [ctx.Process(target=_tiny_trials, args=(postgres_url, "shared", TOTAL, barrier))
                 for _ in range(PROCESSES)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * PROCESSES

    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials(deepcopy=False)
    counted = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)]
    surplus = [t for t in trials if t.user_attrs.get(SURPLUS_ATTR)]
    assert [t.number for t in counted] == list(range(TOTAL))  # none lost, none twice, no gap
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    assert [t.user_attrs[RECORD_ATTR]["number"] for t in counted] == list(range(TOTAL))
    assert all(t.state == optuna.trial.TrialState.FAIL and t.number >= TOTAL for t in surplus)
    # Every counted trial was run by exactly one process, and the work was shared.
    runners = [t.user_attrs[WORKER_ATTR] for t in counted]
    assert [t.user_attrs[RECORD_ATTR]["notes"] for t in counted] == [[f"ran in {r}"] for r in runners]
    assert len(set(runners)) > 1
