"""Multi-fidelity early stopping in recovery training."""

from pathlib import Path


from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, Measurements
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.recovery import RecoveryLog
from slimforge.core.testing import tiny_task
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.records import COMPLETE, TrialRecord


def runner(tmp_path: Path, budgets: Budgets) -> TrialRunner:
    return TrialRunner(task=tiny_task("slimforge.core.testing:tiny_mlp"), plugins=Plugins(load_entry_points=False),
                       budgets=budgets, artifact_dir=tmp_path, latency=LatencySettings(warmup=1, repeats=3))


def test_rule_stops_when_even_an_optimistic_projection_misses_the_floor(tmp_path):
    r = runner(tmp_path, Budgets(min_accuracy=0.75))
    log = RecoveryLog(score_before=0.40, scores=[0.50])  # gained 0.10 in one epoch
    assert r.early_stop(log, epochs_left=3, size_estimate=None) is None  # 0.5 + 3 * 0.10 = 0.80 >= 0.75
    log = RecoveryLog(score_before=0.45, scores=[0.50])  # gained 0.05: 0.5 + 3 * 0.05 = 0.65 < 0.75
    reason = r.early_stop(log, epochs_left=3, size_estimate=None)
    assert reason is not None and "min accuracy 0.7500" in reason and "optimistic final 0.6500" in reason
    assert r.early_stop(log, epochs_left=0, size_estimate=None) is None  # nothing left to save


def _finished(number: int, size: int, scores: list[float]) -> TrialRecord:
    return TrialRecord(number=number, state=COMPLETE, plan={}, plan_text="", feasible=True, epoch_scores=scores,
                       measurements=Measurements(accuracy=scores[-1], size_bytes=size, latency_ms=1.0))


def test_successive_halving_compares_only_with_trials_at_least_as_small(tmp_path):
    r = runner(tmp_path, Budgets())
    r.history = [_finished(1, 1000, [0.90, 0.93]), _finished(2, 1100, [0.88, 0.92]), _finished(3, 5000, [0.99])]
    log = RecoveryLog(score_before=0.60, scores=[0.80])
    # Rivals no larger than ~1500 B at epoch 1: 0.90 and 0.88; with 0.80 the top 1 of 3 is 0.90.
    reason = r.early_stop(log, epochs_left=2, size_estimate=1500)
    assert reason is not None and "successive halving" in reason and "top 1 of 3" in reason
    # At 900 B no finished trial is as small: nothing to trail, so it goes on.
    assert r.early_stop(log, epochs_left=2, size_estimate=900) is None
    # The best of its size class goes on; the big trial 3 never counts against small ones.
    assert r.early_stop(RecoveryLog(scores=[0.95]), epochs_left=2, size_estimate=1500) is None
    # Epoch 2 is no rung (rungs are 1, 3, 9, ...).
    assert r.early_stop(RecoveryLog(scores=[0.5, 0.5]), epochs_left=2, size_estimate=1500) is None


def test_successive_halving_waits_for_enough_rivals(tmp_path):
    r = runner(tmp_path, Budgets())
    r.history = [_finished(1, 1000, [0.90])]
    assert r.early_stop(RecoveryLog(scores=[0.10]), epochs_left=2, size_estimate=1500) is None


def test_early_stop_is_recorded_and_saves_training_time(tmp_path):
    budgets = Budgets(min_accuracy=0.999)
    r = runner(tmp_path, budgets)
    plan = Plan(steps=(PlanStep("magnitude_pruning", {"sparsity": {"1": 0.97, "3": 0.97, "5": 0.9}}),),
                recovery=Recovery(epochs=6, lr=1e-4), seed=0)
    record = r.run(plan, number=0)
    assert record.state == COMPLETE, record.failure_reason
    assert record.stopped_early and "min accuracy" in record.stopped_early
    assert 1 <= len(record.epoch_scores) < 6  # fewer epochs than planned were paid for
    assert record.measurements is not None and not record.feasible  # still measured and recorded honestly


def test_without_an_accuracy_budget_the_registration_floor_stops_hopeless_trials(tmp_path):
    r = runner(tmp_path, Budgets())
    log = RecoveryLog(score_before=0.09, scores=[0.10])  # a collapsed model gaining nothing
    assert r.early_stop(log, epochs_left=5, size_estimate=None) is None  # no floor known: it goes on
    r.front_floor = 0.88
    reason = r.early_stop(log, epochs_left=5, size_estimate=None)
    assert reason is not None and "the registration floor (never on the front) 0.8800" in reason
