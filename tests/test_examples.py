"""examples/ runs as documented: the CLI on examples/user_task.toml, and examples/python_api.py.

Both run as subprocesses from a temporary working directory, so the user model must be found
through the config's folder (CLI) or the script's own sys.path entry, never through the cwd.
The file's budgets need more trials than a test can afford, so flags loosen them: the CLI test
keeps the file's accuracy budget (whether a trial meets it depends on which plans the sampler
draws), the Python API test lifts every budget so that its Pareto front cannot be empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIG = EXAMPLES / "user_task.toml"
TIMEOUT_S = 300  # a hung search fails the test instead of the whole run

pytestmark = pytest.mark.slow


@pytest.fixture
def env(subprocess_env) -> dict[str, str]:
    # One intra-op thread: on a busy 2-core machine, torch's thread pool makes these tiny training
    # steps 10-50x slower (measured), and latency is timed on one thread anyway.
    return {**subprocess_env, "OMP_NUM_THREADS": "1"}


def slimforge_command() -> list[str]:
    script = Path(sys.executable).with_name("slimforge")  # the console script, as documented
    return [str(script)] if script.exists() else [sys.executable, "-m", "slimforge.app.cli"]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{args} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def check_summary(summary_path: Path, cwd: Path, trials: int, pareto_required: bool) -> dict:
    """Trials recorded; every complete trial's (and Pareto member's) size is its artifact's bytes."""
    assert summary_path.exists()
    summary = json.loads(summary_path.read_text())
    assert summary["task"] == "sklearn-digits"
    assert len(summary["trials"]) == trials
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    assert complete, [(t["state"], t["failure_reason"]) for t in summary["trials"]]
    for record in complete:
        assert record["measurements"]["size_bytes"] == (cwd / record["artifact_path"]).stat().st_size
    assert bool(summary["pareto"]) == any(t["feasible"] for t in complete)
    if pareto_required:
        assert summary["pareto"], "no feasible trial: the budgets this test passes must leave room"
    for member in summary["pareto"]:
        assert member["feasible"]
        assert member["measurements"]["size_bytes"] == (cwd / member["artifact_path"]).stat().st_size
        assert member["test_measurements"]["split"] == "test"
        if member["not_registered"] is None:
            assert member["links"]["registered_model"] == "sklearn-digits-compressed"  # MLflow registered it
        else:  # below the registration floor: reported, not registered
            assert "registered_model" not in member["links"]
    return summary


def test_cli_search_with_user_task_config_then_evaluate_elsewhere(tmp_path, env):
    work = tmp_path / "work"
    work.mkdir()
    proc = run([*slimforge_command(), "search", "--config", str(CONFIG), "--trials", "4", "--max-size", "1MB",
                "--out", "out", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"], work, env)

    assert "Pareto front" in proc.stdout
    assert "baseline (uncompressed): macro_f1 " in proc.stderr  # the custom metric, by its name
    summary = check_summary(work / "out" / "summary.json", work, trials=4, pareto_required=False)
    # The flag overrides [budgets] max_size; the file's max_accuracy_drop (2pt) still applies.
    assert summary["budgets"]["max_size_bytes"] == 1_000_000
    assert summary["budgets"]["min_accuracy"] == pytest.approx(summary["baseline"]["val"]["accuracy"] - 0.02)
    assert summary["settings"]["techniques"] == ["magnitude_pruning", "knowledge_distillation", "int8_ptq"]
    assert (tmp_path / "mlflow.db").exists() and not (work / "mlflow.db").exists()

    # The artifact alone rebuilds its task (data, metric, model factory) from any directory, and
    # scores what the search measured.
    record = next(t for t in summary["trials"] if t["state"] == "complete")
    artifact = (work / record["artifact_path"]).resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run([*slimforge_command(), "evaluate", str(artifact), "--split", "val"], elsewhere, env)
    expected = record["measurements"]
    assert f"macro_f1 {expected['accuracy']:.4f} on val" in proc.stdout
    assert f"{expected['size_bytes']} bytes" in proc.stdout


def test_python_api_example(tmp_path, env):
    tracking_db = tmp_path / "tracking" / "mlflow.db"
    tracking_db.parent.mkdir()
    proc = run([sys.executable, str(EXAMPLES / "python_api.py"), "--out", "api-out", "--trials", "2",
                "--max-size", "1MB", "--max-accuracy-drop", "100pt", "--tracking-uri", f"sqlite:///{tracking_db}"],
               tmp_path, env)

    assert "Pareto front, best macro_f1 first" in proc.stdout
    assert "reloaded trial" in proc.stdout
    check_summary(tmp_path / "api-out" / "summary.json", tmp_path, trials=2, pareto_required=True)
    assert tracking_db.exists() and not (tmp_path / "api-out" / "mlflow.db").exists()
    assert not os.path.exists(tmp_path / "mlflow.db")
