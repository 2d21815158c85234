"""Offline resilience: a search whose tracking server is unreachable finishes, keeps every MLflow
record in OUT/mlflow-pending.jsonl, and ``slimforge sync`` replays them exactly once.

Runs on the tiny task (seeded random 8x8 images): trials take well under a second, so what is
timed here is the tracking.
"""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
from mlflow.exceptions import MlflowException

import sf_testing_models
from slimforge.app.cli import main
from slimforge.core.hookspecs import hookimpl
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search
from slimforge.tracking import mlflow as tracker_module
from slimforge.tracking.journal import JOURNAL_NAME, read_journal

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TRIALS, SEED, TECHNIQUES = 3, 11, "int8_ptq,magnitude_pruning"  # seed 11: int8-only plans, no fine-tuning
MODEL = "tiny-compressed"


def _search(root, uri: str, capsys) -> tuple[int, str]:
    (root / "task.toml").write_text(sf_testing_models.task_toml())
    code = main(["search", "--config", str(root / "task.toml"), "--trials", str(TRIALS), "--seed", str(SEED),
                 "--techniques", TECHNIQUES, "--study", "offline", "--out", str(root / "out"), "--tracking-uri", uri,
                 "--no-progress", "--latency-repeats", "5"])
    return code, capsys.readouterr().err


