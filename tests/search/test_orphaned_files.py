"""Resuming a study removes the files a killed search left in its artifact folder, and only those:
cut-off writes, size estimates and artifacts of trials that were never recorded complete, each of a
trial the study knows and nothing is running.  The same cleanup in a real kill -9 sequence:
test_kill_resume.py."""

from __future__ import annotations

from pathlib import Path

from slimforge.core.artifact import _temporary_path, temporary_target
from slimforge.core.measure import Measurements
from slimforge.search.backends.optuna import INTERRUPTED, OptunaBackend
from slimforge.search.budgets import Budgets
from slimforge.search.study import remove_orphaned_files
from slimforge.search.records import COMPLETE, FAILED, TrialRecord


def test_temporary_names_of_the_artifact_writer_are_recognised():
    assert temporary_target(Path(_temporary_path("out/artifacts/s/trial-0003.slim")).name) == "trial-0003.slim"
    for name in ("trial-0003.slim", ".trial-0003.slim.tmp", ".trial-0003.slim.NOTHEX12.tmp", "x.12345678.tmp"):
        assert temporary_target(name) is None, name


def _close(backend: OptunaBackend, artifact_dir: Path, state: str, artifact: str | None = None) -> None:
    trial = backend.ask()
    record = TrialRecord(number=trial.number, state=state, plan={}, plan_text="p",
                         artifact_path=str(artifact_dir / artifact) if artifact else None,
                         failure_reason=None if state == COMPLETE else INTERRUPTED,
                         measurements=Measurements(accuracy=0.9, size_bytes=10, latency_ms=0.1) if state == COMPLETE else None)
    backend.tell(trial, record)


def test_only_provable_orphans_are_removed(tmp_path):
    artifact_dir = tmp_path / "artifacts"
    artifact_dir.mkdir()
    backend = OptunaBackend(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", seed=0, budgets=Budgets())
    _close(backend, artifact_dir, COMPLETE, "trial-0000.slim")  # 0: recorded complete
    _close(backend, artifact_dir, FAILED)                        # 1: interrupted after writing its artifact
    _close(backend, artifact_dir, FAILED, "trial-0002.slim")     # 2: failed, but its record names its artifact
    backend.ask()                                                 # 3: running (a worker of the study)
    files = {
        "trial-0000.slim": "kept", "trial-0001.slim": "removed", ".trial-0001.slim.0a1b2c3d.tmp": "removed",
        "trial-0001.estimate.slim": "removed", ".trial-0001.estimate.slim.ffff0000.tmp": "removed",
        ".trial-0000.slim.12345678.tmp": "removed",  # a retried write of a trial that then completed
        "trial-0002.slim": "kept",
        ".trial-0003.slim.89abcdef.tmp": "kept", "trial-0003.estimate.slim": "kept", "trial-0003.slim": "kept",
        "trial-0007.slim": "kept", ".trial-0007.slim.deadbeef.tmp": "kept",  # trial 7: not in this study
        "notes.txt": "kept", ".other.slim.01234567.tmp": "kept",
    }
    for name in files:
        (artifact_dir / name).write_bytes(b"x")

    removed = dict(remove_orphaned_files(backend, artifact_dir))

    assert sorted(removed) == sorted(name for name, fate in files.items() if fate == "removed")
    assert sorted(p.name for p in artifact_dir.iterdir()) == sorted(n for n, fate in files.items() if fate == "kept")
    assert removed["trial-0001.slim"] == "trial 1 not recorded complete"
    assert removed[".trial-0001.slim.0a1b2c3d.tmp"] == "cut-off write"
    assert removed["trial-0001.estimate.slim"] == "size estimate"
    assert remove_orphaned_files(backend, artifact_dir) == []  # nothing left to remove
