"""torchvision presets: models adapted to small images, datasets from a data dir, FakeData runs."""

import pytest
import torch

from slimforge.core.compressed import load_model
from slimforge.core.errors import TaskError, UnknownNameError
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.presets import preset_model
from slimforge.core.task import load_task, task_from_source
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("dataset,channels,size", [("mnist", 1, 28), ("cifar10", 3, 32)])
def test_models_accept_the_datasets_images(model, dataset, channels, size):
    net = preset_model(model, dataset).eval()
    with torch.inference_mode():
        assert net(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownNameError, match="valid choices: mobilenet_v3_small, resnet18"):
        preset_model("vgg11", "cifar10")
    with pytest.raises(TaskError, match="expected torchvision:MODEL:DATASET"):
        load_task("torchvision:resnet18")


def test_missing_dataset_is_a_clear_error_not_a_download(tmp_path):
    with pytest.raises(TaskError, match=r"dataset 'cifar10': not found under .*--download"):
        load_task("torchvision:resnet18:cifar10", data_dir=str(tmp_path))


@pytest.mark.slow
def test_fakedata_preset_runs_a_trial_and_its_artifact_reloads(tmp_path):
    task = load_task("torchvision:mobilenet_v3_small:fakedata", teacher_epochs=1)
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [116, 12, 32]
    runner = TrialRunner(task=task, plugins=Plugins(load_entry_points=False), budgets=Budgets(), artifact_dir=tmp_path,
                         latency=LatencySettings(warmup=1, repeats=3))
    record = runner.run(Plan(steps=(PlanStep("structured_pruning", {"channel_sparsity": 0.5}),)), 0)
    assert record.state == "complete", record.failure_reason
    assert record.measurements.size_bytes < 0.6 * runner.measure(_baseline(task, tmp_path), "val").size_bytes
    rebuilt = task_from_source(task.source)  # what worker processes and artifacts do
    assert rebuilt.name == task.name and len(rebuilt.split("test")) == 32
    loaded = load_model(record.artifact_path, runner.plugins.registry).model
    assert loaded(task.example_inputs(2)[0]).shape == (2, 10)


def _baseline(task, tmp_path):
    from slimforge.core.compressed import save_model

    path = tmp_path / "baseline.slim"
    save_model(task.teacher, path, task=task, plan=Plan())
    return path
