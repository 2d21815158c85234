"""Shared by the search benchmarks: the length of a search's trial phase."""

from __future__ import annotations


def trial_phase_seconds(result) -> float:
    """Seconds from the first trial's start to the last trial's end, by the study's own (Optuna)
    timestamps: the search's steady phase, without the baseline, worker start-up and the final
    test measurement of the Pareto members.  ``result`` is what ``run_search`` returned."""
    import optuna

    trials = optuna.load_study(study_name=result.study_name, storage=result.settings["storage"]).get_trials(deepcopy=False)
    return (max(t.datetime_complete for t in trials if t.datetime_complete)
            - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds()
