"""Determinism: the same config and seed on the same machine give the same plans and the same
artifact bytes, and ``slimforge reproduce RUN_ID`` rebuilds a registered model from what MLflow
recorded, bit for bit (exit 1 and the first difference when it cannot)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import sf_testing_models
from slimforge.app.cli import main
from slimforge.core.measure import LatencySettings
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

SEED, TRIALS = 0, 4  # seed 0's first trials include fine-tuned pruning and pruned int8 plans


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _search(root: Path, tracking: bool):
    settings = SearchSettings(trials=TRIALS, seed=SEED, study="same-seed", out_dir=root / "out",
                              techniques=("int8_ptq", "magnitude_pruning"), tracking=tracking,
                              tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False,
                              latency=LatencySettings(repeats=3),
                              # the fine-tuned members of these few tiny trials are far below the
                              # default registration floor; `reproduce` needs them registered
                              register_max_accuracy_drop=1.0)
    return run_search(sf_testing_models.tiny_task(), Budgets(), settings)


@pytest.fixture(scope="module")
def twin_searches(tmp_path_factory):
    first_root, second_root = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(first_root)  # MLflow's default artifact root is relative to the working directory
        first = _search(first_root, tracking=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(second_root)
        second = _search(second_root, tracking=False)
    return first_root, first, second


def test_same_seed_gives_the_same_plans_and_the_same_artifact_bytes(twin_searches):
    _, first, second = twin_searches
    assert [t.plan for t in first.trials] == [t.plan for t in second.trials]
    assert [t.state for t in first.trials] == [t.state for t in second.trials]
    trained = [t for t in first.trials if t.state == "complete" and t.plan["recovery"]["epochs"] > 0]
    assert trained, "the seed must give at least one fine-tuned trial, or the bytes prove little"
    for a, b in zip(first.trials, second.trials):
        if a.state == "complete":
            assert a.artifact_path != b.artifact_path
            assert sha256(a.artifact_path) == sha256(b.artifact_path), a.number
            assert a.measurements.accuracy == b.measurements.accuracy
            assert a.measurements.size_bytes == b.measurements.size_bytes


def _member_to_reproduce(result):
    """A registered Pareto member that was fine-tuned: the hardest kind to rebuild exactly."""
    members = sorted(result.pareto, key=lambda m: -m.plan["recovery"]["epochs"])
    assert members and members[0].plan["recovery"]["epochs"] > 0, "need a fine-tuned Pareto member"
    return members[0]


def test_reproduce_rebuilds_a_registered_model_bit_for_bit(twin_searches, subprocess_env, slimforge_cmd, tmp_path):
    root, first, _ = twin_searches
    member = _member_to_reproduce(first)
    proc = subprocess.run([*slimforge_cmd, "reproduce", member.links["mlflow_run_id"],
                           "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    expected = sha256(member.artifact_path)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"recorded: {expected}  models:/tiny-compressed/")
    assert lines[1].startswith(f"rebuilt:  {expected}  ")
    assert lines[2] == "identical"
    assert sha256(tmp_path / f"trial-{member.number:04d}.slim") == expected


def test_reproduce_says_where_a_different_rebuild_differs(twin_searches, capsys, monkeypatch):
    """A rebuild that cannot match (here: a different seed) exits 1 and names the first difference."""
    from slimforge.core.plan import Plan

    root, first, _ = twin_searches
    member = _member_to_reproduce(first)
    original = Plan.from_dict

    def other_seed(data):
        plan = original(data)
        return Plan(steps=plan.steps, recovery=plan.recovery, seed=plan.seed + 1)

    monkeypatch.setattr(Plan, "from_dict", staticmethod(other_seed))
    code = main(["reproduce", member.links["mlflow_run_id"], "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[0].split()[1] != out[1].split()[1]  # the two sha256
    assert out[2].startswith("different: first difference at byte ")
    assert "tensor(s) differ, first '" in out[2]


def test_first_difference_names_the_tensor(tmp_path):
    from slimforge.core.artifact import write_artifact
    from slimforge.search.reproduce import first_difference

    import torch

    tensors = {"a.weight": torch.ones(4, 4), "b.weight": torch.zeros(3)}
    write_artifact(tmp_path / "x.slim", tensors, {"kind": "test"})
    write_artifact(tmp_path / "y.slim", tensors | {"b.weight": torch.tensor([0.0, 1.0, 0.0])}, {"kind": "test"})
    write_artifact(tmp_path / "z.slim", tensors, {"kind": "test"})
    assert first_difference(tmp_path / "x.slim", tmp_path / "z.slim") is None
    assert first_difference(tmp_path / "x.slim", tmp_path / "y.slim").endswith("1 tensor(s) differ, first 'b.weight'")


def test_reproduce_refuses_a_run_that_is_not_a_trial(twin_searches, capsys):
    root, first, _ = twin_searches
    parent = first.links["mlflow_parent_run_id"]
    code = main(["reproduce", parent, "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"slimforge: error: run {parent}: not a slimforge trial run (kind 'search'); pass the run id "
                           "of a trial, a nested run named trial-NNNN")


def test_the_recorded_summary_says_how_many_threads_trained(twin_searches):
    _, first, _ = twin_searches
    assert all(t.torch_threads and t.torch_threads >= 1 for t in first.trials)
    assert json.loads((twin_searches[0] / "out" / "summary.json").read_text())["trials"][0]["torch_threads"] >= 1
    assert os.cpu_count()