def _state(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("slimforge")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    kinds = {}
    for run in runs:
        kinds.setdefault(run.data.tags.get("slimforge.kind"), []).append(run)
    versions = client.search_model_versions(f"name='{MODEL}'")
    return {"search": kinds.get("search", []), "trial": kinds.get("trial", []), "versions": versions}


def test_unreachable_server_then_sync_records_everything_exactly_once(tmp_path, mlflow_servers, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with socket.socket() as closed:  # bound, never listening: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        started = time.monotonic()
        code, err = _search(tmp_path, f"http://127.0.0.1:{port}", capsys)
        search_s = time.monotonic() - started
    assert code == 0, err
    assert "could not record to" in err and f"slimforge sync --out {out}" in err

    summary = json.loads((out / "summary.json").read_text())
    assert [t["number"] for t in summary["trials"]] == list(range(TRIALS))
    pareto = summary["pareto"]
    assert pareto, f"seed {SEED} gave no Pareto member"
    assert all(t["links"] == {"mlflow_pending": True} for t in summary["trials"])
    ops = read_journal(out / JOURNAL_NAME)
    assert [op["op"] for op in ops] == ["search_start", *["trial"] * TRIALS, *["register"] * len(pareto), "search_end"]
    assert [op["trial"]["number"] for op in ops if op["op"] == "trial"] == list(range(TRIALS))
    assert ops[0]["attempts"] >= 1 and "Connection refused" in ops[0]["last_error"], ops[0]["last_error"]
    assert summary["links"]["mlflow_pending"] == {"operations": len(ops), "journal": str(out / JOURNAL_NAME)}
    # A dead server costs milliseconds per trial, not MLflow's default minutes of retries.
    assert summary["links"]["mlflow_logging"]["trial_max_s"] < 5, summary["links"]["mlflow_logging"]
    print(f"search with an unreachable server: {search_s:.1f} s; {summary['links']['mlflow_logging']}")

    server = mlflow_servers(port)  # the server "comes back" where the search expected it
    server.wait_healthy()
    saved = tmp_path / "journal-copy.jsonl"
    shutil.copy(out / JOURNAL_NAME, saved)

    assert main(["sync", "--out", str(out)]) == 0
    reply = capsys.readouterr().out
    assert f"replayed {len(ops)} operation(s)" in reply and "nothing pending" in reply
    assert not (out / JOURNAL_NAME).exists()
    state = _state(server.uri)
    (parent,) = state["search"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "offline"
    assert sorted(int(r.data.tags["trial"]) for r in state["trial"]) == list(range(TRIALS))
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in state["trial"])
    assert len(state["versions"]) == len(pareto)
    assert {v.tags["trial"] for v in state["versions"]} == {str(m["number"]) for m in pareto}
    for member in pareto:
        (version,) = [v for v in state["versions"] if v.tags["trial"] == str(member["number"])]
        assert version.tags["size_bytes"] == str(member["measurements"]["size_bytes"])
        assert version.tags["accuracy_test"] == f"{member['test_measurements']['accuracy']:.6f}"
    # The replayed runs carry the search's own timestamps, and its reports are attached.
    assert parent.info.start_time == ops[0]["time_ms"]
    from mlflow.tracking import MlflowClient

    files = {a.path for a in MlflowClient(server.uri).list_artifacts(parent.info.run_id)}
    assert {"summary.json", "trials.csv"} <= files
    # summary.json now links what exists.
    synced = json.loads((out / "summary.json").read_text())
    assert "mlflow_pending" not in synced["links"]
    assert synced["links"]["mlflow_parent_run_id"] == parent.info.run_id
    runs = {r.data.tags["trial"]: r.info.run_id for r in state["trial"]}
    assert {str(t["number"]): t["links"]["mlflow_run_id"] for t in synced["trials"]} == runs
    assert {m["links"]["model_version"] for m in synced["pareto"]} == {int(v.version) for v in state["versions"]}

    # Syncing again: nothing to do.
    assert main(["sync", "--out", str(out)]) == 0
    assert "nothing pending" in capsys.readouterr().out

    # The same journal replayed again (as if the first sync's progress had been lost), first to a
    # dead address (kept, exit 1), then to the server: nothing is created twice.
    shutil.copy(saved, out / JOURNAL_NAME)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        assert main(["sync", "--out", str(out), "--tracking-uri", f"http://127.0.0.1:{closed.getsockname()[1]}"]) == 1
    assert "still pending" in capsys.readouterr().err
    assert len(read_journal(out / JOURNAL_NAME)) == len(ops)
    assert main(["sync", "--out", str(out)]) == 0
    again = _state(server.uri)
    assert [r.info.run_id for r in again["search"]] == [parent.info.run_id]
    assert sorted(r.info.run_id for r in again["trial"]) == sorted(r.info.run_id for r in state["trial"])
    assert sorted(v.version for v in again["versions"]) == sorted(v.version for v in state["versions"])


class ServerOutage:
    """Makes every MLflow operation fail, as a dead server would, while trials ``down`` start."""

    def __init__(self, down: set[int]):
        self.down, self.failing = down, False

    @hookimpl
    def slimforge_trial_start(self, number, plan):
        self.failing = number in self.down


def test_outage_mid_search_is_replayed_at_a_later_trial(tiny_task, tmp_path, monkeypatch, capsys):
    outage = ServerOutage(down={1, 2})
    real_execute = tracker_module.MlflowWriter.execute

    def execute(self, op):
        if outage.failing:
            raise MlflowException("API request to http://127.0.0.1:1/api failed with exception Connection refused")
        return real_execute(self, op)

    monkeypatch.setattr(tracker_module.MlflowWriter, "execute", execute)
    plugins = Plugins(load_entry_points=False)
    plugins.register(outage, name="outage")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = SearchSettings(trials=4, seed=SEED, techniques=tuple(TECHNIQUES.split(",")), study="outage",
                              out_dir=tmp_path / "out", tracking_uri=uri, progress=False,
                              latency=LatencySettings(warmup=1, repeats=3))
    monkeypatch.chdir(tmp_path)
    result = run_search(tiny_task, Budgets(), settings, plugins=plugins)
    err = capsys.readouterr().err
    assert err.count("could not record to") == 1  # said once, not per trial
    assert not (tmp_path / "out" / JOURNAL_NAME).exists()  # replayed when trial 3 ended
    state = _state(uri)
    assert sorted(int(r.data.tags["trial"]) for r in state["trial"]) == [0, 1, 2, 3]
    assert {r.info.run_id for r in state["trial"]} == {t.links["mlflow_run_id"] for t in result.trials}
    assert all("mlflow_pending" not in t.links for t in result.trials)
    assert len(state["versions"]) == len(result.pareto) > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "mlflow_pending" not in summary["links"]
    parent = state["search"][0]
    assert parent.data.metrics["mlflow_logging_trial_max_s"] == summary["links"]["mlflow_logging"]["trial_max_s"]
    assert "mlflow_logging_trial_mean_s" in parent.data.metrics

    # A later search of the same study that is handed an already-logged trial again (the engine
    # adopts trials run by `slimforge worker`s) reuses its run: runs are keyed by study and trial.
    again = tracker_module.MlflowTracker(tracking_uri=uri, experiment="slimforge", registered_model=MODEL)
    again.slimforge_search_start(settings=result.settings, task=tiny_task, baseline=result.baseline)
    assert again.slimforge_trial_end(record=result.trials[0]) == {"mlflow_run_id": result.trials[0].links["mlflow_run_id"]}
    assert len(_state(uri)["trial"]) == 4
