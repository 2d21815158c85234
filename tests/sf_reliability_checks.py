"""Checks shared by the kill/resume tests (test_kill_resume.py, test_faults.py): what a study, its
summary.json, its MLflow runs and its registered models must look like after any number of kills."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import sf_testing_models

STUDY = "kill"


def tiny_config(root: Path) -> Path:
    path = root / "task.toml"
    path.write_text(sf_testing_models.task_toml())
    return path


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fault_env(subprocess_env, **extra) -> dict[str, str]:
    """The subprocess environment with the fault plugin loaded, one thread per process (the cores
    are shared), and only the fault variables given here set."""
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("SF_FAULT")}
    return env | {"OMP_NUM_THREADS": "1", "SLIMFORGE_PLUGINS": "sf_fault_plugins"} | extra


def search_argv(slimforge_cmd, root: Path, task_args: list[str], seed: int, trials: int) -> list[str]:
    # No expert seeds: the kill points are placed in sampled plans that fine-tune (the int8 seed
    # would not train, so "killed while training" would land in a later trial than the test names).
    return [*slimforge_cmd, "search", *task_args, "--trials", str(trials), "--seed", str(seed), "--study", STUDY,
            "--techniques", "int8_ptq,magnitude_pruning", "--no-expert-seeds", "--out", str(root / "out"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--no-progress", "--latency-repeats", "3"]


def study_trials(storage: str, study: str = STUDY) -> dict[int, tuple[str, dict | None]]:
    """number -> (Optuna state name, stored record or None), read straight from the study."""
    import optuna

    from slimforge.search.backends.optuna import RECORD_ATTR, attr_value

    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return {t.number: (t.state.name, attr_value(t.user_attrs[RECORD_ATTR]) if RECORD_ATTR in t.user_attrs else None)
            for t in trials}


def comparable(record: dict) -> dict:
    # Links are added when trackers see a trial, Pareto members' test numbers and registration
    # decisions are made again by every run, and a note marks a recovered trial.  Everything else
    # must never change.
    return {k: v for k, v in record.items() if k not in ("links", "test_measurements", "not_registered", "notes")}


def check_study_and_summary(storage: str, summary: dict, closed_before_a_kill: dict[int, dict], trials: int) -> None:
    recorded = study_trials(storage)
    assert sorted(recorded) == list(range(trials))
    assert all(state != "RUNNING" and record is not None for state, record in recorded.values())
    assert [t["number"] for t in summary["trials"]] == list(range(trials))
    by_number = {t["number"]: t for t in summary["trials"]}
    for number, record in closed_before_a_kill.items():  # nothing recorded is lost or rewritten
        assert comparable(by_number[number]) == comparable(record), number


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_one_mlflow_run_per_trial(uri: str, summary: dict, trials: int) -> None:
    client = _client(uri)
    experiment = client.get_experiment_by_name("slimforge")
    runs = [r for r in client.search_runs([experiment.experiment_id], "tags.`slimforge.kind` = 'trial'", max_results=1000)
            if r.data.tags.get("slimforge.study") == STUDY]
    assert sorted(int(r.data.tags["trial"]) for r in runs) == list(range(trials))  # none missing, none twice
    by_number = {int(r.data.tags["trial"]): r for r in runs}
    for trial in summary["trials"]:
        run = by_number[trial["number"]]
        assert trial["links"]["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["state"] == trial["state"]
        assert run.info.status in ("FINISHED", "FAILED")


def check_only_recorded_artifacts_left(root: Path, summary: dict) -> None:
    """Every file in the study's artifact folder is an artifact a trial record names: whatever a
    kill left half-done (a cut-off write, a size estimate, an unrecorded trial's artifact) was
    removed when the study resumed."""
    named = sorted(Path(t["artifact_path"]).name for t in summary["trials"] if t["artifact_path"])
    assert sorted(p.name for p in (root / "out" / "artifacts" / STUDY).iterdir()) == named


def check_parent_runs_ended(uri: str) -> list:
    """No search of the study leaves its MLflow parent run RUNNING: the last one FINISHED, and one a
    kill left RUNNING was ended KILLED by the search that resumed the study, which its tag names.
    Returns the parent runs, oldest first."""
    client = _client(uri)
    experiment = client.get_experiment_by_name("slimforge")
    runs = [r for r in client.search_runs([experiment.experiment_id], "tags.`slimforge.kind` = 'search'",
                                          max_results=1000, order_by=["attributes.start_time ASC"])
            if r.data.tags.get("slimforge.study") == STUDY]
    assert runs and runs[-1].info.status == "FINISHED", [r.info.status for r in runs]
    ids = [r.info.run_id for r in runs]
    for run in runs[:-1]:
        assert run.info.status in ("KILLED", "FINISHED"), run.info.status  # FINISHED: killed after it ended its run
        if run.info.status == "KILLED":
            assert ids.index(run.data.tags["slimforge.resumed_by"]) > ids.index(run.info.run_id)
    return runs


def check_artifacts_and_registry(root: Path, summary: dict, uri: str, model: str, concurrent: bool = False) -> None:
    """``concurrent``: two searches each registered the front they saw; a member of the first one's
    front may have left the final front, so the final front must be registered, once each."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    from slimforge.core.artifact import read_artifact
    from slimforge.core.compressed import load_model
    from slimforge.core.manager import Plugins

    artifact_dir = root / "out" / "artifacts" / STUDY
    for trial in summary["trials"]:
        if trial["state"] == "complete":
            path = Path(trial["artifact_path"])
            assert path.parent == artifact_dir and not path.name.startswith(".")
            read_artifact(path)  # every CRC and length checks out
            assert path.stat().st_size == trial["measurements"]["size_bytes"]
    client = _client(uri)
    versions = client.search_model_versions(f"name='{model}'") if client.search_registered_models() else []
    pareto = {m["number"]: m for m in summary["pareto"] if m["not_registered"] is None}  # above the registration floor
    registered = sorted(int(v.tags["trial"]) for v in versions)
    assert len(registered) == len(set(registered))  # never twice
    if concurrent:
        assert set(pareto) <= set(registered)
    else:
        assert registered == sorted(pareto)  # each member registered once
    registry = Plugins().registry
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        trials = {t["number"]: t for t in summary["trials"]}
        for version in versions:
            number = int(version.tags["trial"])
            # concurrent: a member of the first search's front may have left the final one; its
            # version stays registered, and must still hold that trial's artifact
            member = pareto.get(number) if concurrent else pareto[number]
            if member is not None:
                assert member["links"]["model_version"] == int(version.version)
            member = member or trials[number]
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(download_artifacts(artifact_uri=f"models:/{model}/{version.version}", dst_path=tmp))
                (registered,) = local.rglob("*.slim")
                assert sha256(registered) == sha256(member["artifact_path"])
                load_model(registered, registry)  # the registered artifact loads
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
