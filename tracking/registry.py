"""Promotion: move the ``champion`` alias of a registered model only when a candidate really wins.

Every version is re-measured from the registry itself: its slimforge artifact is downloaded, loaded
on its own and scored on the held-out split of its task, its size is the downloaded file's bytes
and its latency is timed here.  Logged numbers are shown next to the re-measured ones, never
trusted.  The decision is recorded as tags on the candidate version and as a run in the
``slimforge-promotions`` experiment, whether the alias moved or not.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimforge.core.errors import ConfigError, SlimforgeError, UnknownNameError

POLICIES = {
    "best-accuracy": "highest re-measured accuracy among versions within the size/latency limits",
    "smallest": "smallest artifact among versions with re-measured accuracy >= --min-accuracy",
}
ALIAS = "champion"
PROMOTIONS_EXPERIMENT = "slimforge-promotions"


@dataclass
class Candidate:
    version: int
    accuracy: float
    size_bytes: int
    latency_ms: float
    logged: dict[str, str] = field(default_factory=dict)  # what the version's tags claimed
    eligible: bool = True
    why_not: str = ""


@dataclass
class Decision:
    model: str
    policy: str
    split: str
    champion_before: int | None
    candidate: int | None
    promoted: bool
    reason: str
    dry_run: bool
    versions: list[Candidate]

    def to_dict(self) -> dict:
        return asdict(self)


def _measure_version(client, name: str, version, split: str) -> Candidate:
    import mlflow

    from slimforge.core.artifact import read_artifact
    from slimforge.core.manager import Plugins
    from slimforge.core.measure import LatencySettings
    from slimforge.core.task import task_from_source
    from slimforge.search.budgets import Budgets
    from slimforge.search.objective import TrialRunner

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=tmp))
        files = sorted(local.rglob("*.slim"))
        if not files:
            raise SlimforgeError(f"{name} version {version.version}: no slimforge artifact in the registered model")
        meta, _ = read_artifact(files[0])
        task = task_from_source(meta.get("task", {}))
        runner = TrialRunner(task=task, plugins=Plugins(), budgets=Budgets(), artifact_dir=files[0].parent,
                             latency=LatencySettings())
        m = runner.measure(files[0], split)
    return Candidate(version=int(version.version), accuracy=m.accuracy, size_bytes=m.size_bytes,
                     latency_ms=m.latency_ms, logged=dict(version.tags))


def _key(policy: str, c: Candidate) -> tuple:
    """Larger is better."""
    if policy == "best-accuracy":
        return (c.accuracy, -c.size_bytes, -c.latency_ms)
    return (-c.size_bytes, c.accuracy, -c.latency_ms)


def promote(model: str, policy: str, *, tracking_uri: str, min_accuracy: float | None = None,
            max_size_bytes: int | None = None, max_latency_ms: float | None = None, split: str = "test",
            dry_run: bool = False, progress=print) -> Decision:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if policy not in POLICIES:
        raise UnknownNameError("--policy", policy, POLICIES)
    if policy == "smallest" and min_accuracy is None:
        raise ConfigError("--min-accuracy: required by --policy smallest (e.g. --min-accuracy 97%)")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"name='{model}'")
    if not versions:
        names = [m.name for m in client.search_registered_models()]
        raise UnknownNameError("--model", model, names)
    try:
        champion_before = int(client.get_model_version_by_alias(model, ALIAS).version)
    except MlflowException:
        champion_before = None

    candidates = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        progress(f"re-measuring {model} version {version.version} on the {split} split ...")
        c = _measure_version(client, model, version, split)
        reasons = []
        if min_accuracy is not None and c.accuracy < min_accuracy:
            reasons.append(f"accuracy {c.accuracy:.4f} < {min_accuracy:.4f}")
        if max_size_bytes is not None and c.size_bytes > max_size_bytes:
            reasons.append(f"size {c.size_bytes} B > {max_size_bytes} B")
        if max_latency_ms is not None and c.latency_ms > max_latency_ms:
            reasons.append(f"latency {c.latency_ms:.3f} ms > {max_latency_ms} ms")
        c.eligible, c.why_not = not reasons, "; ".join(reasons)
        candidates.append(c)

    eligible = [c for c in candidates if c.eligible]
    best = max(eligible, key=lambda c: _key(policy, c)) if eligible else None
    champion = next((c for c in candidates if c.version == champion_before), None)
    if best is None:
        promoted, reason = False, "no version meets the policy's limits: " + "; ".join(
            f"v{c.version}: {c.why_not}" for c in candidates)
    elif champion is None:
        promoted, reason = True, f"no current {ALIAS}; v{best.version} is the best eligible version"
    elif best.version == champion.version:
        promoted, reason = False, f"the current {ALIAS} v{champion.version} is still the best eligible version"
    elif not champion.eligible:
        promoted, reason = True, f"current {ALIAS} v{champion.version} no longer qualifies ({champion.why_not})"
    elif _key(policy, best) > _key(policy, champion):
        promoted, reason = True, (f"v{best.version} beats {ALIAS} v{champion.version} on {policy}: "
                                  f"{_describe(best)} vs {_describe(champion)}")
    else:
        promoted, reason = False, f"no version beats {ALIAS} v{champion.version}"
    decision = Decision(model=model, policy=policy, split=split, champion_before=champion_before,
                        candidate=best.version if best else None, promoted=promoted and not dry_run,
                        reason=reason if not dry_run else f"dry run: {reason}", dry_run=dry_run, versions=candidates)
    if not dry_run:
        if promoted:
            client.set_registered_model_alias(model, ALIAS, str(best.version))
        _record(client, decision, best)
    return decision


def _describe(c: Candidate) -> str:
    return f"acc {c.accuracy:.4f}, {c.size_bytes} B, {c.latency_ms:.3f} ms"


def _record(client, decision: Decision, best: Candidate | None) -> None:
    """Audit trail: a run per decision, and tags on the candidate version."""
    found = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    experiment_id = found.experiment_id if found else client.create_experiment(PROMOTIONS_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"promote-{decision.model}",
                            tags={"model": decision.model, "policy": decision.policy,
                                  "promoted": str(decision.promoted), "reason": decision.reason[:5000]})
    client.log_text(run.info.run_id, json.dumps(decision.to_dict(), indent=2), "decision.json")
    for c in decision.versions:
        client.log_metric(run.info.run_id, f"v{c.version}_accuracy", c.accuracy)
        client.log_metric(run.info.run_id, f"v{c.version}_size_bytes", c.size_bytes)
    client.set_terminated(run.info.run_id)
    if best is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(decision.model, str(best.version), "promotion",
                                     f"{stamp} {'promoted' if decision.promoted else 'not promoted'}: {decision.reason}"[:5000])
        client.set_model_version_tag(decision.model, str(best.version), "promotion_run_id", run.info.run_id)
