"""Where trials run, when not in the search's own process: a pool of worker processes.

Worker processes give what one process cannot: ``--workers N`` trials at once, a per-trial
``--trial-timeout`` (a hung trial's worker is killed), and isolation (a trial that exhausts
memory or crashes the interpreter takes down only its worker, which is restarted).  Workers are
spawned once and build their runner from a ``WorkerSpec`` (the task rebuilt from
``Task.source``), so nothing is pickled but the spec, plans and records.  The parent keeps the
study, the planner and the trackers: one writer, so sqlite storage is safe.

Latency is timed under an exclusive file lock, so two workers never time at once; training in
another worker can still share the CPU, so for the most stable CPU numbers use one worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from multiprocessing.connection import wait
from typing import Any

from slimforge.search.records import TrialRecord
from slimforge.search.workers import WorkerSpec


def _worker_main(conn, spec: WorkerSpec, memory_limit_bytes: int | None) -> None:
    import resource

    from slimforge.core.plan import Plan
    from slimforge.search.records import record_from_dict

    runner = spec.build_runner()
    if memory_limit_bytes:
        # RLIMIT_AS caps *address space*, so the allowance goes on top of the address space in
        # use now (after the imports: the CUDA build of torch maps gigabytes of virtual ranges at
        # import), not on top of the resident size, which is several times smaller.
        soft = _address_space_bytes() + memory_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            return
        plan, number, history = message
        runner.history = [record_from_dict(r) for r in history]
        record = runner.run(Plan.from_dict(plan), number)
        conn.send(("record", record.to_dict()))


def _address_space_bytes() -> int:
    """This process's virtual address space in bytes (Linux), else its peak resident size."""
    import resource

    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Worker:
    def __init__(self, context, spec: WorkerSpec, memory_limit_bytes: int | None):
        self.parent, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, spec, memory_limit_bytes), daemon=True)
        self.process.start()
        child.close()
        self.job: tuple[Any, int, float] | None = None  # (handle, number, started)
        self.ready = False

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):
                self.parent.send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


class ProcessPool:
    """N spawned workers; ``submit`` a started trial, ``poll`` for finished ones (a
    ``loop.TrialExecutor``)."""

    def __init__(self, workers: int, spec: WorkerSpec, trial_timeout_s: float | None = None,
                 memory_limit_bytes: int | None = None):
        self.context = mp.get_context("spawn")  # fork after torch/OpenMP start-up can deadlock
        self.spec, self.trial_timeout_s, self.memory_limit_bytes = spec, trial_timeout_s, memory_limit_bytes
        self.workers = [self._start() for _ in range(workers)]

    def _start(self) -> _Worker:
        return _Worker(self.context, self.spec, self.memory_limit_bytes)

    def idle(self) -> int:
        return sum(w.job is None for w in self.workers)

    def busy(self) -> int:
        return len(self.workers) - self.idle()

    def submit(self, started, history: list[dict]) -> None:
        """Hand ``started`` (a ``loop.StartedTrial``: its number and plan) to an idle worker;
        ``poll`` returns it with the record."""
        index, worker = next((i, w) for i, w in enumerate(self.workers) if w.job is None)
        if not worker.process.is_alive():  # died while idle (killed from outside): start a fresh one
            worker = self._restart(index)
        worker.job = (started, started.number, time.monotonic())
        worker.parent.send((started.plan.to_dict(), started.number, history))

    def _restart(self, index: int) -> _Worker:
        """Kill worker ``index`` (dead or hung) and start a fresh one in its place."""
        self.workers[index].stop(kill=True)
        self.workers[index] = self._start()
        return self.workers[index]

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every worker has loaded the task (or died: ``poll`` reports that), so that
        start-up is paid once, before the first trial, and not inside any trial's time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(not w.ready and w.process.is_alive() for w in self.workers):
            self.poll(wait_s=1.0)  # no job is out yet: this only takes the workers' "ready" messages

    def poll(self, wait_s: float = 0.2) -> list[tuple[Any, TrialRecord | None, str | None]]:
        """Finished jobs as (handle, record or None, failure reason or None).  Returns as soon as
        a worker sends something or exits, else after ``wait_s`` (to check timeouts)."""
        done = []
        # A dead worker's pipe and sentinel stay "ready" for ever: watch them only while the worker
        # holds a job (then its death is reported below and it is replaced), or the loop would spin.
        watched = [w for w in self.workers if w.job is not None or w.process.is_alive()]
        wait([w.parent for w in watched] + [w.process.sentinel for w in watched if w.job is not None], timeout=wait_s)
        for index, worker in enumerate(self.workers):
            while worker.parent.poll():
                try:
                    kind, payload = worker.parent.recv()
                except EOFError:
                    break
                if kind == "ready":
                    worker.ready = True
                    if worker.job is not None:  # the timeout counts trial time, not worker start-up
                        worker.job = (worker.job[0], worker.job[1], time.monotonic())
                elif kind == "record" and worker.job is not None:
                    from slimforge.search.records import record_from_dict

                    done.append((worker.job[0], record_from_dict(payload), None))
                    worker.job = None
            if worker.job is None:
                continue
            handle, number, started = worker.job
            reason = None
            if not worker.process.is_alive():
                code = worker.process.exitcode
                reason = (f"worker process died (exit code {code}"
                          + (", killed by the OS: out of memory?" if code in (-9, 137) else "") + ")")
            elif (worker.ready and self.trial_timeout_s is not None
                  and time.monotonic() - started > self.trial_timeout_s):
                reason = f"trial exceeded --trial-timeout {self.trial_timeout_s:g} s; its worker was killed"
            if reason:
                self._restart(index)
                done.append((handle, None, reason))
        return done

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(kill=worker.job is not None)
