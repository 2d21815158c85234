"""One trial: plan -> compressed model -> artifact file -> measurements of the *loaded* artifact.

Measuring the model decoded from the file (not the in-memory one) is what makes the numbers
honest: the bytes are the file's, and the accuracy and latency are of what a user will load.
"""

from __future__ import annotations

import copy
import math
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimforge.core.compressed import save_model
from slimforge.core.errors import SlimforgeError, TrialRejected
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, Measurements, evaluate, measure_artifact
from slimforge.core.plan import Plan, Recovery
from slimforge.core.recovery import AppliedStep, RecoveryLog, TeacherOutputs, recover
from slimforge.core.task import Task
from slimforge.core.technique import Stage, TechniqueContext
from slimforge.search.budgets import Budgets
from slimforge.search.records import COMPLETE, FAILED, REJECTED, TrialRecord

# Entropy coding makes the final size depend slightly on the fine-tuned values; the pre-training
# estimate must overshoot the budget by more than this before a plan is rejected untrained.
SIZE_ESTIMATE_SLACK = 0.02
# Early stopping assumes a trial may still gain at least this much per remaining epoch.
MIN_EPOCH_GAIN = 0.005
# Successive halving (``TrialRunner.early_stop``): rungs at epochs 1, 3, 9, ...; a trial goes on
# past a rung only in the top 1/HALVING_RATE of its size-comparable rivals, and only once there
# are HALVING_MIN_RIVALS rivals to compare with (Optuna's ``bootstrap_count``).
HALVING_RATE = 3
HALVING_MIN_RIVALS = 2
# A trial's files in the artifact folder: its artifact, and the size estimate made before
# fine-tuning (deleted once its size is known).  ``TRIAL_FILE`` recognises both.
TRIAL_FILE = re.compile(r"^trial-(?P<number>\d{4,})(?P<estimate>\.estimate)?\.slim$")


def trial_artifact_path(artifact_dir: Path, number: int, *, estimate: bool = False) -> Path:
    return artifact_dir / f"trial-{number:04d}{'.estimate' if estimate else ''}.slim"


def halving_rungs(up_to: int) -> set[int]:
    """The rung epochs 1, HALVING_RATE, HALVING_RATE**2, ... up to ``up_to``."""
    rungs, epoch = set(), 1
    while epoch <= up_to:
        rungs.add(epoch)
        epoch *= HALVING_RATE
    return rungs


def _size_of(record: TrialRecord) -> int | None:
    """A finished trial's artifact bytes, or its size estimate when it was never measured."""
    return record.measurements.size_bytes if record.measurements is not None else record.size_estimate_bytes


