"""Optuna backend: a multi-objective study (accuracy up, size down, latency down) in RDB storage.

Budgets reach the sampler as constraints, so TPE learns where the feasible region is; plans
rejected before training are told as PRUNED with their size violation, so even they teach the
sampler.  Storage defaults to a sqlite file, which is what makes ``--study NAME`` resume an
interrupted search: finished trials are in the file.

What other Optuna tools read is stored their way: the objectives are named (``study.metric_names``:
accuracy, size_bytes, latency_ms); constraints are the ``constraints`` system attr, one list per
trial in the order of the study's ``constraint_names`` user attr (what ``constraints_func`` writes,
what ``study.best_trials`` and optuna-dashboard's feasibility marks read); user attrs are plain
JSON values (the record as an object; its state, plan and feasibility as strings and booleans),
never JSON text inside JSON.  Studies written before this (attrs as JSON text, constraints as
``constraints:<kind>``) are still read and resumed.
"""

from __future__ import annotations

import json
import logging
import warnings

from slimforge.core.errors import MissingDependencyError, UnknownNameError
from slimforge.search.budgets import Budgets, budget_fields
from slimforge.search.settings import SAMPLERS
from slimforge.search.records import COMPLETE, FAILED, REJECTED, STOPPED, TrialRecord, record_from_dict

try:
    import optuna
except ImportError as exc:  # pragma: no cover - optuna is a core dependency, but say so clearly
    raise MissingDependencyError("optuna", "the Optuna search backend") from exc

DIRECTIONS = ("maximize", "minimize", "minimize")  # accuracy, size_bytes, latency_ms
METRIC_NAMES = ("accuracy", "size_bytes", "latency_ms")  # the TrialRecord fields the values are
RECORD_ATTR = "slimforge_record"
PLAN_ATTR = "slimforge_plan"
# Optuna's key for a trial's constraint list (optuna.study._constrained_optimization._CONSTRAINTS_KEY,
# the one ``constraints_func`` writes).  Optuna 5's ``Trial.set_constraint`` writes one
# ``constraints:<name>`` key per constraint instead, which optuna-dashboard does not read.
CONSTRAINTS_ATTR = "constraints"
CONSTRAINT_NAMES_ATTR = "constraint_names"  # study user attr: what each position of the list limits
INTERRUPTED = "interrupted (the search was stopped while this trial ran)"


