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

Ctrl-C stops ``run``: the trials this process was running are closed FAIL with the reason
"interrupted" (one measured before the key was pressed keeps its measurements), the trackers see
them like any trial, and the KeyboardInterrupt goes on up, where the search writes its partial
summary.  No trial is left RUNNING for a resume to clean up.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from slimforge.core.measure import Measurements
from slimforge.core.plan import Plan
from slimforge.search.records import TrialRecord, failed_record, record_from_dict
from slimforge.search.reports import progress_text
from slimforge.search.seeds import SEED_ATTR
from slimforge.search.study import WORKER_ATTR, claim_trial, counted, finish_trial, log, this_process


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
        if hasattr(ctx.runner, "progress"):  # trials run here tell the live line their phase and epoch
            ctx.runner.progress = self.progress.phase

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
        self.progress.started(trial.number, plan.describe())
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
        self.progress.finished(record)
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
                    self.finish(started, record, failure)
                    running.pop(started.number, None)  # after finish: a Ctrl-C inside it still closes the trial
        except BaseException:  # Ctrl-C or a crash: this process's trials end here, none stays RUNNING
            try:
                # Also the trial claimed but not yet started (a trial-start hook that raised).
                self.close_interrupted(running)
            except Exception:  # the storage itself may be what failed; a resume closes it then
                pass
            raise
        finally:
            self.close()
            executor.close()

    def close_interrupted(self, running: dict[int, StartedTrial]) -> None:
        """After Ctrl-C or a crash: close every trial this process still holds RUNNING (those it was
        running, and one it had claimed but not yet started) the way a resume would
        (``OptunaBackend.interrupted``), at once, through the trackers."""
        import optuna

        backend = self.ctx.backend
        mine = {t.number for t in backend.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if t.number in running or t.user_attrs.get(WORKER_ATTR) == this_process()}
        for trial, record in backend.interrupted():
            if record.number not in mine:
                continue  # another process's trial (`slimforge worker`): it is running, not interrupted
            if record.number in running and not record.duration_s:
                record.duration_s = time.monotonic() - running[record.number].asked
            finish_trial(backend, self.ctx.plugins, trial, record)
            self.progress.finished(record)

    def close(self) -> None:
        self.progress.close()


class Progress:
    """What the terminal shows while trials run.

    - On a terminal: tqdm's bar (trials done out of the study's total, with the study's counts,
      hypervolume and best feasible trial) and, under it, a live line for the running trial: its
      number, phase, epoch and plan, cut to the terminal's width.
    - Not a terminal (a log file, CI, a pipe): one plain line per event (trial started, phase,
      epoch, trial finished), each ending in a newline, never a carriage return.
    - ``--no-progress``: nothing.

    The bar's position and postfix come from the study, so trials finished by other workers
    count too."""

    def __init__(self, ctx: SearchContext, done: int, stream=None):
        self.ctx, self.stream = ctx, stream or sys.stderr
        self.done, self.total = done, ctx.settings.trials
        self.mode = "off" if not ctx.settings.progress else "bar" if _isatty(self.stream) else "lines"
        self.running: dict[int, str] = {}  # trial number -> plan text
        self.bar = self.status = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=done, desc="trials", unit="trial", file=self.stream,
                            dynamic_ncols=True)
            self.status = tqdm(total=0, position=1, bar_format="{desc}", file=self.stream, leave=False)

    def _line(self, text: str) -> None:
        if self.mode == "lines":
            print(text, file=self.stream, flush=True)
        elif self.mode == "bar":
            width = shutil.get_terminal_size().columns - 1
            self.status.set_description_str(text if len(text) <= width else text[:max(width - 3, 0)] + "...")

    def started(self, number: int, plan_text: str) -> None:
        self.running[number] = plan_text
        self._line(f"trial {number}: started: {plan_text}")

    def phase(self, number: int, phase: str, epoch: int | None = None, epochs: int | None = None,
              score: float | None = None) -> None:
        """The running trial's phase (applying, estimating size, fine-tuning, measuring ...);
        while fine-tuning, the epoch just finished of ``epochs`` and its validation score."""
        text = f"trial {number}: {phase}"
        if epoch is not None:
            text += f" epoch {epoch}/{epochs}" + (f", val {score:.4f}" if score is not None else "")
        elif epochs is not None:
            text += f" ({epochs} epoch{'s' if epochs != 1 else ''})"
        self._line(text + (f" | {self.running[number]}" if self.mode == "bar" and number in self.running else ""))

    def finished(self, record: TrialRecord) -> None:
        """Call after a record is stored; also refreshes the runner's history (early stopping)."""
        records = [record_from_dict(r) for r in self.ctx.backend.records()]
        self.ctx.runner.history = records
        self.running.pop(record.number, None)
        summary = progress_text(records, self.ctx.baseline)
        if self.mode == "bar":
            self.bar.n = min(len(records), self.bar.total)
            self.bar.set_postfix_str(summary)  # also redraws
            self._line(next((f"trial {n}: running | {text}" for n, text in self.running.items()), ""))
        elif self.mode == "lines":
            self._line(f"trial {record.number}: {trial_outcome(record)} [{min(len(records), self.total)}/{self.total}] "
                       f"{summary}")

    def close(self) -> None:
        for bar in (self.status, self.bar):
            if bar is not None:
                bar.close()


def trial_outcome(record: TrialRecord) -> str:
    """One trial's result in a few words: its state and measurements, or why it has none."""
    m = record.measurements
    if m is not None:
        feasible = "feasible" if record.feasible else "infeasible"
        return (f"{record.state}, acc {m.accuracy:.4f}, {m.size_bytes / 1000:.1f} KB, {m.latency_ms:.3f} ms, "
                f"{feasible}")
    return f"{record.state}: {record.failure_reason or record.stopped_early or 'no measurements'}"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a terminal
        return False
