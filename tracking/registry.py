"""Promotion: move the ``champion`` alias of a registered model only when a candidate really wins.

Every version is re-measured from the registry itself: its slimforge artifact is downloaded, loaded
on its own and scored on the held-out split of its task, its size is the downloaded file's bytes
and its latency is timed here.  Logged numbers are shown next to the re-measured ones, never
trusted.  The decision is recorded whether the alias moved or not (``--dry-run`` records nothing):
tags ``promotion`` and ``promotion_run_id`` on the policy's best version, and a run in the
``slimforge-promotions`` experiment (tags: policy, champion before/after, reason, each version's
eligibility; metrics: each version's re-measured numbers; ``decision.json``).

Latency is re-timed on every promotion and so is noisy: it only breaks ties between challengers,
and a tie on the policy's numbers keeps the champion, so repeated promotions do not flap.
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
    promoted: bool  # the alias moved (never on a dry run)
    reason: str
    dry_run: bool
    versions: list[Candidate]
    would_promote: bool = False  # what the policy decided, dry run or not
    champion_after: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _Measurer:
    """Re-measures registered versions; versions of one task share the rebuilt task (its data is
    loaded once per promotion, not once per version)."""

    def __init__(self, split: str, plugins):
        self.split, self.plugins, self._tasks = split, plugins, {}

    def __call__(self, name: str, version) -> Candidate:
        import mlflow

        from slimforge.core import trust
        from slimforge.core.artifact import read_artifact
        from slimforge.core.measure import measure_artifact
        from slimforge.core.task import task_from_source

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                             dst_path=tmp))
            files = sorted(local.rglob("*.slim"))
            if not files:
                raise SlimforgeError(f"{name} version {version.version}: no slimforge artifact in the registered model")
            meta, _ = read_artifact(files[0])
            trust.check(meta, f"{name} version {version.version}")  # before its task's factories are called
            source = meta.get("task", {})
            key = json.dumps(source, sort_keys=True, default=str)
            if key not in self._tasks:
                self._tasks[key] = task_from_source(source)
            m = measure_artifact(files[0], task=self._tasks[key], plugins=self.plugins, split=self.split)
        return Candidate(version=int(version.version), accuracy=m.accuracy, size_bytes=m.size_bytes,
                         latency_ms=m.latency_ms, logged=dict(version.tags))


def _key(policy: str, c: Candidate) -> tuple:
    """What the policy ranks on, larger is better.  Latency is re-timed on every promotion and so
    is noisy: it only breaks ties between challengers (``_pick``), never unseats a champion."""
    if policy == "best-accuracy":
        return (c.accuracy, -c.size_bytes)
    return (-c.size_bytes, c.accuracy)


def _pick(policy: str, eligible: list[Candidate], champion: int | None) -> Candidate | None:
    """The policy's best version; on a tie the champion stays, then the faster, then the older."""
    if not eligible:
        return None
    top = max(_key(policy, c) for c in eligible)
    tied = [c for c in eligible if _key(policy, c) == top]
    return next((c for c in tied if c.version == champion), None) or min(tied, key=lambda c: (c.latency_ms, c.version))


def promote(model: str, policy: str, *, tracking_uri: str, min_accuracy: float | None = None,
            max_size_bytes: int | None = None, max_latency_ms: float | None = None, split: str = "test",
            dry_run: bool = False, progress=print, plugins=None) -> Decision:
    """Re-measure every version of ``model``, pick the policy's best, move the alias if it beats
    the champion (ties keep the champion), record the decision unless ``dry_run``."""
    from slimforge.tracking.mlflow import short_http_timeouts

    with short_http_timeouts():  # a dead server fails in seconds; no "View run" lines on stdout
        return _promote(model, policy, tracking_uri=tracking_uri, min_accuracy=min_accuracy,
                        max_size_bytes=max_size_bytes, max_latency_ms=max_latency_ms, split=split,
                        dry_run=dry_run, progress=progress, plugins=plugins)


def _promote(model: str, policy: str, *, tracking_uri: str, min_accuracy: float | None,
             max_size_bytes: int | None, max_latency_ms: float | None, split: str, dry_run: bool,
             progress, plugins) -> Decision:
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
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise  # e.g. the server is unreachable: that is not "no champion"
        champion_before = None

    if plugins is None:  # called on its own, not from the command line
        from slimforge.core.manager import Plugins

        plugins = Plugins()
    candidates, measure = [], _Measurer(split, plugins)
    for version in sorted(versions, key=lambda v: int(v.version)):
        progress(f"re-measuring {model} version {version.version} on the {split} split ...")
        c = measure(model, version)
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
    best = _pick(policy, eligible, champion_before)
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
                        reason=reason if not dry_run else f"dry run: {reason}", dry_run=dry_run, versions=candidates,
                        would_promote=promoted,
                        champion_after=best.version if promoted and not dry_run else champion_before)
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
    from mlflow.entities import Metric, RunTag

    run = client.create_run(experiment_id, run_name=f"promote-{decision.model}",
                            tags={"model": decision.model, "policy": decision.policy, "split": decision.split,
                                  "promoted": str(decision.promoted), "reason": decision.reason[:5000],
                                  "champion_before": str(decision.champion_before),
                                  "champion_after": str(decision.champion_after),
                                  "candidate": str(decision.candidate)})
    client.log_text(run.info.run_id, json.dumps(decision.to_dict(), indent=2), "decision.json")
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[
        Metric(f"v{c.version}_{key}", float(getattr(c, key)), now, 0)
        for c in decision.versions for key in ("accuracy", "size_bytes", "latency_ms")],
        tags=[RunTag(f"v{c.version}_eligible", "yes" if c.eligible else f"no: {c.why_not}"[:5000])
              for c in decision.versions])
    client.set_terminated(run.info.run_id)
    if best is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(decision.model, str(best.version), "promotion",
                                     f"{stamp} {'promoted' if decision.promoted else 'not promoted'}: {decision.reason}"[:5000])
        client.set_model_version_tag(decision.model, str(best.version), "promotion_run_id", run.info.run_id)
