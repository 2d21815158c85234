"""One trial: pre-training rejection, failures recorded (not raised), artifacts that load back exactly."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass

import pytest
import torch

import sf_testing_models

from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ArtifactError, ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, evaluate
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.search import objective
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search
from slimforge.search.objective import SIZE_ESTIMATE_SLACK, TrialRunner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao deprecation chatter

QUICK_LATENCY = LatencySettings(warmup=1, repeats=3)
PRUNE_THEN_INT8 = Plan(
    steps=(PlanStep("magnitude_pruning", {"sparsity": {}, "default_sparsity": 0.6}),
           PlanStep("int8_ptq", {"observer": "minmax", "calibration_batches": 2, "calibration_batch_size": 64})),
    recovery=Recovery(epochs=1, lr=1e-3),
    seed=0,
)


@pytest.fixture
def recover_calls(monkeypatch):
    """Spy on recovery training: the list of plans' recovery settings it was called with."""
    calls = []
    real_recover = objective.recover

    def spy(model, applied, train_set, recovery, **kwargs):
        calls.append(recovery)
        return real_recover(model, applied, train_set, recovery, **kwargs)

    monkeypatch.setattr(objective, "recover", spy)
    return calls


def _runner(task, tmp_path, budgets=Budgets(), plugins=None):
    return TrialRunner(task=task, plugins=plugins or Plugins(load_entry_points=False), budgets=budgets,
                       artifact_dir=tmp_path, latency=QUICK_LATENCY)


# --- rejection before training --------------------------------------------------------------------

def test_plan_whose_size_breaks_the_budget_is_rejected_untrained(tiny_task, tmp_path, recover_calls):
    record = _runner(tiny_task, tmp_path, Budgets(max_size_bytes=200)).run(PRUNE_THEN_INT8, number=0)
    assert record.state == "rejected"
    assert recover_calls == []  # never trained
    estimate = record.size_estimate_bytes
    assert estimate > 200 * (1 + SIZE_ESTIMATE_SLACK)
    assert record.failure_reason == f"size {estimate} B before fine-tuning exceeds the budget 200 B; rejected untrained"
    assert record.violations == {"size": float(estimate - 200)}
    assert record.measurements is None
    assert record.artifact_path is None
    assert not record.feasible
    assert record.epoch_losses == []


def test_same_plan_under_a_generous_budget_is_trained_and_measured(tiny_task, tmp_path, recover_calls):
    record = _runner(tiny_task, tmp_path, Budgets(max_size_bytes=10_000_000)).run(PRUNE_THEN_INT8, number=4)
    assert record.state == "complete", record.failure_reason
    assert recover_calls == [PRUNE_THEN_INT8.recovery]
    assert len(record.epoch_losses) == 1
    assert record.artifact_path == str(tmp_path / "trial-0004.slim")
    assert record.measurements.size_bytes == os.path.getsize(record.artifact_path)
    assert record.violations == {"size": float(record.measurements.size_bytes - 10_000_000)}
    assert record.feasible
    # the recorded accuracy is that of the artifact loaded back on its own
    loaded = load_model(record.artifact_path, Plugins(load_entry_points=False).registry)
    assert evaluate(loaded.model, tiny_task.split("val"), tiny_task.metric) == record.measurements.accuracy


def test_retraining_before_sharing_trains_the_pruned_model_then_clusters_it(tiny_task, tmp_path, recover_calls):
    """prune -> retrain 2 epochs (masks held) -> k-means -> fine-tune 1 epoch: two recovery calls in
    that order, the pruned zeros survive both phases and clustering, and the artifact loads back
    to the measured accuracy."""
    plan = Plan(steps=(PlanStep("magnitude_pruning", {"sparsity": {}, "default_sparsity": 0.7}),
                       PlanStep("kmeans_clustering", {"conv_bits": 4, "fc_bits": 3})),
                recovery=Recovery(epochs=1, lr=1e-3, before_sharing_epochs=2), seed=0)
    record = _runner(tiny_task, tmp_path).run(plan, number=0)
    assert record.state == "complete", record.failure_reason
    assert recover_calls == [Recovery(epochs=2, lr=1e-3), plan.recovery]
    assert any(note.startswith("retrained 2 epoch(s) before sharing") for note in record.notes)
    assert len(record.epoch_losses) == 1  # the main phase's record; the retrain is in the note
    loaded = load_model(record.artifact_path, Plugins(load_entry_points=False).registry)
    assert evaluate(loaded.model, tiny_task.split("val"), tiny_task.metric) == record.measurements.accuracy
    with torch.no_grad():
        weights = [m.decoded_weight() for m in loaded.model.modules() if hasattr(m, "decoded_weight")]
    assert weights
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.69, zeros  # 70 % pruned before clustering, still zero after it and both trainings


def test_plan_without_training_is_measured_not_rejected(tiny_task, tmp_path, recover_calls):
    plan = Plan(steps=(PRUNE_THEN_INT8.steps[1],))
    record = _runner(tiny_task, tmp_path, Budgets(max_size_bytes=200)).run(plan, number=1)
    # nothing to save by rejecting early: it is measured, and infeasible
    assert record.state == "complete"
    assert all(recovery.epochs == 0 for recovery in recover_calls)
    assert record.violations["size"] == record.measurements.size_bytes - 200 > 0
    assert not record.feasible


