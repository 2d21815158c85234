"""Which factories an artifact may make slimforge call.

An artifact holds no pickle: tensors are decoded by a whitelisting codec (``core.artifact``).  But
its header names *code*: the ``module:function`` that rebuilds the architecture, and for a user
task the factories that build its data and metric.  Rebuilding means importing and calling them
with keyword arguments from the header, which is code execution by design (``subprocess:getoutput``
with ``cmd=...`` would be obeyed).  So a header's factories are only called when one of these holds:

- they are a built-in task's (``BUILTIN_ARCHITECTURES``, built-in task names): slimforge's own code;
- the caller supplies the task (the search that wrote the artifact; ``slimforge evaluate --config``):
  then the caller's factories are used, never the header's;
- this user account trusts exactly this header's task: slimforge recorded it when it saved an
  artifact with that task (``remember``, called by ``save_model``), or the user said so
  (``slimforge evaluate --trust``).  The record is a hash of the architecture reference *and* the
  whole task source (factories, their keyword arguments, the folders they import from), so a
  crafted file cannot borrow a trusted factory name while pointing it at other code or folders.

Loading a registered model through MLflow (``mlflow.pyfunc.load_model``) runs that model's Python
code anyway, so the pyfunc wrapper passes ``trusted=True``: trusting an MLflow model is trusting
its code.

Not covered: trust records live in the slimforge cache folder, so anyone who can write there can
add one (they could equally replace cached teachers or installed packages); built-in tasks take
their keyword arguments (data folder, download flag) from the header; a header can declare large
all-zero tensors that cost memory to materialise.  Anything else in a header is data: dtypes, codecs,
layouts and technique names are looked up in fixed tables, never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from slimforge.core.errors import ArtifactError
from slimforge.core.task import BUILTIN_TASKS as TASK_TABLE

# Architecture factories of the built-in tasks (the only ones a built-in task source may name).
BUILTIN_ARCHITECTURES = frozenset({
    "slimforge.core.embedded:lenet5",
    "slimforge.core.embedded:lenet300",
    "slimforge.core.presets:preset_model",
    "slimforge.core.text_task:char_gpt",
})
# The names core.task.BUILTIN_TASKS builds, plus "torchvision" (presets record their own source).
BUILTIN_TASKS = frozenset({*TASK_TABLE, "torchvision"})
STORE_NAME = "trusted-tasks"
_CONFIG_FACTORIES = ("model", "architecture", "data", "metric")
_remembered: set[str] = set()


class UntrustedArtifactError(ArtifactError):
    """An artifact's header names factories slimforge will not call without the user's say-so."""


def store_path() -> Path:
    return Path(os.environ.get("SLIMFORGE_CACHE_DIR", Path.home() / ".cache" / "slimforge")) / STORE_NAME


def fingerprint(architecture: dict[str, Any], task_source: dict[str, Any]) -> str:
    text = json.dumps({"architecture": architecture, "task": task_source}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def factory_targets(architecture: dict[str, Any], task_source: dict[str, Any]) -> list[str]:
    """Every ``module:function`` a header would have slimforge import and call."""
    targets = [str(architecture.get("target"))]
    config = task_source.get("config")
    if isinstance(config, dict):
        targets += [config[key] for key in _CONFIG_FACTORIES if isinstance(config.get(key), str)]
    return list(dict.fromkeys(targets))


def _is_builtin(architecture: dict[str, Any], task_source: dict[str, Any]) -> bool:
    return (architecture.get("target") in BUILTIN_ARCHITECTURES and set(task_source) <= {"builtin", "kwargs"}
            and task_source.get("builtin") in BUILTIN_TASKS)


def _stored() -> set[str]:
    try:
        return set(store_path().read_text().split())
    except OSError:
        return set()


def remember(architecture: dict[str, Any], task_source: dict[str, Any]) -> None:
    """Trust this task from now on, for this user account (in this process even when the cache
    folder is read-only)."""
    if _is_builtin(architecture, task_source):
        return
    key = fingerprint(architecture, task_source)
    if key in _remembered:
        return
    _remembered.add(key)
    if key in _stored():
        return
    try:
        path = store_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        # One short O_APPEND write: concurrent processes (workers) never interleave lines.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (key + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def header_refs(meta: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header's architecture reference and task source, checked for shape."""
    architecture, task_source = meta.get("architecture"), meta.get("task", {})
    if (not isinstance(architecture, dict) or not isinstance(architecture.get("target"), str)
            or not isinstance(architecture.get("kwargs", {}), dict) or not isinstance(task_source, dict)):
        raise ArtifactError(f"artifact is corrupted: {source} has a malformed architecture or task entry")
    return architecture, task_source


def is_trusted(meta: dict[str, Any], source: str = "<artifact>") -> bool:
    architecture, task_source = header_refs(meta, source)
    if _is_builtin(architecture, task_source):
        return True
    key = fingerprint(architecture, task_source)
    return key in _remembered or key in _stored()


def check(meta: dict[str, Any], source: str) -> None:
    """Raise ``UntrustedArtifactError`` unless the header's factories may be called."""
    if is_trusted(meta, source):
        return
    architecture, task_source = header_refs(meta, source)
    names = ", ".join(repr(t) for t in factory_targets(architecture, task_source))
    raise UntrustedArtifactError(
        f"{source}: not loaded: its header names code this account has not trusted ({names}); pass the task "
        "with --config TASK.toml, or add --trust if you trust where the file came from")


def trust(meta: dict[str, Any], source: str) -> None:
    """The user vouches for this header (``--trust``): remember its task."""
    remember(*header_refs(meta, source))
