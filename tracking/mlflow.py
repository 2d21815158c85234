"""MLflow tracker: a plugin listening to the search lifecycle hooks.

Search = parent run, trial = nested run (params: the plan; metrics: measurements; tags: state,
failure reason).  Everything per trial goes out in one ``log_batch`` call so logging stays small
next to trial time.  Only Pareto members get a model logged (pyfunc wrapping the artifact) and
registered as a version of one registered model, tagged with trial, plan and measurements.
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from pathlib import Path

from slimforge.core.errors import MissingDependencyError
from slimforge.core.hookspecs import hookimpl

try:
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
except ImportError as exc:  # pragma: no cover
    raise MissingDependencyError("mlflow", "MLflow tracking") from exc

# MLflow chatter ("already exists" notices, a type-hint suggestion that does not apply to array
# inputs) would bury the search's own progress output.
logging.getLogger("mlflow").setLevel(logging.WARNING)
PREDICT_HINT_WARNING = "(?s).*type hints to the `predict` method"

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def _flatten(prefix: str, value, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        for index, inner in enumerate(value):
            _flatten(f"{prefix}.{index}", inner, out)
    else:
        out[prefix] = str(value)[:MAX_PARAM_LENGTH]
    return out


def plan_params(plan: dict) -> dict[str, str]:
    """``{"step0.technique": "magnitude_pruning", "step0.sparsity.fc1": "0.9", ...}``."""
    params = {}
    for index, step in enumerate(plan["steps"]):
        params[f"step{index}.technique"] = step["technique"]
        _flatten(f"step{index}", step["config"], params)
    _flatten("recovery", plan["recovery"], params)
    params["seed"] = str(plan["seed"])
    return params


def measurement_metrics(measurements: dict | None, suffix: str = "") -> dict[str, float]:
    if not measurements:
        return {}
    keys = ("accuracy", "size_bytes", "latency_ms", "latency_p90_ms")
    return {f"{k}{suffix}": float(measurements[k]) for k in keys if measurements.get(k) is not None}


class MlflowTracker:
    def __init__(self, *, tracking_uri: str, experiment: str, registered_model: str):
        self.tracking_uri, self.registered_model = tracking_uri, registered_model
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.parent_run_id: str | None = None
        self._task = None

    def _log(self, run_id: str, *, params=None, metrics=None, tags=None, steps=()) -> None:
        """One ``log_batch`` call: params, metrics, tags and stepped metrics ``(key, step, value)``."""
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
            + [Metric(k, v, now, step) for k, step, v in steps],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    @hookimpl
    def slimforge_search_start(self, settings, task, baseline):
        import torch

        self._task = task
        run = self.client.create_run(self.experiment_id, run_name=settings["study"],
                                     tags={"slimforge.kind": "search", "slimforge.task": task.name})
        self.parent_run_id = run.info.run_id
        params = _flatten("", {k: v for k, v in settings.items() if k != "latency"}, {})
        params.update(_flatten("latency", settings["latency"], {}))
        self._log(self.parent_run_id, params=params,
                  metrics=measurement_metrics(baseline.to_dict(), "_baseline"),
                  tags={"device.platform": platform.platform(), "device.processor": platform.processor() or platform.machine(),
                        "device.torch": torch.__version__, "device.target": settings["device"]})

    @hookimpl
    def slimforge_trial_end(self, record):
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{record.number:04d}",
            tags={"mlflow.parentRunId": self.parent_run_id, "slimforge.kind": "trial"})
        run_id = run.info.run_id
        metrics = measurement_metrics(record.measurements and record.measurements.to_dict())
        metrics.update(duration_s=record.duration_s, training_seconds=record.training_seconds)
        metrics.update({f"violation_{k}": v for k, v in record.violations.items()})
        tags = {"state": record.state, "feasible": record.feasible, "plan": record.plan_text[:5000],
                "trial": record.number}
        optional = {"failure_reason": record.failure_reason, "stopped_early": record.stopped_early,
                    "notes": "\n".join(record.notes)}
        tags.update({k: v[:5000] for k, v in optional.items() if v})
        # Per-epoch recovery curves go out as stepped metrics in the same single batch call.
        steps = [("train_loss", e, v) for e, v in enumerate(record.epoch_losses)]
        steps += [("val_score", e, v) for e, v in enumerate(record.epoch_scores)]
        self._log(run_id, params=plan_params(record.plan), metrics=metrics, tags=tags, steps=steps)
        self.client.set_terminated(run_id, "FINISHED" if record.state != "failed" else "FAILED")
        return {"mlflow_run_id": run_id}

    @hookimpl
    def slimforge_search_end(self, result):
        links = {}
        for member in result.pareto:
            links[member.number] = self._register(member, result)
        counts = result.counts()
        self._log(self.parent_run_id, metrics={f"trials_{k}": v for k, v in counts.items()},
                  tags={"pareto_trials": ",".join(str(m.number) for m in result.pareto)})
        out_dir = Path(result.settings["out_dir"])
        for name in ("summary.json", "trials.csv", "pareto.png"):
            if (out_dir / name).exists():
                self.client.log_artifact(self.parent_run_id, str(out_dir / name))
        self.client.set_terminated(self.parent_run_id, "FINISHED")
        result.links["mlflow_parent_run_id"] = self.parent_run_id
        return links

    def _register(self, member, result) -> dict:
        import numpy as np
        from mlflow.models import infer_signature

        # A resumed search finds the Pareto members of its earlier runs again: keep their versions
        # rather than registering the same artifact twice.
        for existing in self.client.search_model_versions(
                f"name='{self.registered_model}' and run_id='{member.links['mlflow_run_id']}'"):
            return {"registered_model": self.registered_model, "model_version": int(existing.version),
                    "model_uri": f"models:/{self.registered_model}/{existing.version}"}

        example = self._task.example_inputs(2)[0].numpy().astype(np.float32)
        import torch
        from slimforge.core.compressed import load_model
        from slimforge.core.manager import Plugins

        loaded = load_model(member.artifact_path, Plugins().registry)
        with torch.inference_mode():
            output = loaded.model(torch.from_numpy(example)).float().numpy()
        run_id = member.links["mlflow_run_id"]
        with mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PREDICT_HINT_WARNING)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE),
                artifacts={"slimforge_artifact": member.artifact_path},
                signature=infer_signature(example, output), input_example=example,
                pip_requirements=["slimforge", "torch", "numpy", "mlflow"],
            )
            mlflow.log_metrics(measurement_metrics(member.test_measurements.to_dict(), "_test"))
        version = mlflow.register_model(info.model_uri, self.registered_model,
                                        tags=self._version_tags(member, result))
        return {"registered_model": self.registered_model, "model_version": int(version.version),
                "model_uri": f"models:/{self.registered_model}/{version.version}"}

    @staticmethod
    def _version_tags(member, result) -> dict[str, str]:
        val, test = member.measurements, member.test_measurements
        return {
            "trial": str(member.number), "study": result.study_name, "plan": member.plan_text[:5000],
            "plan_json": json.dumps(member.plan)[:5000], "size_bytes": str(val.size_bytes),
            "latency_ms": f"{val.latency_ms:.6f}", "accuracy_val": f"{val.accuracy:.6f}",
            "accuracy_test": f"{test.accuracy:.6f}", "feasible": str(member.feasible),
            "budgets": json.dumps(result.budgets), "teacher": result.task,
            "flavor": "pyfunc (slimforge artifact)", "run_id": member.links.get("mlflow_run_id", ""),
        }
