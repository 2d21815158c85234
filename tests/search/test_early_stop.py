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


def test_rule_stops_a_trial_that_can_only_end_up_dominated(tmp_path):
    r = runner(tmp_path, Budgets())
    better = TrialRecord(number=3, state=COMPLETE, plan={}, plan_text="", feasible=True,
                         measurements=Measurements(accuracy=0.95, size_bytes=1000, latency_ms=1.0))
    r.history.append(better)
    log = RecoveryLog(score_before=0.60, scores=[0.62])
    reason = r.early_stop(log, epochs_left=2, size_estimate=1500)
    assert reason is not None and "dominated by trial 3" in reason
    assert r.early_stop(log, epochs_left=2, size_estimate=900) is None  # smaller than trial 3: may still win


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
