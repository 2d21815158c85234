"""The Ray Tune backend: same space, objective, budgets and records as the Optuna backend.

The search tests need Ray (``pip install 'slimforge[ray]'``) and skip without it; the install-hint
test runs everywhere.  They use the tiny config task rather than the embedded MNIST one: Ray
workers rebuild a config task from its ``[task]`` table exactly as they would the embedded task,
and the tiny one keeps a Ray search at well under a minute on 2 busy cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import sf_testing_models
from slimforge.app.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TECHNIQUES = "int8_ptq,magnitude_pruning"
TRIALS = 3


def _search(tmp_path: Path, backend: str, *extra: str) -> dict:
    config = tmp_path / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    out = tmp_path / f"out-{backend}"
    code = main(["search", "--config", str(config), "--trials", str(TRIALS), "--seed", "0", "--study", "s",
                 "--techniques", TECHNIQUES, "--out", str(out), "--no-tracking", "--no-progress",
                 "--latency-repeats", "5", "--backend", backend, *extra])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_without_ray_the_backend_fails_with_the_install_hint(capsys, tmp_path, monkeypatch):
    for name in ("ray", "ray.tune", "ray.tune.search", "ray.tune.search.optuna"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now raises ImportError
    config = tmp_path / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    code = main(["search", "--config", str(config), "--backend", "ray", "--out", str(tmp_path / "out"),
                 "--no-tracking", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1] == (
        "slimforge: error: --backend ray (the Ray Tune backend) needs the 'ray[tune]' package: "
        "pip install 'slimforge[ray]'")
    assert not (tmp_path / "out" / "baseline.slim").exists()  # failed before measuring anything


@pytest.mark.parametrize("flag", [["--scheduler", "asha"], ["--cpus-per-trial", "2"], ["--ray-address", "auto"]])
def test_ray_flags_without_the_ray_backend_are_refused(capsys, tmp_path, flag):
    code = main(["search", "--out", str(tmp_path / "out"), "--no-tracking", "--no-progress", *flag])
    assert code == 2
    assert "only applies to --backend ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune.search.optuna")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # run_search uses it as it is
    yield ray
    ray.shutdown()


def test_ray_search_records_like_the_optuna_backend(local_ray, tmp_path):
    ray_summary = _search(tmp_path, "ray")
    optuna_summary = _search(tmp_path, "optuna")

    assert ray_summary["settings"]["backend"] == "ray"
    trials = ray_summary["trials"]
    assert [t["number"] for t in trials] == list(range(TRIALS))
    assert ray_summary["search_summary"]["trials_done"] == TRIALS
    # Same record format, field for field, and the same define-by-run space and sampler: with the
    # same seed both backends sample the same plans.
    for ray_trial, optuna_trial in zip(trials, optuna_summary["trials"], strict=True):
        assert ray_trial.keys() == optuna_trial.keys()
        assert ray_trial["plan"] == optuna_trial["plan"]
        assert ray_trial["state"] == "complete", ray_trial["failure_reason"]
        assert ray_trial["measurements"].keys() == optuna_trial["measurements"].keys()
        assert Path(ray_trial["artifact_path"]).exists()  # written by a Ray worker, readable here
    # The Pareto front is computed by the shared code: complete, feasible members measured once on
    # the test split, in the same record format.
    assert ray_summary["pareto"]
    numbers = {t["number"] for t in trials}
    for member in ray_summary["pareto"]:
        assert member["number"] in numbers and member["feasible"]
        assert member["test_measurements"]["split"] == "test"
        assert member.keys() == optuna_summary["pareto"][0].keys()
    hypervolume = ray_summary["search_summary"]["hypervolume"]
    assert hypervolume is not None and 0 <= hypervolume <= 1.1 ** 3
