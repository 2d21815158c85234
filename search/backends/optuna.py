"""Optuna backend: a multi-objective study (accuracy up, size down, latency down) in RDB storage.

Budgets reach the sampler as constraints (``Trial.set_constraint``), so TPE learns where the
feasible region is; plans rejected before training are told as PRUNED with their size violation,
so even they teach the sampler.  Storage defaults to a sqlite file, which is what makes
``--study NAME`` resume an interrupted search: finished trials are in the file.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable

from slimforge.core.errors import MissingDependencyError
from slimforge.search.budgets import Budgets
from slimforge.search.records import COMPLETE, REJECTED, TrialRecord
from slimforge.search.space import OptunaSuggester, Suggester

try:
    import optuna
except ImportError as exc:  # pragma: no cover - optuna is a core dependency, but say so clearly
    raise MissingDependencyError("optuna", "the Optuna search backend") from exc

DIRECTIONS = ("maximize", "minimize", "minimize")  # accuracy, size_bytes, latency_ms
RECORD_ATTR = "slimforge_record"


class OptunaBackend:
    def __init__(self, *, storage: str, study_name: str, seed: int, budgets: Budgets, n_startup_trials: int = 8):
        optuna.logging.set_verbosity(logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.budgets = budgets

        def sampler(seed):
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True)

        self.study = optuna.create_study(storage=storage, study_name=study_name, directions=list(DIRECTIONS),
                                         sampler=sampler(seed), load_if_exists=True)
        recorded = len(self.study.get_trials(deepcopy=False))
        if recorded:
            # A seeded sampler restarts its random stream in every process, so a resumed study
            # would re-draw the plans of its first (random start-up) trials.  Offsetting the seed
            # by the trials already recorded continues the search and stays reproducible.
            self.study.sampler = sampler(seed + recorded)
        self._close_interrupted_trials()

    def _close_interrupted_trials(self) -> None:
        """A trial left RUNNING by a killed search never finishes: mark it failed on resume."""
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", "interrupted (search was stopped)")
            self.study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)

    def finished_count(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def records(self) -> list[dict]:
        """Every recorded trial of the study (including earlier runs of a resumed study)."""
        return [json.loads(t.user_attrs[RECORD_ATTR]) for t in self.study.get_trials(deepcopy=False)
                if RECORD_ATTR in t.user_attrs]

    def run_one(self, evaluate: Callable[[Suggester, int], TrialRecord]) -> TrialRecord:
        trial = self.study.ask()
        record = evaluate(OptunaSuggester(trial), trial.number)
        trial.set_user_attr(RECORD_ATTR, json.dumps(record.to_dict()))
        if record.state == COMPLETE:
            for key, value in self.budgets.normalized(record.violations).items():
                trial.set_constraint(key, value)
            m = record.measurements
            self.study.tell(trial, [m.accuracy, m.size_bytes, m.latency_ms])
        elif record.state == REJECTED:
            for key, value in self.budgets.normalized(record.violations).items():
                trial.set_constraint(key, value)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.set_user_attr("failure_reason", record.failure_reason or "unknown")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return record
