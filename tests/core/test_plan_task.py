"""Plans (JSON round trip, validation) and tasks (factories, splits, config tables)."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import sf_testing_models
from slimforge.core.errors import ConfigError, TaskError, UnknownNameError
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.task import (FactoryRef, Task, accuracy, builtin_tasks, load_task, read_toml, task_from_config,
                                 task_from_source, task_from_table)
from slimforge.search.budgets import Budgets

# --- plans ----------------------------------------------------------------------------------------

PLAN = Plan(
    steps=(
        PlanStep("magnitude_pruning", {"sparsity": {"conv": 0.1 + 0.2, "fc1": 0.973, "fc2": 0.0},
                                       "default_sparsity": 0.0}),
        PlanStep("int8_ptq", {"observer": "minmax", "calibration_batches": 4, "calibration_batch_size": 64}),
    ),
    recovery=Recovery(epochs=2, lr=3.3e-4),
    seed=7,
)


def test_plan_round_trips_through_json_exactly():
    text = PLAN.to_json()
    again = Plan.from_json(text)
    assert again == PLAN
    assert again.to_json() == text
    # floats survive bit for bit (0.1 + 0.2 is not 0.3)
    assert again.steps[0].config["sparsity"]["conv"] == 0.1 + 0.2 != 0.3
    assert json.loads(text) == {
        "steps": [{"technique": "magnitude_pruning",
                   "config": {"sparsity": {"conv": 0.1 + 0.2, "fc1": 0.973, "fc2": 0.0}, "default_sparsity": 0.0}},
                  {"technique": "int8_ptq",
                   "config": {"observer": "minmax", "calibration_batches": 4, "calibration_batch_size": 64}}],
        "recovery": {"epochs": 2, "lr": 3.3e-4},
        "seed": 7,
    }


def test_plan_json_is_canonical():
    reordered = Plan(steps=(PlanStep("magnitude_pruning", {"default_sparsity": 0.0,
                                                            "sparsity": {"fc2": 0.0, "fc1": 0.973, "conv": 0.1 + 0.2}}),
                            PLAN.steps[1]), recovery=PLAN.recovery, seed=7)
    assert reordered.to_json() == PLAN.to_json()


def test_empty_plan_round_trips_and_describes_itself():
    assert Plan.from_json(Plan().to_json()) == Plan()
    assert Plan().describe() == "baseline (no compression)"
    assert Plan().technique_names == []


def test_plan_describe_and_names():
    assert PLAN.technique_names == ["magnitude_pruning", "int8_ptq"]
    assert PLAN.describe() == ("magnitude_pruning(sparsity=conv:0.3/fc1:0.973/fc2:0,default_sparsity=0) > "
                               "int8_ptq(observer=minmax,calibration_batches=4,calibration_batch_size=64) + finetune 2ep")


@pytest.mark.parametrize("data, fragment", [
    ({"steps": [{"config": {}}]}, "plan: malformed"),
    ({"recovery": {"epochs": 1, "learning_rate": 0.1}}, "plan: malformed"),
    ({"recovery": {"epochs": -1}}, "recovery.epochs: must be >= 0, got -1"),
    ({"recovery": {"epochs": 1, "lr": 0}}, "recovery.lr: must be > 0, got 0"),
])
def test_malformed_plans_raise_config_errors(data, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Plan.from_dict(data)


# --- factories ------------------------------------------------------------------------------------

def test_factory_ref_resolves_calls_and_round_trips():
    ref = FactoryRef("sf_testing_models:tiny_cnn")
    assert ref.resolve() is sf_testing_models.tiny_cnn
    assert isinstance(ref.call(), sf_testing_models.TinyCNN)
    assert FactoryRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


@pytest.mark.parametrize("target, error, fragment", [
    ("sf_testing_models.tiny_cnn", ConfigError, "[task] model: expected 'module:function', got 'sf_testing_models.tiny_cnn'"),
    ("no_such_module_xyz:build", TaskError, "[task] model: cannot import module 'no_such_module_xyz'"),
    ("sf_testing_models:no_such_fn", TaskError, "[task] model: module 'sf_testing_models' has no attribute 'no_such_fn'"),
])
def test_factory_ref_lookup_errors_name_the_field(target, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        FactoryRef(target).call("[task] model")


def test_factory_that_raises_is_reported_on_one_line_with_its_type():
    with pytest.raises(TaskError) as info:
        FactoryRef("sf_testing_models:broken_model").call("[task] model")
    assert str(info.value) == ("[task] model: sf_testing_models:broken_model raised RuntimeError: "
                               "checkpoint weights.pt not found")
    assert isinstance(info.value.__cause__, RuntimeError)


# --- tasks ----------------------------------------------------------------------------------------

def _dataset(n=4):
    return TensorDataset(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.int64))


def _task(splits, teacher=sf_testing_models.trained_tiny_cnn):
    return Task("t", FactoryRef("sf_testing_models:tiny_cnn"), teacher, splits)


def test_task_requires_train_val_and_test_splits():
    with pytest.raises(TaskError, match=re.escape("task 't': data is missing split(s) ['test']; need ['train', 'val', 'test']")):
        _task({"train": _dataset(), "val": _dataset()})


def test_task_rejects_empty_splits_and_datasets_without_len():
    with pytest.raises(TaskError, match=re.escape("task 't': split 'val' is empty")):
        _task({"train": _dataset(), "val": _dataset(0), "test": _dataset()})
    with pytest.raises(TaskError, match=re.escape("task 't': split 'test' has no len()")):
        _task({"train": _dataset(), "val": _dataset(), "test": iter([])})


def test_task_teacher_must_be_a_module_and_is_built_once():
    calls = []

    def factory():
        calls.append(1)
        return sf_testing_models.trained_tiny_cnn()

    task = _task({"train": _dataset(), "val": _dataset(), "test": _dataset()}, teacher=factory)
    assert task.teacher is task.teacher
    assert len(calls) == 1
    assert not task.teacher.training
    bad = _task({"train": _dataset(), "val": _dataset(), "test": _dataset()}, teacher=lambda: "weights.pt")
    with pytest.raises(TaskError, match="model factory returned str, not a torch.nn.Module"):
        _ = bad.teacher


def test_task_splits_calibration_and_example_inputs(tiny_task):
    assert tiny_task.calibration is tiny_task.split("train")
    (batch,) = tiny_task.example_inputs(3)
    assert torch.equal(batch, tiny_task.split("val").tensors[0][:3])
    with pytest.raises(UnknownNameError, match=re.escape("split: unknown 'dev'; valid choices: test, train, val")):
        tiny_task.split("dev")


def test_accuracy_metric():
    outputs = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(outputs, torch.tensor([1, 0, 0, 0])) == 0.75


def test_accuracy_is_an_exact_ratio_so_a_drop_of_exactly_the_budget_is_feasible():
    # 974 of 1000 right against a baseline of 984: exactly 1 pt down.  A float32 mean gives
    # 0.97399997..., under the 0.974 floor; the count ratio gives 0.974 and the trial is feasible.
    targets = torch.zeros(1000, dtype=torch.long)
    outputs = torch.zeros(1000, 2)
    outputs[974:, 1] = 1.0
    assert accuracy(outputs, targets) == 0.974
    budgets = Budgets(max_accuracy_drop=0.01).resolve(baseline_accuracy=0.984)
    assert Budgets.feasible(budgets.violations(accuracy=accuracy(outputs, targets)))


# --- loading tasks from names and config tables ---------------------------------------------------

def test_unknown_task_name_lists_the_builtins():
    with pytest.raises(UnknownNameError) as info:
        load_task("mnist")
    assert str(info.value).startswith("task: unknown 'mnist'; valid choices: ")
    assert {"mnist-lenet5", "<path to a task .toml>", *builtin_tasks()} <= set(info.value.choices)


def test_task_from_config_file(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text(sf_testing_models.task_toml())
    task = task_from_config(path)
    assert task.name == "tiny"
    assert task.architecture == FactoryRef("sf_testing_models:trained_tiny_cnn")
    assert {name: len(ds) for name, ds in task.splits.items()} == sf_testing_models.SPLIT_SIZES
    reference = sf_testing_models.trained_tiny_cnn().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in task.teacher.state_dict().items())
    # an artifact's header records the source; it rebuilds the same task
    again = task_from_source(task.source)
    assert torch.equal(again.split("test").tensors[0], task.split("test").tensors[0])


def test_task_table_unknown_key_lists_the_valid_keys(tmp_path):
    table = sf_testing_models.task_table() | {"modle": "x:y"}
    with pytest.raises(UnknownNameError) as info:
        task_from_table(table, base_dir=tmp_path, origin="t.toml")
    assert str(info.value).startswith("[task] key: unknown 'modle'; valid choices: ")
    assert {"data", "data_kwargs", "metric", "metric_name", "model", "model_kwargs", "name",
            "python_path"} <= set(info.value.choices)
    assert info.value.choices == sorted(info.value.choices)


def test_task_table_requires_model_and_data(tmp_path):
    table = sf_testing_models.task_table()
    del table["data"]
    with pytest.raises(ConfigError, match=re.escape("[task] data: required, a 'module:function' string")):
        task_from_table(table, base_dir=tmp_path, origin="t.toml")


def test_task_table_data_factory_must_return_a_dict(tmp_path):
    table = sf_testing_models.task_table() | {"data": "sf_testing_models:tiny_cnn"}
    with pytest.raises(TaskError, match=re.escape(
            "[task] data: sf_testing_models:tiny_cnn returned TinyCNN, expected a dict of splits")):
        task_from_table(table, base_dir=tmp_path, origin="t.toml")


def test_custom_metric_must_return_a_finite_number(tmp_path, monkeypatch):
    def nan_metric(outputs, targets):
        return math.nan

    module = type(sys)("sf_metric_for_test")
    module.nan_metric = nan_metric
    monkeypatch.setitem(sys.modules, "sf_metric_for_test", module)
    task = task_from_table(sf_testing_models.task_table() | {"metric": "sf_metric_for_test:nan_metric"},
                           base_dir=tmp_path, origin="t.toml")
    assert task.metric_name == "nan_metric"
    with pytest.raises(TaskError, match="metric 'nan_metric' returned nan; it must be a finite number"):
        task.metric(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))


def test_read_toml_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {missing}")):
        read_toml(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[task\nmodel = 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{broken}: invalid TOML")):
        read_toml(broken)