def _out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is an allocation failure: Python's MemoryError, or
    torch's allocator error, which is a RuntimeError whose message says so."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class TrialRunner:
    task: Task
    plugins: Plugins
    budgets: Budgets
    artifact_dir: Path
    device: str = "cpu"
    latency: LatencySettings = LatencySettings()
    history: list[TrialRecord] = field(default_factory=list)  # finished trials, for early stopping
    latency_lock: Path | None = None  # held while timing, so concurrent workers never time at once
    # Rebuilding a recorded trial (`slimforge reproduce`): train exactly this many epochs, the
    # number the original trial trained before it finished or was stopped early.
    replay_epochs: int | None = None
    # The search's registration floor (``search.pareto``): without an accuracy budget, early
    # stopping projects against it, since a trial under it can never be on the front.
    front_floor: float | None = None
    # Told what a trial is doing, ``progress(number, phase, epoch=, epochs=, score=)``, for the
    # terminal's live line (``loop.Progress.phase``); None: nobody listens.
    progress: Callable[..., None] | None = None

    def __post_init__(self) -> None:
        self._teacher_outputs: TeacherOutputs | None = None

    @property
    def teacher_outputs(self) -> TeacherOutputs:
        """Teacher logits on the training split, computed on first use and shared by all trials.
        Built lazily: measuring an artifact (``slimforge evaluate``) must not build the teacher."""
        if self._teacher_outputs is None:
            self._teacher_outputs = TeacherOutputs(self.task.teacher, self.task.split("train"), self.device)
        return self._teacher_outputs

    def run(self, plan: Plan, number: int) -> TrialRecord:
        record = TrialRecord(number=number, state=FAILED, plan=plan.to_dict(), plan_text=plan.describe(),
                             torch_threads=torch.get_num_threads())
        started = time.perf_counter()
        try:
            self._run(plan, record)
        except TrialRejected as exc:
            record.state, record.failure_reason = REJECTED, str(exc)
        except Exception as exc:  # a trial that raises fails alone; the search goes on
            record.state = FAILED
            record.failure_reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if _out_of_memory(exc):
                record.failure_reason = f"out of memory: {record.failure_reason}"
            if not isinstance(exc, SlimforgeError):
                record.notes.append(traceback.format_exc(limit=4))
        record.duration_s = time.perf_counter() - started
        return record

    def _apply(self, model, steps, plan: Plan, record: TrialRecord) -> tuple[torch.nn.Module, list[AppliedStep]]:
        applied = []
        for step in steps:
            technique = self.plugins.registry.get(step.technique)
            config = technique.config_from_dict(step.config)
            ctx = TechniqueContext(task=self.task, device=self.device, seed=plan.seed)
            try:
                model = technique.apply(model, config, ctx)
            except SlimforgeError:
                raise
            except Exception as exc:
                raise RuntimeError(f"technique {technique.name!r} ({self.plugins.registry.source_of(technique.name)}) "
                                   f"raised {type(exc).__name__}: {exc}") from exc
            record.notes.extend(ctx.notes)
            applied.append(AppliedStep(technique, config, ctx))
        return model, applied

    def _split_steps(self, plan: Plan):
        """(before sharing, sharing and training-only, finishing) steps.  The first two are
        structural (applied before recovery); the middle group is empty unless the plan retrains
        before sharing, in which case it starts at the first sharing step."""
        stage = {s.technique: self.plugins.registry.get(s.technique).stage for s in plan.steps}
        structural = [s for s in plan.steps if stage[s.technique] < Stage.RECOVERY]
        finishing = [s for s in plan.steps if stage[s.technique] >= Stage.RECOVERY]
        if not plan.recovery.before_sharing_epochs:
            return structural, [], finishing
        return ([s for s in structural if stage[s.technique] < Stage.SHARING],
                [s for s in structural if stage[s.technique] >= Stage.SHARING], finishing)

    def _phase(self, number: int, phase: str, **info) -> None:
        if self.progress is not None:
            self.progress(number, phase, **info)

    def _run(self, plan: Plan, record: TrialRecord) -> None:
        self._phase(record.number, "applying the plan")
        torch.manual_seed(plan.seed)
        artifact = trial_artifact_path(self.artifact_dir, record.number)
        before_sharing, sharing, finishing = self._split_steps(plan)
        model, applied = self._apply(copy.deepcopy(self.task.teacher), before_sharing, plan, record)

        size_estimate = None
        if plan.recovery.epochs > 0:
            self._phase(record.number, "estimating size")
            # Structure fixes the size up to entropy-coding noise: finish a copy now and reject
            # the plan before paying for fine-tuning if its file would already be too big.  The
            # estimate also feeds the early-stopping dominance rule.
            estimate_model, estimate_applied = self._apply(copy.deepcopy(model), sharing + finishing, plan,
                                                           TrialRecord(0, "", {}, ""))
            estimate_path = trial_artifact_path(self.artifact_dir, record.number, estimate=True)
            try:
                size_estimate = save_model(estimate_model, estimate_path, task=self.task, plan=plan,
                                           structure=[step.ctx.structure for step in applied + estimate_applied])
            finally:
                estimate_path.unlink(missing_ok=True)  # only its size matters; no orphan files
            record.size_estimate_bytes = size_estimate
            limit = self.budgets.max_size_bytes
            if limit is not None and size_estimate > limit * (1 + SIZE_ESTIMATE_SLACK):
                record.violations = self.budgets.violations(size_bytes=size_estimate)
                raise TrialRejected(f"size {size_estimate} B before fine-tuning exceeds the budget {limit} B; "
                                    "rejected untrained")

        val = self.task.split("val")
        retrain_seconds = 0.0
        if sharing:
            self._phase(record.number, "retraining before sharing")
            retrain = recover(model, applied, self.task.split("train"),
                              Recovery(epochs=plan.recovery.before_sharing_epochs, lr=plan.recovery.lr),
                              device=self.device, seed=plan.seed, teacher_outputs=self.teacher_outputs)
            retrain_seconds = retrain.seconds
            record.notes.append(f"retrained {plan.recovery.before_sharing_epochs} epoch(s) before sharing "
                                f"(loss per epoch {', '.join(f'{x:.4f}' for x in retrain.losses)})")
            model, shared = self._apply(model, sharing, plan, record)
            applied += shared
        def epoch_end(log: RecoveryLog, left: int) -> str | None:
            self._phase(record.number, "fine-tuning", epoch=len(log.scores), epochs=plan.recovery.epochs,
                        score=log.scores[-1])
            return self.early_stop(log, left, size_estimate)

        if plan.recovery.epochs:
            self._phase(record.number, "fine-tuning", epochs=plan.recovery.epochs)
        log = RecoveryLog() if plan.recovery.epochs == 0 else recover(model, applied, self.task.split("train"), plan.recovery, device=self.device, seed=plan.seed,
                      teacher_outputs=self.teacher_outputs,
                      score=lambda m: evaluate(m, val, self.task.metric, device=self.device),
                      should_stop=epoch_end)
        record.epoch_losses, record.epoch_scores = log.losses, log.scores
        record.stopped_early, record.training_seconds = log.stopped_early, retrain_seconds + log.seconds
        model, finished = self._apply(model.to("cpu") if finishing else model, finishing, plan, record)
        self._phase(record.number, "saving and measuring the artifact")
        save_model(model, artifact, task=self.task, plan=plan, structure=[s.ctx.structure for s in applied + finished])
        record.artifact_path = str(artifact)
        record.measurements = self.measure(artifact, split="val")
        m = record.measurements
        record.violations = self.budgets.violations(**m.to_dict())  # every budget whose measurement is known
        record.feasible = Budgets.feasible(record.violations)
        record.state = COMPLETE

    def early_stop(self, log: RecoveryLog, epochs_left: int, size_estimate: int | None) -> str | None:
        """Multi-fidelity: stop a hopeless trial after an epoch of recovery training.

        Two rules, each recorded in the trial's ``stopped_early`` (the study marks it PRUNED):
        - **the accuracy budget**: project the final score optimistically (the current score plus,
          for every epoch left, the largest per-epoch gain seen so far, at least ``MIN_EPOCH_GAIN``)
          and stop when even that misses ``min_accuracy``;
        - **successive halving** (the rule of Optuna's ``SuccessiveHalvingPruner``, which Optuna
          offers only for single-objective studies): at the rung epochs 1, 3, 9, ... the trial
          goes on only if its validation score is among the top 1/``HALVING_RATE`` of the scores
          that the trials *at least as small* (size estimate) reached at the same epoch.  Comparing
          only with smaller trials is what makes it right for a size-accuracy front: a small model
          is never stopped for trailing bigger ones, and a big one only for trailing smaller ones."""
        if self.replay_epochs is not None:
            done = len(log.scores)
            return f"replayed the recorded {done} epoch(s)" if epochs_left and done >= self.replay_epochs else None
        if epochs_left == 0 or not log.scores:
            return None
        history = [log.score_before, *log.scores] if log.score_before is not None else log.scores
        gains = [b - a for a, b in zip(history, history[1:])]
        projected = log.scores[-1] + epochs_left * max([MIN_EPOCH_GAIN, *gains])
        floor, what = self.budgets.min_accuracy, "min accuracy"
        if floor is None and self.front_floor is not None:
            floor, what = self.front_floor, "the registration floor (never on the front)"
        if floor is not None and projected < floor - 1e-6:  # a tie in float noise is not a miss
            return (f"stopped after epoch {len(log.scores)}: validation {log.scores[-1]:.4f}, optimistic final "
                    f"{projected:.4f} < {what} {floor:.4f}")
        return self._halving(log, size_estimate)

    def _halving(self, log: RecoveryLog, size_estimate: int | None) -> str | None:
        epoch, score = len(log.scores), log.scores[-1]
        if size_estimate is None or epoch not in halving_rungs(epoch):
            return None
        limit = size_estimate * (1 + SIZE_ESTIMATE_SLACK)
        rivals = [other.epoch_scores[epoch - 1] for other in self.history
                  if len(other.epoch_scores) >= epoch and (_size_of(other) or math.inf) <= limit]
        if len(rivals) < HALVING_MIN_RIVALS:
            return None
        ranked = sorted([*rivals, score], reverse=True)
        keep = max(1, len(ranked) // HALVING_RATE)
        if score >= ranked[keep - 1]:
            return None
        return (f"stopped after epoch {epoch} by successive halving: validation {score:.4f} is not in the top "
                f"{keep} of {len(ranked)} (>= {ranked[keep - 1]:.4f}) among trials at most ~{size_estimate} B "
                f"at that epoch")

    def measure(self, artifact: Path | str, split: str) -> Measurements:
        """Load the artifact as a user would, then measure it (``core.measure.measure_artifact``)."""
        return measure_artifact(artifact, task=self.task, plugins=self.plugins, split=split, device=self.device,
                                latency=self.latency, latency_lock=self.latency_lock)
