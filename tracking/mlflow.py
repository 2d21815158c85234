"""MLflow tracker: a plugin listening to the search lifecycle hooks.

Search = parent run, trial = nested run (params: the plan; metrics: measurements; tags: state,
failure reason).  Everything per trial goes out in one ``log_batch`` call so logging stays small
next to trial time.  Only Pareto members at or above the registration floor (``not_registered`` is
None; see ``search.pareto.registration_floor``) get a model logged (pyfunc wrapping the artifact)
and registered as a version of one registered model, tagged with trial, plan and measurements.

Every MLflow write is an *operation* (a plain dict: search_start, trial, register, search_end)
executed by ``MlflowWriter``.  When one cannot be completed (server down, network cut, a timeout)
the search does not stop: the operation and every later one are kept in order in the offline
journal ``OUT/mlflow-pending.jsonl`` (see ``journal.py``), retried after each later trial and at
the end of the search, and whatever is still pending is replayed by ``slimforge sync``.  Replays
are idempotent: a trial run is tagged with its study (``slimforge.study_id``: name + Optuna
storage) and trial number, the parent run with its search (``slimforge.search_id``), and both are
looked up before being created; a Pareto member already registered from its trial run is not
registered again.

The time spent in ``slimforge_trial_end`` is measured per trial; its mean and max go on the parent
run (``mlflow_logging_trial_mean_s`` / ``_max_s``), into ``summary.json`` and onto stderr.

Conventions a user of the MLflow UI expects: a trial's params are named by technique and knob
(``magnitude_pruning.sparsity.fc1``, ``recovery.epochs``; ``plan.techniques`` lists them in
order), so one knob is one column whatever the plan; the experiment is marked as classic model
development (``mlflow.experimentKind``), not GenAI; runs carry ``mlflow.source.*`` (with the git
commit of the working directory) and the slimforge and torch versions; Pareto members are tagged
on their trial runs.  What MLflow itself prints while the tracker talks to it goes to
``OUT/mlflow.log``, not the search's terminal.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import time
import uuid
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

from slimforge.core.errors import MissingDependencyError, SlimforgeError
from slimforge.core.files import write_json_atomic
from slimforge.core.hookspecs import hookimpl
from slimforge.search.reports import search_summary
from slimforge.tracking.journal import journal_path, read_journal, write_journal

try:
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
except ImportError as exc:  # pragma: no cover
    raise MissingDependencyError("mlflow", "MLflow tracking") from exc

# MLflow chatter ("already exists" notices) would bury the search's own progress output.
logging.getLogger("mlflow").setLevel(logging.WARNING)

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
MAX_TAG_LENGTH = 5000

KIND_TAG, SEARCH_ID_TAG, STUDY_TAG, STUDY_ID_TAG = ("slimforge.kind", "slimforge.search_id", "slimforge.study",
                                                   "slimforge.study_id")
PARETO_TAG = "slimforge.pareto"  # on trial runs: "true" for the study's current Pareto members, else "false"
# MLflow 3's UI opens an experiment without this tag on its GenAI pages (traces, prompts); this
# value is the one its UI gives "custom model development" (training runs, params, metrics).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
LOG_FILE = "mlflow.log"  # in the search's output folder: what MLflow prints while the tracker uses it
# On a parent run that did not finish: the run of the search that resumed its study after a kill,
# or what stopped the search (Ctrl-C, an error).
RESUMED_BY_TAG, STOPPED_BY_TAG = "slimforge.resumed_by", "slimforge.stopped_by"

# MLflow's HTTP defaults (7 retries with exponential back-off, 120 s timeout) turn a dead server
# into minutes per call.  Unreachable is not fatal here (operations go to the journal), so fail
# fast: one immediate retry, 15 s per request.  Set only while the tracker talks to MLflow, and
# values the user exported are left alone.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 # a "View run at http://..." line on stdout after each registration would split the Pareto table
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


@contextmanager
def short_http_timeouts():
    added = {key: value for key, value in HTTP_DEFAULTS.items() if key not in os.environ}
    os.environ.update(added)
    # urllib3 logs each retry as a warning: with no logging configured (the CLI) that is a line on
    # stderr per call while the server is down; the tracker says it once instead.
    pool_logger = logging.getLogger("urllib3.connectionpool")
    level = pool_logger.level
    pool_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_logger.setLevel(level)
        for key in added:
            os.environ.pop(key, None)


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
    """``{"plan.techniques": "magnitude_pruning,int8_ptq", "magnitude_pruning.sparsity.fc1": "0.9",
    "recovery.epochs": "3", ...}``: each knob named by its technique, never by its position in the
    plan, so the same knob is the same column in every run (a plan holds a technique at most once:
    one per family)."""
    steps = plan.get("steps", [])
    params = {"plan.techniques": ",".join(step["technique"] for step in steps)}
    for step in steps:
        _flatten(step["technique"], step["config"], params)
    if "recovery" in plan:
        _flatten("recovery", plan["recovery"], params)
    if "seed" in plan:
        params["seed"] = str(plan["seed"])
    return params


def pip_requirements() -> list[str]:
    """What a logged pyfunc model needs, pinned to the versions that built and measured it: a
    model served with another torch may load, but its numbers are not the ones measured."""
    from importlib import metadata

    return [f"{name}=={metadata.version(name)}" for name in ("slimforge", "torch", "numpy", "mlflow")]


def source_tags() -> dict[str, str]:
    """``mlflow.source.*`` as MLflow's own run context writes them, with the git commit of the
    working directory (where a user's task code and config live), and the versions of slimforge
    and torch.  Git fields are left out where the directory is not a git checkout."""
    from importlib import metadata

    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils, mlflow_tags

    tags = {k: v for k, v in resolve_tags().items() if k in (mlflow_tags.MLFLOW_USER, mlflow_tags.MLFLOW_SOURCE_TYPE)}
    command = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    # The console script and `python -m slimforge` both show as the command; a user's script as its path.
    tags[mlflow_tags.MLFLOW_SOURCE_NAME] = ("slimforge " + " ".join(sys.argv[1:2])).strip() if command in (
        "slimforge", "__main__.py") else (sys.argv[0] if sys.argv and sys.argv[0] else "python")
    cwd = os.getcwd()
    git = {mlflow_tags.MLFLOW_GIT_COMMIT: git_utils.get_git_commit(cwd),
           mlflow_tags.MLFLOW_GIT_BRANCH: git_utils.get_git_branch(cwd),
           mlflow_tags.MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(cwd)}
    tags.update({k: v for k, v in git.items() if v})
    tags["slimforge.version"] = metadata.version("slimforge")
    tags["torch.version"] = metadata.version("torch")
    return tags


def measurement_metrics(measurements: dict | None, suffix: str = "", metric_name: str = "accuracy") -> dict[str, float]:
    """A run's metrics from measurements.  The task's metric goes out under its own name too
    (``next_token_accuracy``, ``macro_f1``), next to the generic ``accuracy`` key that promotion,
    the registry's tags and existing dashboards read."""
    if not measurements:
        return {}
    keys = ("accuracy", "size_bytes", "latency_ms", "latency_p90_ms")
    metrics = {f"{k}{suffix}": float(measurements[k]) for k in keys if measurements.get(k) is not None}
    if metric_name != "accuracy" and f"accuracy{suffix}" in metrics:
        metrics[f"{metric_name}{suffix}"] = metrics[f"accuracy{suffix}"]
    return metrics


def _now_ms() -> int:
    return int(time.time() * 1000)


def trial_payload(record, metric_name: str = "accuracy") -> dict:
    """What a trial's nested run holds, as JSON: params, metrics, stepped metrics, tags, status."""
    metrics = measurement_metrics(record.measurements and record.measurements.to_dict(), metric_name=metric_name)
    metrics.update(duration_s=record.duration_s, training_seconds=record.training_seconds)
    metrics.update({f"violation_{k}": v for k, v in record.violations.items()})
    tags = {"state": record.state, "feasible": str(record.feasible), "plan": record.plan_text[:MAX_TAG_LENGTH],
            "trial": str(record.number), "epochs_trained": str(len(record.epoch_losses))}
    if getattr(record, "torch_threads", None):  # `slimforge reproduce` trains with the same thread count
        tags["torch_threads"] = str(record.torch_threads)
    optional = {"failure_reason": record.failure_reason, "stopped_early": record.stopped_early,
                "notes": "\n".join(record.notes)}
    tags.update({k: v[:MAX_TAG_LENGTH] for k, v in optional.items() if v})
    # Per-epoch recovery curves go out as stepped metrics in the same single batch call.
    steps = [("train_loss", e, v) for e, v in enumerate(record.epoch_losses)]
    steps += [("val_score", e, v) for e, v in enumerate(record.epoch_scores)]
    return {"number": record.number, "params": plan_params(record.plan), "metrics": metrics, "steps": steps,
            "tags": tags, "status": "FAILED" if record.state == "failed" else "FINISHED"}


def version_tags(member, result) -> dict[str, str]:
    """Lineage tags of a registered version: trial, study, plan, measurements, budgets, teacher."""
    val, test = member.measurements, member.test_measurements
    return {
        "trial": str(member.number), "study": result.study_name, "plan": member.plan_text[:MAX_TAG_LENGTH],
        "plan_json": json.dumps(member.plan)[:MAX_TAG_LENGTH], "size_bytes": str(val.size_bytes),
        "latency_ms": f"{val.latency_ms:.6f}", "accuracy_val": f"{val.accuracy:.6f}",
        "accuracy_test": f"{test.accuracy:.6f}", "feasible": str(member.feasible),
        "budgets": json.dumps(result.budgets), "teacher": result.task,
        "flavor": "pyfunc (slimforge artifact)", "run_id": member.links.get("mlflow_run_id", ""),
    }


def study_id(study: str, storage: str | None) -> str:
    """Names a study across searches: its name within its Optuna storage (two folders may both
    hold a study called "e2e"; a resumed search is the same study)."""
    import hashlib

    return hashlib.sha256(f"{storage or ''}\n{study}".encode()).hexdigest()[:20]


# Example inputs keep their dtype: token ids (int64) are not float32 images.  Journals written
# before the dtype was recorded hold float32 arrays.
_JSON_DTYPES = ("float32", "int64")


def _array(data: dict):
    import numpy as np

    dtype = data.get("dtype", "float32")
    return np.asarray(data["data"], dtype=dtype if dtype in _JSON_DTYPES else "float32").reshape(data["shape"])


def _as_json(array) -> dict:
    return {"shape": list(array.shape), "dtype": str(array.dtype), "data": array.ravel().tolist()}


def _quoted(value: str) -> str | None:
    """A value usable inside an MLflow filter string, or None (MLflow has no quote escaping)."""
    return None if "'" in value else f"'{value}'"


class MlflowWriter:
    """Executes operations against MLflow; every one of them is safe to repeat.

    ``tracking_uri`` overrides the URI each operation was recorded with (``slimforge sync
    --tracking-uri``).  Trial runs are keyed by study and trial number (tags) and looked up
    before one is created: a replay, or a resumed search adopting a worker's trial again, reuses
    the run.  The parent run is keyed by the search (one per ``slimforge search`` invocation);
    operations that may have half-happened (``replay``: written to the journal; ``attempts``:
    failed before) look it up too, and look for a model their trial run already logged.
    """

    def __init__(self, tracking_uri: str | None = None, log_file: Path | None = None):
        """``log_file``: where what MLflow prints during an operation goes (its "Created version"
        lines, database migrations, warnings); None leaves it on stderr."""
        self.override = tracking_uri
        self.log_file = log_file
        self._clients: dict[str, MlflowClient] = {}
        self._experiments: dict[tuple[str, str], str] = {}
        self._parents: dict[tuple[str, str], str] = {}  # (uri, search_id) -> parent run id
        self._trials: dict[tuple[str, str], dict[int, tuple[str, bool]]] = {}  # (uri, study_id) -> trial runs

    def uri(self, op: dict) -> str:
        return self.override or op["tracking_uri"]

    def client(self, op: dict) -> MlflowClient:
        uri = self.uri(op)
        if uri not in self._clients:
            from slimforge.tracking.sqlite_store import prepare

            prepare(uri)  # a new sqlite store is created whole or not at all: a kill cannot half-migrate it
            self._clients[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._clients[uri]

    def experiment_id(self, op: dict) -> str:
        """The experiment's id, created if needed: marked as classic model development, and for a
        sqlite store with its artifacts next to the database file (MLflow's default is
        ``./mlruns`` in whatever directory the process runs in)."""
        key = (self.uri(op), op["experiment"])
        if key not in self._experiments:
            client = self.client(op)
            found = client.get_experiment_by_name(op["experiment"])
            if found is None:
                experiment_id = client.create_experiment(op["experiment"], artifact_location=artifact_location(key[0]),
                                                         tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            else:
                experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older slimforge; a user's own choice stays
                    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            self._experiments[key] = experiment_id
        return self._experiments[key]

    def execute(self, op: dict) -> dict:
        handler = getattr(self, f"_do_{op['op']}", None)
        if handler is None:
            raise SlimforgeError(f"unknown journal operation {op['op']!r}")
        with mlflow_output_to(self.log_file):
            return handler(op)

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _repeat(op: dict) -> bool:
        return bool(op.get("replay") or op.get("attempts"))

    def _find_run(self, op: dict, tags: dict[str, str]):
        clauses = []
        for key, value in tags.items():
            quoted = _quoted(str(value))
            if quoted is None:
                return None
            clauses.append(f"tags.`{key}` = {quoted}")
        runs = self.client(op).search_runs([self.experiment_id(op)], " and ".join(clauses), max_results=1,
                                           order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def _log(self, client, run_id: str, time_ms: int, *, params=None, metrics=None, tags=None, steps=()) -> None:
        """One ``log_batch`` call.  Timestamps come from the operation, so a replayed batch is the
        same batch (MLflow keeps one copy of an identical metric value)."""
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), time_ms, 0) for k, v in (metrics or {}).items()]
            + [Metric(k, float(v), time_ms, int(step)) for k, step, v in steps],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def _parent_run_id(self, op: dict) -> str:
        key = (self.uri(op), op["search_id"])
        if key not in self._parents:
            run = self._find_run(op, {KIND_TAG: "search", SEARCH_ID_TAG: op["search_id"]})
            if run is None:
                raise SlimforgeError(f"the parent run of search {op['study']!r} is not in MLflow yet "
                                     "(its search_start operation has to be replayed first)")
            self._parents[key] = run.info.run_id
        return self._parents[key]

    # --- operations ------------------------------------------------------------------------------
    def _do_search_start(self, op: dict) -> dict:
        client, ids = self.client(op), {KIND_TAG: "search", SEARCH_ID_TAG: op["search_id"]}
        run = self._find_run(op, ids) if self._repeat(op) else None
        if run is None:
            run = client.create_run(self.experiment_id(op), start_time=op["time_ms"], run_name=op["study"],
                                    tags={**ids, STUDY_TAG: op["study"], STUDY_ID_TAG: op["study_id"],
                                          "slimforge.task": op["task"]})
        run_id = run.info.run_id
        self._parents[(self.uri(op), op["search_id"])] = run_id
        self._log(client, run_id, op["time_ms"], params=op["params"], metrics=op["metrics"], tags=op["tags"])
        self._end_stale_parents(op, run_id)
        return {"run_id": run_id}

    def _end_stale_parents(self, op: dict, resumed_by: str) -> None:
        """End, as KILLED, the parent runs of earlier searches of this study that are still
        RUNNING: a search killed outright (SIGKILL, power loss) never ended its run, and only the
        next search of the study can.  Each is tagged with the run that resumed the study.

        The resumed search keeps a parent run of its own rather than reopening the stale one: each
        invocation logs its settings as params, a resume may change them (``--trials``, budgets),
        and MLflow refuses to change a param.  Trial runs are keyed by study and trial number, not
        by parent, so every trial still has exactly one run.  Runs are matched by study id (name +
        storage), never by name alone: another folder's study of the same name may be running."""
        client = self.client(op)
        stale = client.search_runs(
            [self.experiment_id(op)], f"tags.`{KIND_TAG}` = 'search' and tags.`{STUDY_ID_TAG}` = '{op['study_id']}' "
            "and attributes.status = 'RUNNING'", max_results=1000)
        for run in stale:
            if run.info.run_id != resumed_by:
                client.set_tag(run.info.run_id, RESUMED_BY_TAG, resumed_by)
                client.set_terminated(run.info.run_id, "KILLED", end_time=op["time_ms"])

    def _study_trials(self, op: dict) -> dict[int, tuple[str, bool]]:
        """Trial runs the study already has in MLflow, ``number -> (run id, finished)``: fetched
        with one query per study, then kept up to date here, so logging a trial costs three calls
        (create, log_batch, terminate) and still never duplicates a run."""
        key = (self.uri(op), op["study_id"])
        if key not in self._trials:
            known: dict[int, tuple[str, bool]] = {}
            token = None
            while True:
                page = self.client(op).search_runs(
                    [self.experiment_id(op)], f"tags.`{STUDY_ID_TAG}` = '{op['study_id']}' and tags.`{KIND_TAG}` = 'trial'",
                    max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
                for run in page:  # the newest run of a trial number wins
                    known[int(run.data.tags["trial"])] = (run.info.run_id, run.info.status in ("FINISHED", "FAILED"))
                token = page.token
                if not token:
                    break
            self._trials[key] = known
        return self._trials[key]

    def _do_trial(self, op: dict) -> dict:
        client, trial, known = self.client(op), op["trial"], self._study_trials(op)
        ids = {KIND_TAG: "trial", STUDY_ID_TAG: op["study_id"], "trial": str(trial["number"])}
        run_id, finished = known.get(trial["number"], (None, False))
        if run_id is None and self._repeat(op):  # it may have created its run before failing
            run = self._find_run(op, ids)
            if run is not None:
                run_id, finished = run.info.run_id, run.info.status in ("FINISHED", "FAILED")
        if not finished:
            if run_id is None:
                started_ms = op["time_ms"] - int(1000 * trial["metrics"].get("duration_s", 0.0))
                run_id = client.create_run(self.experiment_id(op), start_time=started_ms,
                                           run_name=f"trial-{trial['number']:04d}",
                                           tags={**ids, "mlflow.parentRunId": self._parent_run_id(op),
                                                 STUDY_TAG: op["study"], SEARCH_ID_TAG: op["search_id"]}).info.run_id
                known[trial["number"]] = (run_id, False)
            self._log(client, run_id, op["time_ms"], params=trial["params"], metrics=trial["metrics"],
                      tags=trial["tags"], steps=trial["steps"])
            client.set_terminated(run_id, trial["status"], end_time=op["time_ms"])
            known[trial["number"]] = (run_id, True)
        return {"run_id": run_id}

    def _trial_run_id(self, op: dict) -> str:
        """The Pareto member's trial run: as linked in its record, else found by its study and
        trial tags (a resumed search registers members of earlier runs), else created from the
        record the operation carries."""
        client, number = self.client(op), op["trial"]["number"]
        if op.get("trial_run_id"):
            try:
                client.get_run(op["trial_run_id"])
                return op["trial_run_id"]
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # unreachable: keep the operation pending
        run_id, finished = self._study_trials(op).get(number, (None, False))
        return run_id if finished else self._do_trial(op)["run_id"]

    def _version_links(self, name: str, version) -> dict:
        return {"registered_model": name, "model_version": int(version),
                "model_uri": f"models:/{name}/{version}"}

    def _do_register(self, op: dict) -> dict:
        client, name = self.client(op), op["registered_model"]
        run_id = self._trial_run_id(op)
        # A resumed search finds the Pareto members of its earlier runs again, and a replay may
        # follow a registration whose answer was lost: keep the existing version.
        for existing in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            return {"run_id": run_id, "links": {"mlflow_run_id": run_id, **self._version_links(name, existing.version)}}
        model_uri = self._logged_model_uri(op, run_id) if self._repeat(op) else None
        if model_uri is None:
            model_uri = self._log_model(op, run_id)
        uri = self.uri(op)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        version = mlflow.register_model(model_uri, name, tags={**op["version_tags"], "run_id": run_id})
        version = self._first_version_of_run(client, name, run_id, version)
        return {"run_id": run_id, "links": {"mlflow_run_id": run_id, **self._version_links(name, version.version)}}

    @staticmethod
    def _first_version_of_run(client, name: str, run_id: str, ours):
        """Two searches of one study can register the same Pareto member at once: both looked for
        its version, found none, and registered one.  No lock spans processes on different nodes,
        so the registry itself decides: the lowest version of the run stays, and whoever made a
        higher one deletes it (and the model it logged for it) and reports the lowest.  Every
        interleaving leaves exactly one version, since nobody deletes the lowest."""
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        first = min(versions, key=lambda v: int(v.version), default=ours)
        if int(first.version) >= int(ours.version):
            return ours
        client.delete_model_version(name, ours.version)
        if getattr(ours, "model_id", None) and ours.model_id != getattr(first, "model_id", None):
            client.delete_logged_model(ours.model_id)
        return first

    def _logged_model_uri(self, op: dict, run_id: str) -> str | None:
        """A model this trial run already logged completely (a registration interrupted after it)."""
        from mlflow.entities import LoggedModelStatus

        client = self.client(op)
        experiment_id = client.get_run(run_id).info.experiment_id
        for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
            if model.name == "model" and model.status == LoggedModelStatus.READY:
                return model.model_uri
        return None

    def _log_model(self, op: dict, run_id: str) -> str:
        from mlflow.models import infer_signature

        if not Path(op["artifact_path"]).exists():
            raise SlimforgeError(f"artifact {op['artifact_path']} is gone; trial {op['trial']['number']} of study "
                                 f"{op['study']!r} cannot be registered")
        example, output = _array(op["example_input"]), _array(op["example_output"])
        uri = self.uri(op)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        # Not ``with start_run(...)``: its exit would mark the trial run FAILED on any error.
        mlflow.start_run(run_id=run_id, nested=True)
        try:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"slimforge_artifact": op["artifact_path"]},
                signature=infer_signature(example, output), input_example=example,
                pip_requirements=pip_requirements(),
            )
        finally:
            mlflow.end_run()
        self._log(self.client(op), run_id, op["time_ms"], metrics=op["test_metrics"])
        return info.model_uri

    def _do_search_end(self, op: dict) -> dict:
        client, parent = self.client(op), self._parent_run_id(op)
        self._log(client, parent, op["time_ms"], metrics=op["metrics"], tags=op["tags"])
        if "pareto" in op:  # journals written before Pareto members were tagged have no such field
            self._tag_pareto(op)
        for path in op["artifacts"]:
            if Path(path).exists():  # re-uploading the same name replaces it: safe to repeat
                client.log_artifact(parent, path)
        # FINISHED; KILLED or FAILED for a search that stopped early (``slimforge_search_stopped``)
        client.set_terminated(parent, op.get("status", "FINISHED"), end_time=op["time_ms"])
        return {"run_id": parent}


    def _tag_pareto(self, op: dict) -> None:
        """Tag the study's Pareto members on their trial runs (``PARETO_TAG`` "true", whether and
        why not registered) and log the test metrics of those not registered (a registered
        member's are logged with its model); a run tagged "true" by an earlier search of the study
        whose trial is no longer on the front becomes "false".  Setting a tag twice is harmless."""
        client, known = self.client(op), self._study_trials(op)
        members = {}
        for member in op["pareto"]:
            run_id = known.get(member["number"], (None, False))[0]
            if run_id is not None:
                members[run_id] = member
                self._log(client, run_id, op["time_ms"], metrics=member["test_metrics"],
                          tags={PARETO_TAG: "true", "registration": member["registration"]})
        earlier = client.search_runs([self.experiment_id(op)], f"tags.`{STUDY_ID_TAG}` = '{op['study_id']}' and "
                                     f"tags.`{KIND_TAG}` = 'trial' and tags.`{PARETO_TAG}` = 'true'", max_results=5000)
        for run in earlier:
            if run.info.run_id not in members:
                client.set_tag(run.info.run_id, PARETO_TAG, "false")


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, ``mlartifacts/`` beside the database file; None (the store's or the
    server's default) for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


@contextmanager
def mlflow_output_to(log_file: Path | None):
    """Send what MLflow prints to ``log_file`` while the block runs.  MLflow writes its log
    records and its ``eprint`` notices ("Created version '3' of model ...") to whatever
    ``sys.stderr`` is at the time, so the block's stderr is the file; the progress bar keeps the
    stream it was given.  Its own loggers go up to INFO there: the file is where to look."""
    if log_file is None:
        yield
        return
    logger = logging.getLogger("mlflow")
    level = logger.level
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as handle, redirect_stderr(handle):
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.setLevel(level)


def _short_error(exc: BaseException) -> str:
    """One line: MLflow's HTTP errors are a URL and a nested urllib3 repr; keep what matters."""
    text = str(exc).strip()
    url = re.search(r"API request to (\S+?)/(?:api|ajax-api)/", text)
    cause = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if cause:
        return f"cannot reach {url.group(1) if url else 'the tracking server'}: {cause.group(0)}"
    if url and "timeout" in text.lower():
        return f"no answer from {url.group(1)} within MLFLOW_HTTP_REQUEST_TIMEOUT"
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def replay(writer: MlflowWriter, ops: list[dict], *, done, failed) -> None:
    """Execute ``ops`` strictly in order (a trial run needs its parent, a registration its trial
    run), taking each off the list as it succeeds and calling ``done(op, outcome)``; stop at the
    first that fails, count the attempt on it and call ``failed(op)``.  The search's tracker and
    ``slimforge sync`` both replay through here."""
    with short_http_timeouts():
        while ops:
            op = ops[0]
            try:
                outcome = writer.execute(op)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the record, none stops the search
                op["attempts"] = op.get("attempts", 0) + 1
                op["last_error"] = _short_error(exc)
                failed(op)
                return
            ops.pop(0)
            done(op, outcome)


@hookimpl
def slimforge_search_trackers(settings, plugins):
    """The search's MLflow tracker, unless the search runs with ``tracking`` off.  This module is
    registered as a plugin by the layer above the search (``slimforge.app``)."""
    if not settings["tracking"]:
        return None
    return MlflowTracker(tracking_uri=settings["tracking_uri"], experiment=settings["experiment"],
                         registered_model=settings["registered_model"], registry=plugins.registry)


class MlflowTracker:
    def __init__(self, *, tracking_uri: str, experiment: str, registered_model: str, registry=None):
        """``registry``: the search's technique registry, which loads Pareto members to record
        their signatures (default: the built-in plugins')."""
        # Nothing here talks to MLflow: a server that is down must not stop a search from starting.
        self.tracking_uri, self.experiment, self.registered_model = tracking_uri, experiment, registered_model
        self.registry = registry
        self.search_id = uuid.uuid4().hex  # tags every run of this search: replays find them
        self.writer = MlflowWriter()
        self.pending: list[dict] = []
        self.journal: Path | None = None
        self.parent_run_id: str | None = None
        self.trial_seconds: list[float] = []  # wall time spent in slimforge_trial_end, per trial
        self._outcomes: dict[str, dict] = {}  # operation id -> what executing it returned
        self._trial_runs: dict[int, str] = {}  # trial number -> run id, for this search's trials
        self._task = None
        self._metric_name = "accuracy"  # the task's, from search_start
        self._study = self._study_id = ""
        self._warned = False
        self._source_tags: dict[str, str] = {}
        self._started_at = time.time()

    @property
    def client(self) -> MlflowClient:
        return self.writer.client({"tracking_uri": self.tracking_uri})

    def _op(self, kind: str, **payload) -> dict:
        return {"format": 1, "op": kind, "id": uuid.uuid4().hex, "search_id": self.search_id, "study": self._study,
                "study_id": self._study_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "time_ms": _now_ms(), "attempts": 0, **payload}

    def _flush(self) -> None:
        """Execute pending operations in order; stop at the first that fails and keep the rest."""
        def done(op: dict, outcome: dict) -> None:
            self._outcomes[op["id"]] = outcome
            if op["op"] in ("search_start", "search_end") and op["search_id"] == self.search_id:
                self.parent_run_id = outcome["run_id"]
            elif op["op"] in ("trial", "register") and op.get("study_id") == self._study_id:
                self._trial_runs[op["trial"]["number"]] = outcome["run_id"]
            if self.journal is not None and self.journal.exists():
                write_journal(self.journal, self.pending)  # progress survives a crash mid-replay

        replay(self.writer, self.pending, done=done, failed=self._warn)
        if self.journal is not None and self.pending:
            write_journal(self.journal, self.pending)

    def _warn(self, op: dict) -> None:
        if not self._warned:
            self._warned = True
            print(f"mlflow: could not record to {self.writer.uri(op)} ({op['last_error']}); the search goes on, "
                  f"MLflow records are kept in {self.journal} and retried after each trial", file=sys.stderr, flush=True)

    @hookimpl
    def slimforge_search_start(self, settings, task, baseline):
        import torch

        self._task, self._study = task, settings["study"]
        self._metric_name = getattr(task, "metric_name", "accuracy")
        self._study_id = study_id(settings["study"], settings.get("storage"))
        self._started_at = time.time()
        self.journal = journal_path(Path(settings["out_dir"]).resolve())
        self.writer.log_file = Path(settings["out_dir"]).resolve() / LOG_FILE
        self._source_tags = source_tags()
        self.pending = read_journal(self.journal)  # left by an earlier search in this folder
        if self.pending:
            print(f"mlflow: {len(self.pending)} operation(s) left pending by an earlier search in {self.journal}; "
                  "replaying them first", file=sys.stderr, flush=True)
        params = _flatten("", {k: v for k, v in settings.items() if k != "latency"}, {})
        params.update(_flatten("latency", settings["latency"], {}))
        tags = {"device.platform": platform.platform(), "device.processor": platform.processor() or platform.machine(),
                "device.torch": torch.__version__, "device.target": settings["device"], "metric_name": self._metric_name,
                **self._source_tags}
        self.pending.append(self._op("search_start", task=task.name, params=params, tags=tags,
                                     metrics=measurement_metrics(baseline.to_dict(), "_baseline", self._metric_name)))
        self._flush()

    @hookimpl
    def slimforge_trial_end(self, record):
        started = time.perf_counter()
        try:
            op = self._op("trial", trial=trial_payload(record, self._metric_name))
            op["trial"]["tags"].update(self._source_tags)
            self.pending.append(op)
            self._flush()
            outcome = self._outcomes.get(op["id"])
            return {"mlflow_run_id": outcome["run_id"]} if outcome else {"mlflow_pending": True}
        finally:
            self.trial_seconds.append(time.perf_counter() - started)

    @hookimpl
    def slimforge_search_end(self, result):
        import numpy as np

        import torch

        from slimforge.core.compressed import load_model

        started = time.perf_counter()
        from slimforge.core.outputs import logits_of

        example = self._task.example_inputs(2)[0]
        example = example.numpy().astype(np.int64 if not example.is_floating_point() else np.float32)
        registered = [member for member in result.pareto if member.not_registered is None]
        registrations, registry = {}, self.registry
        if registered and registry is None:  # a tracker built on its own, outside a search
            from slimforge.core.manager import Plugins

            registry = Plugins().registry
        for member in registered:
            # The model's answer to the input example goes into the signature.  Computed here, with
            # the search's own task, so a replay needs neither the task nor its factories.
            loaded = load_model(member.artifact_path, registry, task=self._task)
            with torch.inference_mode():
                output = logits_of(loaded.model(torch.from_numpy(example))).float().numpy()
            op = self._op("register", trial=trial_payload(member, self._metric_name), registered_model=self.registered_model,
                          artifact_path=str(Path(member.artifact_path).resolve()),
                          trial_run_id=member.links.get("mlflow_run_id"),
                          version_tags=version_tags(member, result),
                          test_metrics=measurement_metrics(member.test_measurements.to_dict(), "_test", self._metric_name),
                          example_input=_as_json(example), example_output=_as_json(output))
            registrations[member.number] = op["id"]
            self.pending.append(op)
        cost = self.logging_cost()
        out_dir = Path(result.settings["out_dir"]).resolve()
        counts = result.counts()
        metrics = {f"trials_{k}": v for k, v in counts.items()}
        metrics.update(mlflow_logging_trial_mean_s=cost["trial_mean_s"], mlflow_logging_trial_max_s=cost["trial_max_s"])
        hypervolume = search_summary(result.trials, result.baseline)["hypervolume"]
        if hypervolume is not None:
            metrics["hypervolume"] = hypervolume
        tags = {"pareto_trials": ",".join(str(m.number) for m in result.pareto),
                "registered_trials": ",".join(str(m.number) for m in registered)}
        if result.registration_floor:
            tags["registration_floor"] = f"{result.registration_floor['min_accuracy']:.4f} ({result.registration_floor['rule']})"
        pareto = [{"number": m.number, "registration": "registered" if m.not_registered is None
                   else f"not registered: {m.not_registered}"[:MAX_TAG_LENGTH],
                   "test_metrics": {} if m.not_registered is None or m.test_measurements is None
                   else measurement_metrics(m.test_measurements.to_dict(), "_test", self._metric_name)} for m in result.pareto]
        self.pending.append(self._op(
            "search_end", metrics=metrics, tags=tags, pareto=pareto,
            artifacts=[str(out_dir / name) for name in ("summary.json", "trials.csv", "pareto.png", "pareto.html")
                       if name != "pareto.html" or (out_dir / name).exists()]))  # the html needs plotly
        self._flush()

        links = {number: self._outcomes[op_id]["links"] for number, op_id in registrations.items()
                 if op_id in self._outcomes}
        # Runs created late (replayed from the journal, here or by `slimforge sync` before this
        # search resumed the study) are linked now.
        known = self.writer._trials.get((self.tracking_uri, self._study_id), {})
        for record in result.trials:
            run_id = self._trial_runs.get(record.number)
            if run_id is None and "mlflow_pending" in record.links and known.get(record.number, (None, False))[1]:
                run_id = known[record.number][0]
            if run_id is not None:
                record.links.pop("mlflow_pending", None)
                record.links["mlflow_run_id"] = run_id
        if self.parent_run_id:
            result.links["mlflow_parent_run_id"] = self.parent_run_id
        cost["search_end_s"] = round(time.perf_counter() - started, 4)
        result.links["mlflow_logging"] = cost
        versions = ", ".join(f"v{link['model_version']}" for link in links.values())
        below_floor = len(result.pareto) - len(registered)
        line = (f"mlflow: {cost['trials']} trial(s) logged, {cost['trial_mean_s'] * 1000:.0f} ms mean / "
                f"{cost['trial_max_s'] * 1000:.0f} ms max per trial; registered {len(links)} of "
                f"{len(result.pareto)} Pareto member(s){' (' + versions + ')' if versions else ''}"
                f"{f', {below_floor} below the registration floor' if below_floor else ''} in "
                f"{cost['search_end_s']:.1f} s")
        if self.pending:
            result.links["mlflow_pending"] = {"operations": len(self.pending), "journal": str(self.journal)}
            line += (f"\nmlflow: {len(self.pending)} operation(s) pending in {self.journal} "
                     f"({self.pending[0].get('last_error', '')}); replay them with: slimforge sync --out {out_dir}")
        print(line, file=sys.stderr, flush=True)
        return links

    @hookimpl
    def slimforge_search_stopped(self, error):
        """Ctrl-C (KILLED) or an error (FAILED) ended the search: end its parent run so.  What
        ``search_end`` had queued and not yet done (registrations, the normal end) is dropped: the
        user asked to stop, and resuming the study registers its Pareto members.  Trial records
        still pending stay, and go to the journal if MLflow cannot take them."""
        if isinstance(error, KeyboardInterrupt):
            status, reason = "KILLED", "KeyboardInterrupt (Ctrl-C)"
        else:
            status, reason = "FAILED", _short_error(error)
        self.pending = [op for op in self.pending
                        if not (op["search_id"] == self.search_id and op["op"] in ("register", "search_end"))]
        # The partial report a Ctrl-C writes (``search.reports.write_partial_reports``) goes on
        # the run too; files older than this search are another search's.
        out_dir = self.journal.parent if self.journal is not None else None
        partial = [str(out_dir / name) for name in ("summary.json", "trials.csv", "pareto.png")
                   if out_dir is not None and (out_dir / name).exists()
                   and (out_dir / name).stat().st_mtime >= self._started_at]
        self.pending.append(self._op("search_end", status=status, metrics={}, tags={STOPPED_BY_TAG: reason},
                                     artifacts=partial))
        self._flush()

    def logging_cost(self) -> dict:
        seconds = self.trial_seconds
        return {"trials": len(seconds), "trial_mean_s": round(sum(seconds) / len(seconds), 4) if seconds else 0.0,
                "trial_max_s": round(max(seconds), 4) if seconds else 0.0}


# --- slimforge sync ----------------------------------------------------------------------------

@dataclass
class SyncReport:
    journal: Path
    done: list[tuple[dict, dict]] = field(default_factory=list)  # (operation, outcome)
    pending: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op, _ in self.done:
            out[op["op"]] = out.get(op["op"], 0) + 1
        return out


def sync_pending(out_dir: str | Path, tracking_uri: str | None = None) -> SyncReport:
    """Replay ``OUT/mlflow-pending.jsonl`` in order (to ``tracking_uri`` if given, else to the URI
    each operation was recorded with); what succeeds leaves the journal at once, replay stops at
    the first failure.  ``OUT/summary.json`` gets the run ids and versions that now exist."""
    path = journal_path(Path(out_dir).resolve())
    ops = read_journal(path)
    report = SyncReport(journal=path)

    def done(op: dict, outcome: dict) -> None:
        report.done.append((op, outcome))
        write_journal(path, ops)

    writer = MlflowWriter(tracking_uri, log_file=Path(out_dir).resolve() / LOG_FILE)
    replay(writer, ops, done=done, failed=lambda op: write_journal(path, ops))
    report.pending = ops
    _update_summary(Path(out_dir) / "summary.json", report)
    return report


def _update_summary(path: Path, report: SyncReport) -> None:
    """Put the replayed runs' ids and registered versions into the search's summary.json."""
    if not path.exists() or not report.done:
        return
    summary = json.loads(path.read_text())
    trials = {t["number"]: t for t in summary.get("trials", [])}
    pareto = {t["number"]: t for t in summary.get("pareto", [])}
    changed = False
    for op, outcome in report.done:
        if op.get("study") != summary.get("study"):
            continue
        changed = True
        if op["op"] in ("search_start", "search_end"):
            summary.setdefault("links", {})["mlflow_parent_run_id"] = outcome["run_id"]
            continue
        number = op["trial"]["number"]
        links = {"mlflow_run_id": outcome["run_id"], **outcome.get("links", {})}
        for table in (trials, pareto) if op["op"] == "register" else (trials,):
            if number in table:
                table[number].setdefault("links", {}).pop("mlflow_pending", None)
                table[number]["links"].update(links)
    if not changed:
        return
    if report.pending:
        summary.setdefault("links", {})["mlflow_pending"] = {"operations": len(report.pending), "journal": str(report.journal)}
    else:
        summary.get("links", {}).pop("mlflow_pending", None)
    write_json_atomic(path, summary)
