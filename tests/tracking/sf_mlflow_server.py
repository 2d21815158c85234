"""A real ``mlflow server`` for tracking tests: loopback only, its own sqlite file and artifact
folder, and a ``stop`` that ends every process it started (it runs in its own session)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# The server imports MLflow, migrates a fresh sqlite database and starts uvicorn: a few seconds
# on an idle machine, half a minute on a loaded 2-core one.
HEALTH_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "server.log"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
        # MLflow 3 proxies artifacts by default (--serve-artifacts): clients upload over HTTP and the
        # server stores them under --artifacts-destination.
        command += ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--artifacts-destination", str(root / "artifacts")]
        # The job runner (a process and seven huey consumers, for GenAI features) only costs CPU here.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "w") as log:
            # Own session: `mlflow server` starts uvicorn as a child, and stopping must reach both.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
                                            start_new_session=True)

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.uri
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (the one it was started in, nothing else), then
        SIGKILL to whatever of it is left after a grace period."""
        deadline = time.monotonic() + 15
        self._signal(signal.SIGTERM)
        while time.monotonic() < deadline and (self.process.poll() is None or self._group_alive()):
            time.sleep(0.2)
        if self._group_alive():
            self._signal(signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False


def assert_search_tracked_over_http(server_uri: str, summary: dict, trials: list[dict]):
    """The checks every search logged through ``mlflow server`` must pass: its experiment's
    artifacts are served (``mlflow-artifacts:``), its one search run finished, and there is one
    nested run per trial of ``trials`` (records with ``links.mlflow_run_id``).  Returns
    ``(client, experiment, parent)`` for the caller's own checks."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server_uri, registry_uri=server_uri)
    experiment = client.get_experiment_by_name("slimforge")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # uploaded through the server
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`slimforge.kind` = 'search'")
    assert parent.info.run_id == summary["links"]["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in runs) == sorted(t["links"]["mlflow_run_id"] for t in trials)
    return client, experiment, parent
