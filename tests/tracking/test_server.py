"""Tracking against a real `mlflow server` over HTTP (loopback only): a short search of the embedded
MNIST/LeNet-5 task logs its runs and registers its Pareto members there, `slimforge promote` crowns
one, and a fresh process that never ran the search loads `models:/NAME@champion` from the server,
reproduces the registered test accuracy exactly and finds the registered size in the artifact bytes.

Plans are pinned to int8_ptq and magnitude_pruning; seed 11's first three plans are int8-only (no
fine-tuning, so the search is short), and with no budget every complete trial is feasible, so the
Pareto front is never empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from sf_mlflow_server import MlflowServer, assert_search_tracked_over_http, free_port
from slimforge.app.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

MODEL, STUDY, TRIALS, SEED = "mnist-lenet5-compressed", "served", 3, 11

FRESH_PROCESS = """
import json, os, sys
import mlflow, numpy as np, torch
from mlflow.tracking import MlflowClient
from slimforge.core.embedded import mnist_splits
from slimforge.core.task import accuracy

uri, name = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
mlflow.set_registry_uri(uri)
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
versions = {v.version: dict(v.tags) for v in client.search_model_versions(f"name='{name}'")}
champion = client.get_model_version_by_alias(name, "champion")
model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
x, y = mnist_splits()["test"].tensors
outputs = model.predict(x.numpy())
local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion")
artifacts = [os.path.join(d, f) for d, _, files in os.walk(local) for f in files if f.endswith(".slim")]
print(json.dumps({
    "versions": versions, "champion": champion.version, "champion_tags": dict(champion.tags),
    "accuracy": accuracy(torch.from_numpy(np.asarray(outputs)), y), "examples": len(y),
    "artifact_bytes": [os.path.getsize(p) for p in artifacts],
    "search_imported": sorted(m for m in sys.modules if m.startswith("slimforge.search")),
}))
"""


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    # Started before the teacher is trained, so the two overlap: both take a while on 2 cores.
    server = MlflowServer(root / "server", free_port())
    try:
        request.getfixturevalue("embedded_teacher")
        server.wait_healthy()
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mp.chdir(root)
            search = main(["search", "--trials", str(TRIALS), "--seed", str(SEED), "--study", STUDY,
                           "--techniques", "int8_ptq,magnitude_pruning", "--out", str(root / "out"),
                           "--tracking-uri", server.uri, "--no-progress", "--latency-repeats", "10"])
            promoted = main(["promote", "--model", MODEL, "--tracking-uri", server.uri])
        summary = json.loads((root / "out" / "summary.json").read_text())
        yield SimpleNamespace(server=server, root=root, search=search, promoted=promoted, summary=summary)
    finally:
        server.stop()


def test_search_logs_every_trial_and_registers_the_pareto_front_on_the_server(served):
    assert served.search == 0
    summary = served.summary
    assert summary["pareto"], f"seed {SEED} gave no Pareto member"
    assert not (served.root / "out" / "mlflow-pending.jsonl").exists()
    assert "mlflow_pending" not in summary["links"]
    client, experiment, parent = assert_search_tracked_over_http(served.server.uri, summary, summary["trials"])
    cost = summary["links"]["mlflow_logging"]
    assert parent.data.metrics["mlflow_logging_trial_mean_s"] == cost["trial_mean_s"]
    assert parent.data.metrics["mlflow_logging_trial_max_s"] == cost["trial_max_s"]
    print(f"logging cost over HTTP: {cost}")
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == sorted(m["links"]["model_version"] for m in summary["pareto"])


def test_fresh_process_loads_the_champion_and_reproduces_its_registered_numbers(served, subprocess_env):
    assert served.promoted == 0
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, served.server.uri, MODEL], capture_output=True,
                          text=True, env=subprocess_env, cwd=served.root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    pareto = {m["links"]["model_version"]: m for m in served.summary["pareto"]}
    assert sorted(int(v) for v in seen["versions"]) == sorted(pareto)
    tags = seen["champion_tags"]
    member = pareto[int(seen["champion"])]
    assert tags["trial"] == str(member["number"]) and tags["study"] == STUDY
    assert seen["examples"] == 1000
    assert f"{seen['accuracy']:.6f}" == tags["accuracy_test"]  # exactly: k / 1000 correct
    assert seen["accuracy"] == member["test_measurements"]["accuracy"]
    assert seen["artifact_bytes"] == [int(tags["size_bytes"])]
    assert int(tags["size_bytes"]) == member["measurements"]["size_bytes"]
    assert "promotion" in tags and tags["promotion"].split(" ", 1)[1].startswith("promoted: no current champion")
    assert seen["search_imported"] == [], seen["search_imported"]