def make_sampler(name: str, seed: int, n_startup_trials: int = 8):
    """The study's sampler.  All of them read the budgets as constraints (``Trial.set_constraint``).

    - ``tpe``: multivariate TPE with ``group=True``, which models the conditional space (each
      technique's knobs exist only in plans that use it) as groups of parameters that occur together,
      instead of falling back to independent sampling for them;
    - ``nsga2``: Optuna's NSGA-II genetic algorithm;
    - ``gp``: Optuna's Gaussian-process sampler (log expected hypervolume improvement);
    - ``random``: the baseline a model-based sampler has to beat.
    The default is chosen by measurement (benchmarks/search_quality.py)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup_trials))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True)


class OptunaBackend:
    def __init__(self, *, storage: str, study_name: str, seed: int, budgets: Budgets, n_startup_trials: int = 8,
                 close_interrupted: bool = True, sampler_name: str = "tpe"):
        """``close_interrupted``: close trials a killed search left RUNNING (see ``interrupted``).
        A worker joining a study that other workers are running passes False: their trials are
        running, not interrupted.  ``run_search`` passes False too and closes them itself, after
        its trackers started, so they see those trials like any other."""
        optuna.logging.set_verbosity(logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.budgets = budgets

        if sampler_name not in SAMPLERS:  # checked by SearchSettings too; this guards direct use
            raise UnknownNameError("--sampler", sampler_name, SAMPLERS)

        def sampler(seed):
            return make_sampler(sampler_name, seed, n_startup_trials)

        from slimforge.search.study import study_storage  # here: study imports this module's records lazily too

        self.study = optuna.create_study(storage=study_storage(storage), study_name=study_name, directions=list(DIRECTIONS),
                                         sampler=sampler(seed), load_if_exists=True)
        if self.study.metric_names is None:  # also names the objectives of a study made before they were named
            self.study.set_metric_names(list(METRIC_NAMES))
        # Budgets with a limit, in declaration order: position i of every trial's constraint list.
        self.constraint_names = [meta["kind"] for f, meta in budget_fields()
                                 if meta["kind"] and getattr(budgets, f.name) is not None]
        recorded = len(self.study.get_trials(deepcopy=False))
        if recorded:
            # A seeded sampler restarts its random stream in every process, so a resumed study
            # would re-draw the plans of its first (random start-up) trials.  Offsetting the seed
            # by the trials already recorded continues the search and stays reproducible.
            self.study.sampler = sampler(seed + recorded)
        if close_interrupted:
            self._close_interrupted_trials()

    def _close_interrupted_trials(self) -> None:
        """A trial left RUNNING by a killed search never finishes: close it on resume (only one
        whose owner is gone: ``study.running_trials``)."""
        from slimforge.search.study import running_trials

        stale, _ = running_trials(self.study)
        for trial, record in self.interrupted():
            if record.number in stale:
                self.tell(trial, record)

    def interrupted(self) -> list[tuple[object, TrialRecord]]:
        """Trials a killed search left RUNNING, each with the record to close it with.

        A trial whose measured record was saved (``save_pending``) before the kill finished its
        work and only missed ``tell``: it comes back as it was measured, so nothing finished is
        lost.  Any other is a failed record ("interrupted") that keeps the plan saved by
        ``started``.  The caller tells them (after trackers saw them, like any trial)."""
        out = []
        for frozen in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            trial = optuna.Trial(self.study, frozen._trial_id)
            if RECORD_ATTR in frozen.user_attrs:
                record = record_from_dict(attr_value(frozen.user_attrs[RECORD_ATTR]))
                note = "recovered on resume: measured before the search was stopped"
                if record.state != FAILED and note not in record.notes:
                    record.notes.append(note)
            else:
                plan = attr_value(frozen.user_attrs.get(PLAN_ATTR, {}))
                record = TrialRecord(number=frozen.number, state=FAILED, plan=plan.get("plan", {}),
                                     plan_text=plan.get("text", "(unknown: interrupted)"),
                                     failure_reason=INTERRUPTED)
            out.append((trial, record))
        return out

    def started(self, trial, plan: dict, plan_text: str) -> None:
        """Keep the plan with the running trial, so a kill leaves a record of what ran."""
        storage = self.study._storage
        storage.set_trial_user_attr(trial._trial_id, PLAN_ATTR, {"plan": plan, "text": plan_text})
        storage.set_trial_user_attr(trial._trial_id, "plan", plan_text)  # a readable column in optuna-dashboard

    def save_pending(self, trial, record: TrialRecord) -> None:
        """Store the measured record before trackers run: a kill between here and ``tell``
        loses nothing (``interrupted`` returns it on resume)."""
        self.study._storage.set_trial_user_attr(trial._trial_id, RECORD_ATTR, record.to_dict())

    def finished_count(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def records(self) -> list[dict]:
        """Every recorded trial of the study (including earlier runs of a resumed study)."""
        return [attr_value(t.user_attrs[RECORD_ATTR]) for t in self.study.get_trials(deepcopy=False)
                if RECORD_ATTR in t.user_attrs]

    def ask(self):
        return self.study.ask()

    def tell(self, trial, record: TrialRecord) -> None:
        """Store the record with the trial and tell the sampler: values and constraints for a
        complete trial, the size violation for a rejected one (PRUNED), PRUNED for one a
        scheduler stopped, FAIL otherwise."""
        storage, trial_id = self.study._storage, trial._trial_id
        storage.set_trial_user_attr(trial_id, RECORD_ATTR, record.to_dict())
        storage.set_trial_user_attr(trial_id, "state", record.state)
        # The validation score after each recovery epoch, as Optuna's intermediate values (step =
        # epoch), so the dashboard draws learning curves.  ``Trial.report`` refuses multi-objective
        # studies; the storage call it would make does not.
        for epoch, score in enumerate(record.epoch_scores, start=1):
            storage.set_trial_intermediate_value(trial_id, epoch, score)
        if record.state in (COMPLETE, REJECTED) and self.constraint_names:
            if self.study.user_attrs.get(CONSTRAINT_NAMES_ATTR) != self.constraint_names:
                self.study.set_user_attr(CONSTRAINT_NAMES_ATTR, self.constraint_names)
            storage.set_trial_system_attr(trial_id, CONSTRAINTS_ATTR, self.constraints(record))
        if record.state in (COMPLETE, REJECTED):
            storage.set_trial_user_attr(trial_id, "feasible", record.feasible)
        if record.state == COMPLETE:
            m = record.measurements
            self.study.tell(trial, [m.accuracy, m.size_bytes, m.latency_ms])
        elif record.state in (REJECTED, STOPPED):
            # Optuna's word for a trial ended early is PRUNED.  A stopped trial has no
            # measurements, so no constraints either: the sampler learns nothing false from it.
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            storage.set_trial_user_attr(trial_id, "failure_reason", record.failure_reason or "unknown")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def constraints(self, record: TrialRecord) -> list[float]:
        """The trial's violations relative to their limits, in ``constraint_names`` order.  A
        budget not measured yet (a plan rejected on its size has no accuracy) is 0.0: nothing
        says it is violated, and the size alone already makes the trial infeasible."""
        normalized = self.budgets.normalized(record.violations)
        return [float(normalized.get(name, 0.0)) for name in self.constraint_names]


def attr_value(value):
    """A user attr as stored: a plain JSON value, or (studies written before) JSON text."""
    return json.loads(value) if isinstance(value, str) else value
