"""The trial loop: ask -> run -> tell, for every backend.

``TrialLoop`` owns a process's share of a study: it stops starting trials at the study's total
or the search's timeout, claims each trial it asks for (``study.claim_trial``), samples its plan,
records it as started, and when the trial's record comes back stores it (``study.finish_trial``),
refreshes the progress bar and the early-stopping history, and times its own overhead.

Backends differ only in *where* a trial runs:
- ``InProcess``: here, one at a time;
- ``executor.ProcessPool``: in worker processes (``--workers``, ``--trial-timeout``, ...);
- Ray Tune (``backends.ray``): Tune calls the loop's ``start`` / ``finish`` from its searcher.
``run`` drives the first two through the same three calls a trial runner offers: ``idle``,
``submit``, ``poll``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from slimforge.core.measure import Measurements
from slimforge.core.plan import Plan
from slimforge.search.records import TrialRecord, failed_record, record_from_dict
from slimforge.search.reports import progress_text
from slimforge.search.seeds import SEED_ATTR
from slimforge.search.study import claim_trial, counted, finish_trial, log


@dataclass
class SearchContext:
    """What a process needs to run its share of a search's trials."""

    backend: Any  # OptunaBackend: the study, where every record is stored
    planner: Any  # core.planner.Planner
    runner: Any  # objective.TrialRunner: this process's runner (early-stopping history, artifacts)
    plugins: Any  # core.manager.Plugins
    task: Any  # core.task.Task
    settings: Any  # settings.SearchSettings, resolved
    baseline: Measurements
    # Per trial run by this process's loop: wall seconds from asking the backend for it to its
    # record being stored.  Minus the trial's own duration_s, that is the loop's overhead.
    loop_seconds: dict[int, float] = field(default_factory=dict)


@dataclass
class StartedTrial:
    trial: Any  # the backend's trial handle (optuna.Trial)
    plan: Plan
    asked: float  # time.monotonic() when the loop asked for it

    @property
    def number(self) -> int:
        return self.trial.number


class TrialExecutor(Protocol):
    """Where trials run: ``submit`` a started trial; ``poll`` returns ``(trial, record, failure)``
    for each finished one (record None: it ended without one, for ``failure``)."""

    def idle(self) -> int: ...
    def submit(self, started: StartedTrial, history: list[dict]) -> None: ...
    def poll(self) -> list[tuple[StartedTrial, TrialRecord | None, str | None]]: ...
    def close(self) -> None: ...


class InProcess:
    """Runs each trial here, as it is submitted."""

    def __init__(self, runner):
        self.runner, self.finished = runner, []

    def idle(self) -> int:
        return 0 if self.finished else 1

    def submit(self, started: StartedTrial, history: list[dict]) -> None:
        self.finished.append((started, self.runner.run(started.plan, started.number), None))

    def poll(self):
        finished, self.finished = self.finished, []
        return finished

    def close(self) -> None:
        pass


