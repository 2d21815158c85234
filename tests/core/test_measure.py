"""Latency settings and CPU timing, and the output check that keeps a broken model from counting
as a result.  The CUDA paths (events, graph replay) need a GPU and are exercised by
benchmarks/gpu_search.py, whose results are recorded in benchmarks/README.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import sf_testing_models
from slimforge.core.compressed import save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import (BrokenOutputsError, LatencySettings, check_outputs, evaluate, measure_artifact,
                                    time_forward)
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.technique import Stage, Technique
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.pareto import pareto_front


@pytest.mark.parametrize("field, value, message", [
    ("repeats", 0, "latency repeats: must be >= 1"),
    ("warmup", -1, "latency warmup: must be >= 0"),
    ("cuda_graph", "yes", "latency cuda_graph: must be true or false"),
])
def test_bad_latency_settings_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LatencySettings(**{field: value})


def test_cpu_timing_reports_its_method_and_restores_threads():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    threads = torch.get_num_threads()
    stats = time_forward(model, (torch.zeros(1, 8),), "cpu", LatencySettings(warmup=2, repeats=5))
    assert stats.repeats == 5 and stats.device == "cpu"
    assert stats.method == "perf_counter, 1 thread(s)"
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == threads


def test_cpu_timing_ignores_the_cuda_graph_setting():
    # The search refuses --latency-cuda-graph without --device cuda (tests/test_bad_input.py); the
    # timing function itself times eagerly on the CPU, since there is no graph to capture there.
    stats = time_forward(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), "cpu",
                         LatencySettings(warmup=0, repeats=3, cuda_graph=True))
    assert stats.method.startswith("perf_counter")


# --- a broken model is never a result: non-finite or misshapen outputs fail the measurement -------



@dataclass(frozen=True, kw_only=True)
class _NoConfig:
    pass


def _poisoning(stage: int, value: float = math.nan) -> type[Technique]:
    """A technique at ``stage`` that makes the model's last layer output ``value`` everywhere."""

    class Poison(Technique):
        name = f"poison_{int(stage)}"
        family = "poison"
        Config = _NoConfig
        description = "Sets the last bias to NaN (a broken technique)."

        def suggest(self, space, task):
            return _NoConfig()

        def apply(self, model, config, ctx):
            last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                last.bias.fill_(value)
            return model

    Poison.stage = stage
    return Poison


STAGES = (Stage.PRUNING, Stage.SHARING, Stage.TRAINING, Stage.QUANTIZATION, Stage.QUANTIZATION + 5)


@pytest.mark.parametrize("stage", STAGES, ids=[str(int(s)) for s in STAGES])
def test_a_nan_output_technique_at_any_stage_fails_its_trial_naming_it(stage, tiny_task, tmp_path):
    poison = _poisoning(stage)
    plugins = Plugins(load_entry_points=False, extra_plugins=(sf_testing_models.Registers(poison),))
    runner = TrialRunner(task=tiny_task, plugins=plugins, budgets=Budgets(), artifact_dir=tmp_path,
                         latency=LatencySettings(warmup=0, repeats=2))
    record = runner.run(Plan(steps=(PlanStep(poison.name),)), number=0)
    assert record.state == "failed" and record.measurements is None and not record.feasible
    examples = len(tiny_task.split("val"))
    assert record.failure_reason == (
        f"BrokenOutputsError: the loaded artifact's outputs are not finite (NaN) for {examples} of {examples} "
        f"examples on the 'val' split, after technique {poison.name!r}; not counted as a result")
    good = runner.run(Plan(), number=1)  # the same runner still measures a sound model
    assert good.state == "complete"
    assert pareto_front([record, good]) == [good]


def test_a_nan_technique_before_recovery_fails_before_training(tiny_task, tmp_path):
    # Recovery scores the model before its first epoch (early stopping needs that score): the
    # same check fails the trial there, before an epoch is paid for.
    poison = _poisoning(Stage.PRUNING)
    poison.needs_recovery = True
    plugins = Plugins(load_entry_points=False, extra_plugins=(sf_testing_models.Registers(poison),))
    runner = TrialRunner(task=tiny_task, plugins=plugins, budgets=Budgets(), artifact_dir=tmp_path,
                         latency=LatencySettings(warmup=0, repeats=2))
    record = runner.run(Plan(steps=(PlanStep(poison.name),), recovery=Recovery(epochs=1, lr=1e-3)), number=0)
    assert record.state == "failed"
    examples = len(tiny_task.split("val"))
    assert record.failure_reason == f"BrokenOutputsError: outputs are not finite (NaN) for {examples} of {examples} examples"
    assert record.epoch_losses == []


def test_the_baseline_and_evaluate_get_the_same_check(tiny_task, tmp_path):
    teacher = tiny_task.teacher
    with torch.no_grad():
        [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1].bias[0] = math.inf
    path = tmp_path / "baseline.slim"
    save_model(teacher, path, task=tiny_task, plan=Plan())
    with pytest.raises(BrokenOutputsError) as info:
        measure_artifact(path, task=tiny_task, plugins=Plugins(load_entry_points=False), split="val",
                         latency=LatencySettings(warmup=0, repeats=1))
    examples = len(tiny_task.split("val"))
    assert str(info.value) == (f"the loaded artifact's outputs are not finite (inf) for {examples} of {examples} "
                               "examples on the 'val' split, of the uncompressed model; not counted as a result")


def test_outputs_must_be_one_finite_row_per_example():
    check_outputs(torch.zeros(4, 3), 4)
    check_outputs(torch.zeros(4, 16, 8), 4)  # a language model's per-token logits
    with pytest.raises(BrokenOutputsError, match=r"outputs have shape \[3, 3\] for 4 examples"):
        check_outputs(torch.zeros(3, 3), 4)
    outputs = torch.zeros(4, 3)
    outputs[1, 2], outputs[3, 0] = math.nan, -math.inf
    with pytest.raises(BrokenOutputsError, match=r"not finite \(NaN/inf\) for 2 of 4 examples"):
        check_outputs(outputs, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    assert 0 <= evaluate(model, data, lambda o, t: float((o.argmax(1) == t).float().mean())) <= 1
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    with pytest.raises(BrokenOutputsError):
        evaluate(model, data, lambda o, t: 0.5)
