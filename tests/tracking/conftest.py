"""Fixtures for tracking tests: real ``mlflow server`` processes, stopped at teardown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Like tests/conftest.py: the helper module imports by name under any --import-mode.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from sf_mlflow_server import MlflowServer, free_port  # noqa: E402


@pytest.fixture
def mlflow_servers(tmp_path_factory):
    """``start(port=None) -> MlflowServer`` (not yet healthy: call ``wait_healthy``); every server
    started is stopped at teardown."""
    servers: list[MlflowServer] = []

    def start(port: int | None = None) -> MlflowServer:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), port or free_port())
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
