"""The MLflow parent run of every search ends: FINISHED when the search does, KILLED on Ctrl-C,
FAILED on an error, and a parent run that a SIGKILLed search left RUNNING is ended KILLED by the
search that resumes its study, tagged with the run that resumed it.  (The kill itself, in a real
subprocess, is exercised by test_kill_resume.py and test_faults.py.)

The tiny task with int8-only plans (no fine-tuning): what is exercised here is the tracking.
"""

from __future__ import annotations

import pytest

from slimforge.core.hookspecs import hookimpl
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, Measurements
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search
from slimforge.tracking.mlflow import RESUMED_BY_TAG, STOPPED_BY_TAG, MlflowTracker

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # whole searches, tracked


def _settings(tmp_path, **overrides) -> SearchSettings:
    return SearchSettings(**{"trials": 2, "seed": 11, "techniques": ("int8_ptq",), "study": "runs",
                             "out_dir": tmp_path / "out", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "progress": False, "latency": LatencySettings(warmup=1, repeats=3)} | overrides)


def _parent_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("slimforge")
    return client.search_runs([experiment.experiment_id], "tags.`slimforge.kind` = 'search'",
                              order_by=["attributes.start_time ASC"])


def _started_tracker(settings: SearchSettings, task) -> MlflowTracker:
    """A tracker that has opened its parent run, as a search does right after the baseline."""
    tracker = MlflowTracker(tracking_uri=settings.tracking_uri, experiment="slimforge", registered_model="tiny-compressed")
    tracker.slimforge_search_start(settings=settings.to_dict() | {"budgets": Budgets().to_dict()}, task=task,
                                   baseline=Measurements(accuracy=0.9, size_bytes=1000, latency_ms=0.1))
    return tracker


def test_a_parent_run_left_running_is_ended_killed_by_the_search_that_resumes_the_study(tiny_task, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = _settings(tmp_path).resolved(tiny_task)
    killed = _started_tracker(settings, tiny_task)  # then "SIGKILLed": it never ends its run
    other_folder = _started_tracker(_settings(tmp_path / "elsewhere", tracking_uri=settings.tracking_uri)
                                    .resolved(tiny_task), tiny_task)  # same study name, other storage: running
    resumed = _started_tracker(settings, tiny_task)
    runs = {run.info.run_id: run for run in _parent_runs(settings.tracking_uri)}
    stale = runs[killed.parent_run_id]
    assert stale.info.status == "KILLED"
    assert stale.data.tags[RESUMED_BY_TAG] == resumed.parent_run_id
    assert runs[resumed.parent_run_id].info.status == "RUNNING"
    assert runs[other_folder.parent_run_id].info.status == "RUNNING", "a study is matched by storage, not name alone"

    # Resumed once more: only the run still RUNNING is ended; the first keeps who resumed it.
    resumed_again = _started_tracker(settings, tiny_task)
    runs = {run.info.run_id: run for run in _parent_runs(settings.tracking_uri)}
    assert runs[resumed.parent_run_id].data.tags[RESUMED_BY_TAG] == resumed_again.parent_run_id
    assert runs[killed.parent_run_id].data.tags[RESUMED_BY_TAG] == resumed.parent_run_id


class InterruptAt:
    """Ctrl-C (or another error) as trial ``number`` starts."""

    def __init__(self, number: int, error: BaseException):
        self.number, self.error = number, error

    @hookimpl
    def slimforge_trial_start(self, number, plan):
        if number == self.number:
            raise self.error


@pytest.mark.parametrize("error, status, reason", [
    (KeyboardInterrupt(), "KILLED", "KeyboardInterrupt (Ctrl-C)"),
    (RuntimeError("disk full"), "FAILED", "RuntimeError: disk full"),
])
def test_a_search_stopped_by_ctrl_c_or_an_error_ends_its_parent_run(tiny_task, tmp_path, monkeypatch, error, status,
                                                                    reason):
    monkeypatch.chdir(tmp_path)
    plugins = Plugins(load_entry_points=False)
    plugins.register(InterruptAt(1, error), name="interrupt")
    settings = _settings(tmp_path)
    with pytest.raises(type(error)):
        run_search(tiny_task, Budgets(), settings, plugins=plugins)
    (parent,) = _parent_runs(settings.tracking_uri)
    assert parent.info.status == status
    assert parent.data.tags[STOPPED_BY_TAG] == reason

    # The study resumes under a new parent run that finishes; the stopped one is left as it ended.
    result = run_search(tiny_task, Budgets(), settings, plugins=Plugins(load_entry_points=False))
    stopped, resumed = _parent_runs(settings.tracking_uri)
    assert (stopped.info.run_id, stopped.info.status) == (parent.info.run_id, status)
    assert RESUMED_BY_TAG not in stopped.data.tags
    assert resumed.info.status == "FINISHED" and resumed.info.run_id == result.links["mlflow_parent_run_id"]
