"""What a user of MLflow expects of slimforge's runs: params named by technique and knob (one
column per knob, whatever the plan), the tracking URI taken from --tracking-uri, then
$MLFLOW_TRACKING_URI, then the default; an experiment marked for classic model development with
its artifacts beside a sqlite store (no stray ./mlruns); source, git and version tags; the
hypervolume on the parent; Pareto members tagged on their trial runs, with test metrics even when
below the registration floor; pinned pyfunc requirements; and MLflow's own chatter in
OUT/mlflow.log, not on the terminal."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

import sf_testing_models
from slimforge.core.compressed import save_model
from slimforge.core.plan import Plan

from slimforge.core.measure import LatencySettings, Measurements
from slimforge.search.budgets import Budgets
from slimforge.search.records import COMPLETE, SearchResult, TrialRecord
from slimforge.search.settings import SearchSettings, resolve_tracking_uri
from slimforge.tracking.mlflow import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, LOG_FILE, PARETO_TAG, MlflowTracker,
                                       pip_requirements, plan_params)


def _plan(*steps) -> dict:
    return {"steps": [{"technique": t, "config": c} for t, c in steps], "recovery": {"epochs": 3, "lr": 0.001},
            "seed": 7}


def test_params_are_named_by_technique_and_knob_not_by_plan_position():
    pruning = ("magnitude_pruning", {"sparsity": {"fc1": 0.9, "fc2": 0.5}, "default_sparsity": 0})
    quant = ("int8_ptq", {"observer": "minmax"})
    first, second = plan_params(_plan(pruning, quant)), plan_params(_plan(("low_rank", {"energy": 0.9}), pruning))
    assert first["magnitude_pruning.sparsity.fc1"] == second["magnitude_pruning.sparsity.fc1"] == "0.9"
    assert first["int8_ptq.observer"] == "minmax" and first["recovery.epochs"] == "3" and first["seed"] == "7"
    assert first["plan.techniques"] == "magnitude_pruning,int8_ptq"
    assert second["plan.techniques"] == "low_rank,magnitude_pruning"
    assert not any(key.startswith("step") for key in {**first, **second})


def test_tracking_uri_precedence_flag_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None) == "http://tracking.example:5000"
    assert SearchSettings().resolved("tiny").tracking_uri == "http://tracking.example:5000"
    # The flag (or [search] tracking_uri) wins over the environment.
    assert SearchSettings(tracking_uri="sqlite:///given.db").resolved("tiny").tracking_uri == "sqlite:///given.db"


def test_pyfunc_requirements_are_pinned_to_what_measured_the_model():
    pins = dict(line.split("==") for line in pip_requirements())
    assert pins["slimforge"] == metadata.version("slimforge")
    assert pins["torch"] == metadata.version("torch")
    assert set(pins) == {"slimforge", "torch", "numpy", "mlflow"}


def _record(number: int, accuracy: float, size: int) -> TrialRecord:
    return TrialRecord(number=number, state=COMPLETE, plan=_plan(("int8_ptq", {"observer": "minmax"})),
                       plan_text="int8_ptq", feasible=True,
                       measurements=Measurements(accuracy=accuracy, size_bytes=size, latency_ms=0.1))


@pytest.mark.slow  # MLflow writes, a pyfunc model logged and registered
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_runs_follow_mlflow_conventions(tiny_task, tmp_path, monkeypatch, capsys):
    """A tracker driven through a search's hooks with synthetic trials (no training): two searches
    of one study, the second moving the front."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    settings = SearchSettings(study="conv", out_dir=tmp_path / "out", tracking_uri=uri, progress=False,
                              latency=LatencySettings(warmup=1, repeats=3)).resolved("tiny")
    baseline = Measurements(accuracy=0.9, size_bytes=10_000, latency_ms=0.1)
    floor = "accuracy is below the registration floor"

    def search(records, pareto, registered=()):
        tracker = MlflowTracker(tracking_uri=uri, experiment="slimforge", registered_model="tiny-compressed")
        tracker.slimforge_search_start(settings=settings.to_dict() | {"budgets": Budgets().to_dict()}, task=tiny_task,
                                       baseline=baseline)
        for record in records:
            record.links.update(tracker.slimforge_trial_end(record))
        members = [r for r in records if r.number in pareto]
        for member in members:
            member.test_measurements = Measurements(accuracy=0.5, size_bytes=900, latency_ms=0.2)
            if member.number in registered:  # a real artifact file: registration logs it as a pyfunc model
                member.artifact_path = str(tmp_path / f"trial-{member.number}.slim")
                save_model(sf_testing_models.trained_tiny_cnn(), member.artifact_path, task=tiny_task, plan=Plan())
            else:
                member.not_registered = floor
        tracker.slimforge_search_end(result=SearchResult(
            study_name="conv", task="tiny", budgets={}, baseline=baseline, baseline_test=baseline, trials=records,
            pareto=members, settings=settings.to_dict()))
        return tracker

    first = search([_record(0, 0.5, 900), _record(1, 0.4, 2_000)], pareto={0})
    second = search([_record(2, 0.6, 800)], pareto={2}, registered={2})

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("slimforge")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    assert not (tmp_path / "mlruns").exists()

    runs = {r.data.tags.get("trial", "parent"): r for r in client.search_runs(
        [experiment.experiment_id], f"tags.`slimforge.search_id` = '{first.search_id}'")}
    parent, trial0, trial1 = runs["parent"], runs["0"], runs["1"]
    for run in (parent, trial0):
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["slimforge.version"] == metadata.version("slimforge")
        assert run.data.tags["torch.version"] == metadata.version("torch")
    assert parent.data.metrics["hypervolume"] >= 0.0
    assert trial0.data.params["int8_ptq.observer"] == "minmax" and trial0.data.params["plan.techniques"] == "int8_ptq"
    assert trial0.data.metrics["accuracy_test"] == 0.5  # logged though the member is below the floor
    assert trial0.data.tags["registration"] == f"not registered: {floor}"
    assert "accuracy_test" not in trial1.data.metrics and PARETO_TAG not in trial1.data.tags
    # The second search's front replaced trial 0: its run no longer says it is a member.
    assert client.get_run(trial0.info.run_id).data.tags[PARETO_TAG] == "false"
    tagged = client.search_runs([experiment.experiment_id], f"tags.`{PARETO_TAG}` = 'true'")
    assert [r.data.tags["trial"] for r in tagged] == ["2"]

    # The registered member's model pins what built and measured it.
    import mlflow

    (version,) = client.search_model_versions("name='tiny-compressed'")
    assert version.run_id == second._trial_runs[2]
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/tiny-compressed/{version.version}"))
    assert set(pip_requirements()) <= set(requirements.read_text().split())

    # MLflow's own lines (creating the store's tables, "Created version ...") are in the log, not on stderr.
    err = capsys.readouterr().err
    assert "Created version" not in err and "database tables" not in err
    log = (tmp_path / "out" / LOG_FILE).read_text()
    assert "Creating initial MLflow database tables" in log and "Created version '1' of model 'tiny-compressed'" in log


