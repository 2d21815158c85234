"""``slimforge reproduce RUN_ID``: rebuild a registered model from its recorded plan and check that
the rebuilt artifact is the same file, bit for bit.

The MLflow run id of a trial leads to its registered version, whose artifact is the reference: its
header holds the plan (with the trial's seed) and how to rebuild the task.  The run's tags give the
trial number, the epochs it trained (early stopping depends on the other trials, so a rebuild
replays the count instead of re-deciding it) and the CPU threads it trained with (float sums, and
so the fine-tuned weights, depend on the thread count).  The plan is then run again exactly as the
search ran it, and the two files are compared.

Same machine, same library versions, same thread count: the bytes must match.  Another CPU type or
another torch build may change float results; the command then says where the files first differ.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimforge.core.errors import ConfigError, SlimforgeError


@dataclass
class Reproduction:
    run_id: str
    trial: int
    model_uri: str
    recorded_sha256: str
    rebuilt_sha256: str
    rebuilt_path: str
    threads: int
    epochs: int | None
    difference: str | None  # None when identical

    @property
    def identical(self) -> bool:
        return self.difference is None


def sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def first_difference(recorded: Path, rebuilt: Path) -> str | None:
    """None when the files are equal; else where they first differ, and in which tensor."""
    from slimforge.core.artifact import _PREFIX, read_artifact

    a, b = Path(recorded).read_bytes(), Path(rebuilt).read_bytes()
    if a == b:
        return None
    offset = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    header_end = _PREFIX.size + _PREFIX.unpack_from(a)[2] if len(a) >= _PREFIX.size else 0
    where = f"first difference at byte {offset} of {len(a)} (recorded) / {len(b)} (rebuilt)"
    if offset < header_end:
        where += ", in the header"
    (meta_a, tensors_a), (meta_b, tensors_b) = read_artifact(recorded), read_artifact(rebuilt)
    changed = [name for name in tensors_a if name not in tensors_b or not _same(tensors_a[name], tensors_b[name])]
    if changed:
        where += f"; {len(changed)} tensor(s) differ, first {changed[0]!r}"
    elif meta_a != meta_b:
        where += "; the headers' metadata differ"
    return where


def _same(x, y) -> bool:
    import torch

    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.is_quantized or y.is_quantized:
            return (x.is_quantized == y.is_quantized and x.dtype == y.dtype
                    and torch.equal(x.int_repr(), y.int_repr()) and x.qscheme() == y.qscheme())
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x == y


def _registered_artifact(client, run_id: str, tmp: Path) -> tuple[str, Path]:
    import mlflow

    versions = client.search_model_versions(f"run_id='{run_id}'")
    if not versions:
        raise ConfigError(f"run {run_id}: has no registered model version; reproduce rebuilds registered models "
                          "(the Pareto members of a search)")
    version = max(versions, key=lambda v: int(v.version))
    model_uri = f"models:/{version.name}/{version.version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp)))
    found = sorted(local.rglob("*.slim"))
    if not found:
        raise SlimforgeError(f"{model_uri}: no slimforge artifact in the registered model")
    return model_uri, found[0]


def reproduce(run_id: str, *, tracking_uri: str, config: Path | None = None, trust_header: bool = False,
              out_dir: Path | None = None, log=print, plugins=None) -> Reproduction:
    """Rebuild the registered model of trial run ``run_id`` and compare it with the registered
    file.  ``plugins``: the process's plugins (default: built here)."""
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from slimforge.core import trust
    from slimforge.core.artifact import read_artifact
    from slimforge.core.manager import Plugins
    from slimforge.core.measure import LatencySettings
    from slimforge.core.plan import Plan
    from slimforge.core.task import FactoryRef, task_from_config, task_from_source
    from slimforge.search.budgets import Budgets
    from slimforge.search.objective import TrialRunner

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the result
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run: no MLflow run {run_id!r} in {tracking_uri}") from None
    tags = run.data.tags
    if tags.get("slimforge.kind") != "trial" or "trial" not in tags:
        raise ConfigError(f"run {run_id}: not a slimforge trial run (kind {tags.get('slimforge.kind', 'unknown')!r}); "
                          "pass the run id of a trial, a nested run named trial-NNNN")
    number = int(tags["trial"])
    with tempfile.TemporaryDirectory() as tmp:
        model_uri, reference = _registered_artifact(client, run_id, Path(tmp))
        meta, _ = read_artifact(reference)
        recorded_sha = sha256(reference)
        plan = Plan.from_dict(meta["plan"])
        if config is not None:
            task = task_from_config(config)
        else:
            if trust_header:
                trust.trust(meta, model_uri)
            trust.check(meta, model_uri)
            task = task_from_source(meta.get("task", {}))
            # The header names the architecture the artifact was saved with: rebuild with exactly that.
            task.architecture = FactoryRef.from_dict(trust.header_refs(meta, model_uri)[0])
        epochs = int(tags["epochs_trained"]) if tags.get("epochs_trained") else None
        if epochs is None and plan.recovery.epochs:
            epochs = len({m.step for m in client.get_metric_history(run_id, "train_loss")}) or None
        threads = int(tags.get("torch_threads") or torch.get_num_threads())
        out = Path(out_dir) if out_dir is not None else Path(tmp) / "rebuilt"
        out.mkdir(parents=True, exist_ok=True)
        log(f"rebuilding trial {number} ({model_uri}): {plan.describe()}; {threads} thread(s)"
            + (f", {epochs} epoch(s)" if epochs is not None else ""))
        runner = TrialRunner(task=task, plugins=plugins or Plugins(), budgets=Budgets(), artifact_dir=out,
                             latency=LatencySettings(warmup=0, repeats=1), replay_epochs=epochs)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            record = runner.run(plan, number)
        finally:
            torch.set_num_threads(previous)
        if record.artifact_path is None:
            raise SlimforgeError(f"rebuilding trial {number} failed: {record.failure_reason}")
        rebuilt = Path(record.artifact_path)
        return Reproduction(run_id=run_id, trial=number, model_uri=model_uri, recorded_sha256=recorded_sha,
                            rebuilt_sha256=sha256(rebuilt), rebuilt_path=str(rebuilt), threads=threads, epochs=epochs,
                            difference=first_difference(reference, rebuilt))