class TrialLoop:
    def __init__(self, ctx: SearchContext):
        self.ctx = ctx
        self.started_at = time.monotonic()
        self.stopped = False  # no more trials are started (total or timeout reached)
        done = counted(ctx.backend.study)
        if done:
            log(f"study {ctx.settings.study!r}: {done} trial(s) already recorded, running or queued; "
                f"{max(0, ctx.settings.trials - done)} to go")
        self.progress = Progress(ctx, done)

    def remaining(self) -> int:
        return max(0, self.ctx.settings.trials - counted(self.ctx.backend.study))

    def may_start(self) -> bool:
        """False once the study holds its total (counting trials other processes asked) or the
        search's timeout has passed; logs the timeout once."""
        timeout = self.ctx.settings.timeout_s
        if not self.stopped and timeout is not None and time.monotonic() - self.started_at > timeout:
            log(f"timeout of {timeout:g} s reached; no new trials are started")
            self.stopped = True
        if not self.stopped and self.remaining() == 0:
            self.stopped = True
        return not self.stopped

    def plan_for(self, trial) -> Plan:
        """The define-by-run space: the planner asks the trial for every choice."""
        from slimforge.search.space import OptunaSuggester

        space = OptunaSuggester(trial, per_layer=self.ctx.settings.per_layer_knobs)
        return self.ctx.planner.sample(space, self.ctx.task, seed=self.ctx.settings.seed + trial.number)

    def start(self, trial=None, plan: Plan | None = None, asked: float | None = None) -> StartedTrial | None:
        """Start one trial: ask the backend for it, claim it, and record it as started, so a kill
        from now on still leaves its plan.  None when no trial may start.  Ray Tune asks for its
        trials itself: it passes the ``trial`` it asked for (``may_start`` already checked), its
        ``plan`` and when it ``asked``."""
        asked = asked if asked is not None else time.monotonic()
        if trial is None:
            if not self.may_start():
                return None
            trial = self.ctx.backend.ask()
        if not claim_trial(self.ctx.backend.study, trial, self.ctx.settings.trials):
            self.stopped = True
            return None
        try:
            plan = plan or self.plan_for(trial)
        except BaseException as exc:  # the trial is claimed: close it, so no crash leaves it RUNNING
            reason = f"could not sample a plan: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            finish_trial(self.ctx.backend, self.ctx.plugins, trial,
                         failed_record(trial.number, {}, "(not sampled)", reason, time.monotonic() - asked))
            raise
        self.ctx.backend.started(trial, plan.to_dict(), plan.describe())
        self.ctx.plugins.trial_start(trial.number, plan)
        return StartedTrial(trial=trial, plan=plan, asked=asked)

    def finish(self, started: StartedTrial, record: TrialRecord | None, failure: str | None = None) -> None:
        """Store the trial's record (or a failed one, for ``failure``) and let everyone see it."""
        if record is None:
            record = failed_record(started.number, started.plan.to_dict(), started.plan.describe(), failure,
                                   time.monotonic() - started.asked)
        seed = getattr(started.trial, "user_attrs", {}).get(SEED_ATTR)
        if seed:
            record.notes.insert(0, f"expert seed: {seed}")
        finish_trial(self.ctx.backend, self.ctx.plugins, started.trial, record)
        self.progress.finished()
        self.ctx.loop_seconds[started.number] = time.monotonic() - started.asked

    def history(self) -> list[dict]:
        """What a trial running elsewhere needs for early stopping: the finished trials."""
        return [r.to_dict() for r in self.ctx.runner.history]

    def run(self, executor: TrialExecutor) -> None:
        """Start trials while the executor has room and trials may start; store each as it ends."""
        running: dict[int, StartedTrial] = {}
        try:
            while True:
                while executor.idle() and (started := self.start()) is not None:
                    running[started.number] = started
                    executor.submit(started, self.history())
                if not running:
                    break
                for started, record, failure in executor.poll():
                    running.pop(started.number, None)
                    self.finish(started, record, failure)
        except BaseException:  # Ctrl-C or a crash: this process's trials end here, none stays RUNNING
            from slimforge.search.backends.optuna import INTERRUPTED

            for started in running.values():
                try:
                    self.finish(started, None, INTERRUPTED)
                except Exception:  # the storage itself may be what failed; a resume closes it then
                    pass
            raise
        finally:
            self.close()
            executor.close()

    def close(self) -> None:
        self.progress.close()


class Progress:
    """The progress bar: its position and postfix come from the study, so trials finished by
    other workers count too."""

    def __init__(self, ctx: SearchContext, done: int):
        from tqdm.auto import tqdm

        self.ctx = ctx
        self.bar = tqdm(total=ctx.settings.trials, initial=done, desc="trials", unit="trial", file=sys.stderr,
                        disable=not ctx.settings.progress, dynamic_ncols=True)

    def finished(self) -> None:
        """Call after a record is stored; also refreshes the runner's history (early stopping)."""
        records = [record_from_dict(r) for r in self.ctx.backend.records()]
        self.ctx.runner.history = records
        self.bar.n = min(len(records), self.bar.total)
        self.bar.set_postfix_str(progress_text(records, self.ctx.baseline))  # also redraws

    def close(self) -> None:
        self.bar.close()