@pytest.mark.slow  # MLflow creates its store
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_tasks_metric_name_reaches_mlflow(tiny_task, tmp_path, monkeypatch):
    """A task whose metric is next-token accuracy: the parent and trial runs carry it under that
    name (and the generic ``accuracy`` key promotion reads), and the parent says which metric it is."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    task = dataclasses.replace(tiny_task, metric_name="next_token_accuracy")
    settings = SearchSettings(study="named", out_dir=tmp_path / "out", tracking_uri=uri, progress=False).resolved("tiny")
    baseline = Measurements(accuracy=0.25, size_bytes=10_000, latency_ms=0.1)
    tracker = MlflowTracker(tracking_uri=uri, experiment="slimforge", registered_model="tiny-compressed")
    tracker.slimforge_search_start(settings=settings.to_dict() | {"budgets": Budgets().to_dict()}, task=task,
                                   baseline=baseline)
    tracker.slimforge_trial_end(_record(0, 0.125, 900))
    tracker.slimforge_search_end(result=SearchResult(
        study_name="named", task="tiny", budgets={}, baseline=baseline, baseline_test=baseline,
        trials=[_record(0, 0.125, 900)], pareto=[], settings=settings.to_dict()))

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("slimforge")
    runs = {r.data.tags.get("trial", "parent"): r for r in client.search_runs(
        [experiment.experiment_id], f"tags.`slimforge.search_id` = '{tracker.search_id}'")}
    parent, trial = runs["parent"].data, runs["0"].data
    assert parent.tags["metric_name"] == "next_token_accuracy"
    assert parent.metrics["next_token_accuracy_baseline"] == parent.metrics["accuracy_baseline"] == 0.25
    assert trial.metrics["next_token_accuracy"] == trial.metrics["accuracy"] == 0.125
