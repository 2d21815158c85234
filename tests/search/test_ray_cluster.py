"""A real Ray cluster, started the way Ray users start one: ``ray start --head`` with token
authentication and a second ``ray start --address ...`` node, both on this machine (separate temp
dirs, ports and a custom resource on the second node), and ``slimforge search --backend ray
--ray-address HEAD`` run as a user types it.

- the search logs to a real ``mlflow server`` over HTTP (SQL backend, served artifacts): the
  parent run FINISHED, one run per trial, the registered Pareto members;
- trials land on both nodes (each record names its node) and every artifact reaches the driver
  through Ray: the second node's Ray workers get their own TMPDIR, and the test checks that every
  record points into the driver's artifact folder, that those files exist there, and that no file
  is left in the worker's directory (it was deleted once shipped, so the driver could not have
  read it afterwards);
- without the token, or with a wrong one, the search stops in one line naming the cause and the
  fix within 10 s, before any study, baseline or MLflow run exists.

Skips when Ray is missing.  The nodes are stopped by process id (every process whose command line
names this test's temp dirs, and their children), never ``ray stop``, which would stop every Ray on
the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import sf_testing_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))  # the tracking tests' server helper
from sf_mlflow_server import MlflowServer, assert_search_tracked_over_http  # noqa: E402

pytestmark = [pytest.mark.slow]
ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune.search.optuna")

NODE_START_TIMEOUT_S = 120  # `ray start` takes ~10-15 s on the loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    import sys

    return str(Path(sys.executable).with_name("ray"))


def _node_processes(markers: list[str]) -> list[int]:
    """Process ids whose command line names one of ``markers`` (this test's temp dirs), and all
    their descendants (the nodes' workers and agents)."""
    cmdlines, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found = {pid for pid, cmd in cmdlines.items() if any(m in cmd for m in markers)} - {os.getpid()}
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found - {os.getpid()}
        if not children:
            return sorted(found)
        found |= children


def _stop_nodes(markers: list[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _node_processes(markers)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline and _node_processes(markers):
            time.sleep(0.2)


def _ray_start(args: list[str], env: dict) -> None:
    proc = subprocess.run([_ray_cli(), "start", *args], env=env, capture_output=True, text=True,
                          timeout=NODE_START_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, subprocess_env):
    """A two-node Ray cluster with token authentication and an MLflow tracking server: the head
    address, the env with the token, the env without it, the second node's worker TMPDIR, the server."""
    root = Path(f"/tmp/sf-raytest-{secrets.token_hex(4)}")  # short: Ray's socket paths must fit 107 bytes
    token = root / "token"
    root.mkdir()
    token.write_text(secrets.token_hex(32))
    base = {k: v for k, v in subprocess_env.items() if not k.startswith("RAY_")} | {"RAY_USAGE_STATS_ENABLED": "0"}
    with_token = base | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    node2_tmp = root / "node2-tmp"
    node2_tmp.mkdir()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--disable-usage-stats", "--dashboard-agent-listen-port"]
    markers = [str(root / "head"), str(root / "node2")]
    server = MlflowServer(root / "mlflow", _free_port())  # starts while the nodes start
    try:
        _ray_start(["--head", "--include-dashboard", "false", "--port", str(port), "--temp-dir", str(root / "head"), *common, str(_free_port())],
                   with_token)
        _ray_start(["--address", address, "--temp-dir", str(root / "node2"), "--resources",
                    json.dumps({"slimforge_test_node2": 1}), *common, str(_free_port())],
                   with_token | {"TMPDIR": str(node2_tmp)})
        server.wait_healthy()
        yield SimpleNamespace(address=address, with_token=with_token, without_token=base, node2_tmp=node2_tmp,
                              server=server)
    finally:
        server.stop()
        _stop_nodes(markers)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _search(slimforge_cmd, tmp_path: Path, address: str, env: dict, trials: int, *extra: str):
    config = tmp_path / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run([*slimforge_cmd, "search", "--config", str(config), "--backend", "ray", "--ray-address",
                           address, "--trials", str(trials), "--seed", "0", "--study", "s", "--techniques",
                           "int8_ptq,magnitude_pruning", "--out", str(out), "--no-progress",
                           "--latency-repeats", "5", *extra],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return proc, out, time.monotonic() - started


def test_two_node_search_spreads_trials_and_ships_every_artifact(cluster, slimforge_cmd, tmp_path):
    proc, out, _ = _search(slimforge_cmd, tmp_path, cluster.address, cluster.with_token, 4,
                           "--tracking-uri", cluster.server.uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    trials = summary["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert all(t["links"].get("ray_node_id") for t in trials)  # every record names its node
    nodes = {t["links"]["ray_node_id"] for t in trials}
    assert len(nodes) == 2, [(t["number"], t["links"]) for t in trials]  # both nodes ran trials

    artifact_dir = (out / "artifacts" / "s").resolve()
    with_artifacts = [t for t in trials if t["artifact_path"]]
    assert with_artifacts
    for t in with_artifacts:
        path = Path(t["artifact_path"])
        assert path.parent == artifact_dir, t["artifact_path"]  # the driver's copy, never a worker's path
        assert path.stat().st_size == t["measurements"]["size_bytes"]
    # The second node's Ray workers wrote their artifacts under their own TMPDIR; the files there
    # were deleted once shipped, so what the driver measured on test came through Ray.
    worker_dirs = list(cluster.node2_tmp.glob("slimforge-ray-trials-*"))
    assert not [p for d in worker_dirs for p in d.rglob("*") if p.is_file()]
    assert summary["pareto"] and all(m.get("test_measurements") for m in summary["pareto"])

    # Tracked over HTTP: the parent run finished, one run per trial, the registered members' versions.
    client, _, _ = assert_search_tracked_over_http(cluster.server.uri, summary, trials)
    versions = client.search_model_versions("name='tiny-compressed'")
    assert sorted(int(v.version) for v in versions) == sorted(
        m["links"]["model_version"] for m in summary["pareto"] if "model_version" in m["links"])


@pytest.mark.parametrize("token_env, cause", [
    ({}, "requires token authentication and RAY_AUTH_MODE is not 'token' here"),
    ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token but this process has no token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "refused this process's token"),
])
def test_a_missing_or_wrong_token_is_one_line_within_ten_seconds(cluster, slimforge_cmd, tmp_path, token_env,
                                                                 cause):
    address = cluster.address
    tracking = tmp_path / "mlflow"
    env = cluster.without_token | token_env | {"HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    proc, out, seconds = _search(slimforge_cmd, tmp_path, address, env, 2, "--tracking-uri", tracking.as_uri())
    assert proc.returncode == 2
    assert seconds < 10, seconds
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"slimforge: error: --ray-address {address}: ") and cause in last, proc.stderr
    assert "RAY_AUTH_MODE=token and the cluster's token" in last  # the fix
    # Nothing was written: no study, no baseline, no MLflow parent run (FAILED or otherwise).
    assert not out.exists()
    assert not tracking.exists()


def test_nothing_listening_is_one_line(slimforge_cmd, tmp_path, subprocess_env):
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("RAY_")}
    proc, out, seconds = _search(slimforge_cmd, tmp_path, address, env, 2, "--no-tracking")
    assert proc.returncode == 2 and seconds < 10, (seconds, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert "nothing is listening at" in last and "ray start --head --port" in last, proc.stderr
    assert not out.exists()
