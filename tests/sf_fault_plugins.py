"""Fault injection for the reliability tests, loaded into `slimforge` subprocesses (and their worker
processes) with ``SLIMFORGE_PLUGINS=sf_fault_plugins``.  Nothing here is imported by slimforge itself.

``SF_FAULT=POINT:N`` SIGKILLs the process the N-th time it reaches POINT (counted per process):

- ``train``     an optimizer step of recovery training (``torch.optim.Adam.step`` inside ``recover``)
- ``measure``   latency timing of a loaded artifact (``slimforge_measure_latency``; the baseline
                takes calls 1 and 2: val and test)
- ``mlflow``    just after the MLflow tracker logged a trial, before the study records it
                (a ``slimforge_trial_end`` implementation that runs after the tracker's)
- ``fsync``     writing an artifact: the temporary file is written and flushed, not yet fsynced
                or renamed (the baseline is fsync 1)
- ``write``     writing an artifact: half of the bytes reach the temporary file
- ``register``  registering a Pareto member in the MLflow Model Registry

Before dying it appends ``POINT:N`` to the file ``SF_FAULT_LOG`` (when set), so a test can tell the
kill happened where it meant.  ``SF_FAULT_SLEEP=POINT:SECONDS`` sleeps there instead (for tests that
kill from outside at random moments).

The ``sf_fault`` technique misbehaves on purpose, one mode per trial from ``SF_FAULT_MODES``
(comma-separated, consumed in trial order; ``ok`` once they run out): ``raise`` (an exception in
``apply``), ``nan`` / ``inf`` (the training loss), ``oom`` (allocates until the memory limit stops
it; gives up harmlessly after 4 GiB), ``hang`` (sleeps for an hour), ``crash`` (the interpreter
exits abruptly), ``ok``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time

import torch

from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Stage, Technique

_counts: dict[str, int] = {}


def _spec(variable: str) -> tuple[str, str] | None:
    value = os.environ.get(variable, "")
    point, _, arg = value.partition(":")
    return (point, arg) if point else None


def reached(point: str) -> None:
    """Count a visit to ``point``; die or sleep there when the environment says so."""
    _counts[point] = _counts.get(point, 0) + 1
    sleep = _spec("SF_FAULT_SLEEP")
    if sleep and sleep[0] == point:
        time.sleep(float(sleep[1]))
    fault = _spec("SF_FAULT")
    if fault and fault[0] == point and _counts[point] == int(fault[1]):
        log = os.environ.get("SF_FAULT_LOG")
        if log:
            with open(log, "a") as handle:
                handle.write(f"{point}:{_counts[point]}\n")
        os.kill(os.getpid(), signal.SIGKILL)


# --- kill points -----------------------------------------------------------------------------------

@hookimpl(tryfirst=True)
def slimforge_measure_latency(model, example_inputs, device, settings):
    reached("measure")
    return None  # firstresult: None passes on to the real timer


@hookimpl(trylast=True)  # after the MLflow tracker's implementation: it has logged the trial
def slimforge_trial_end(record):
    reached("mlflow")


def _install_patches() -> None:
    import slimforge.core.artifact as artifact

    import slimforge.search.objective as objective

    adam_step, recover = torch.optim.Adam.step, objective.recover
    in_recovery = []

    def step(self, *args, **kwargs):
        if in_recovery:  # a teacher trained on first use is not recovery training
            reached("train")
        return adam_step(self, *args, **kwargs)

    def recovering(*args, **kwargs):
        in_recovery.append(True)
        try:
            return recover(*args, **kwargs)
        finally:
            in_recovery.pop()

    torch.optim.Adam.step = step
    objective.recover = recovering

    real_os = artifact.os

    class _HalfWritten:
        """A file whose ``write`` stores half the bytes, then reaches the ``write`` point."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def write(self, data):
            half = len(data) // 2
            self.handle.write(data[:half])
            self.handle.flush()
            reached("write")
            return self.handle.write(data[half:]) + half

        def __getattr__(self, name):
            return getattr(self.handle, name)

    class _OsProxy:
        """``os`` as the artifact writer sees it, with fault points in fsync and fdopen."""

        def __getattr__(self, name):
            return getattr(real_os, name)

        def fsync(self, fd):
            reached("fsync")
            return real_os.fsync(fd)

        def fdopen(self, fd, *args, **kwargs):
            return _HalfWritten(real_os.fdopen(fd, *args, **kwargs))

    artifact.os = _OsProxy()

    try:
        import mlflow
    except ImportError:
        return
    register_model = mlflow.register_model

    def register(*args, **kwargs):
        reached("register")
        return register_model(*args, **kwargs)

    mlflow.register_model = register


if _spec("SF_FAULT") or _spec("SF_FAULT_SLEEP"):
    _install_patches()


# --- a technique that fails on purpose ---------------------------------------------------------------

MODES = ("ok", "raise", "nan", "inf", "oom", "hang", "crash")
_schedule = itertools.count()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaultConfig:
    mode: str = "ok"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")


class FaultTechnique(Technique):
    name = "sf_fault"
    family = "fault"
    stage = Stage.SPARSITY + 1
    Config = FaultConfig
    description = "test-only: fails on purpose (see tests/sf_fault_plugins.py)"
    needs_recovery = True  # so that plans train, and a NaN loss can happen

    def suggest(self, space, task):
        modes = [m for m in os.environ.get("SF_FAULT_MODES", "").split(",") if m]
        index = next(_schedule)  # suggest runs in the search process, once per trial, in order
        return FaultConfig(mode=modes[index] if index < len(modes) else "ok")

    def apply(self, model, config, ctx):
        if config.mode == "raise":
            raise ValueError("injected fault: this technique always fails")
        if config.mode == "oom":
            held = []
            for _ in range(16):  # 16 x 256 MiB: far past any limit a test sets, harmless without one
                held.append(torch.ones(64 * 2**20))
            ctx.note(f"allocated {len(held) * 256} MiB without hitting a memory limit")
        if config.mode == "hang":
            time.sleep(3600)
        if config.mode == "crash":
            os._exit(3)
        return model

    def training_loss(self, model, batch, loss, config, ctx):
        if config.mode in ("nan", "inf"):
            return loss * float(config.mode)
        return loss


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(FaultTechnique)