# --- a technique that raises ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _NoConfig:
    pass


class Exploding(Technique):
    name = "exploding"
    family = Family.SPARSITY
    stage = Stage.SPARSITY
    Config = _NoConfig

    def suggest(self, space, task):
        return _NoConfig()

    def apply(self, model, config, ctx):
        raise ValueError("boom in layer fc1")


class Refusing(Exploding):
    name = "refusing"

    def apply(self, model, config, ctx):
        raise ConfigError("refusing: cannot handle layer 'fc1'")


@pytest.fixture
def failing_plugins():
    return Plugins(load_entry_points=False, extra_plugins=(sf_testing_models.Registers(Exploding, Refusing),))


def test_technique_that_raises_fails_its_trial_with_the_reason(tiny_task, tmp_path, failing_plugins):
    plan = Plan(steps=(PlanStep("exploding"),))
    record = _runner(tiny_task, tmp_path, plugins=failing_plugins).run(plan, number=2)
    assert record.state == "failed"
    assert record.failure_reason == "RuntimeError: technique 'exploding' (extra) raised ValueError: boom in layer fc1"
    assert any("ValueError: boom in layer fc1" in note for note in record.notes)  # traceback kept for debugging
    assert record.measurements is None and not record.feasible
    json.dumps(record.to_dict())  # still a valid record


def test_slimforge_errors_from_a_technique_keep_their_own_message(tiny_task, tmp_path, failing_plugins):
    record = _runner(tiny_task, tmp_path, plugins=failing_plugins).run(Plan(steps=(PlanStep("refusing"),)), number=0)
    assert record.state == "failed"
    assert record.failure_reason == "ConfigError: refusing: cannot handle layer 'fc1'"
    assert record.notes == []  # a deliberate error needs no traceback


@pytest.mark.slow  # a whole six-trial search
def test_search_goes_on_after_a_failed_trial(tiny_task, tmp_path, failing_plugins):
    settings = SearchSettings(trials=6, seed=0, study="failing", out_dir=tmp_path, techniques=("exploding", "int8_ptq"),
                              tracking=False, progress=False, latency=QUICK_LATENCY)
    result = run_search(tiny_task, Budgets(), settings, plugins=failing_plugins)
    assert [r.number for r in result.trials] == list(range(6))
    for record in result.trials:
        if "exploding" in [step["technique"] for step in record.plan["steps"]]:
            assert record.state == "failed"
            assert record.failure_reason.endswith("raised ValueError: boom in layer fc1")
        else:
            assert record.state == "complete", record.failure_reason
            assert record.measurements.size_bytes == os.path.getsize(record.artifact_path)
    counts = result.counts()
    assert counts["failed"] >= 1 and counts["complete"] >= 1, counts  # this seed exercises both
    assert counts["failed"] + counts["complete"] == 6
    assert [m.number for m in result.pareto] and all(m.state == "complete" for m in result.pareto)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == counts
    assert [t["state"] for t in summary["trials"]] == [r.state for r in result.trials]


# --- artifacts ------------------------------------------------------------------------------------

def _compress(task, plan, registry):
    model, structure = copy.deepcopy(task.teacher), []
    for step in plan.steps:
        technique = registry.get(step.technique)
        ctx = TechniqueContext(task=task, seed=plan.seed)
        model = technique.apply(model, technique.config_from_dict(step.config), ctx)
        structure.append(ctx.structure)
    return model, structure


def test_pruned_int8_model_round_trips_bitwise_through_save_and_load(tiny_task, tmp_path):
    registry = Plugins(load_entry_points=False).registry
    model, structure = _compress(tiny_task, PRUNE_THEN_INT8, registry)
    path = tmp_path / "model.slim"
    size = save_model(model, path, task=tiny_task, plan=PRUNE_THEN_INT8, structure=structure)
    assert size == os.path.getsize(path)

    loaded = load_model(path, registry)
    assert loaded.plan == PRUNE_THEN_INT8
    assert loaded.meta["architecture"] == {"target": "sf_testing_models:tiny_cnn", "kwargs": {}}
    quantized = [name for name, m in loaded.model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert quantized, "int8_ptq must leave real int8 modules"
    inputs = torch.cat([tiny_task.split("val").tensors[0], tiny_task.split("test").tensors[0]])
    with torch.inference_mode():
        expected, actual = model(inputs), loaded.model(inputs)
    assert torch.equal(expected, actual)
    # the pruned zeros survive quantization and the file
    weights = {k: v for k, v in loaded.model.state_dict().items() if k.endswith("weight") and v.is_quantized}
    assert weights
    for name, weight in weights.items():
        assert int((weight.int_repr() == 0).sum()) >= round(0.6 * weight.numel()), name


def test_loading_a_file_that_is_not_a_compressed_model_is_an_artifact_error(tiny_task, tmp_path):
    from slimforge.core.artifact import write_artifact

    path = tmp_path / "teacher.slim"
    write_artifact(path, tiny_task.teacher.state_dict(), {"kind": "teacher"})
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: holds a 'teacher', not a compressed model")):
        load_model(path, Plugins(load_entry_points=False).registry)
