"""Save a compressed model as an artifact, and load it back into a runnable module.

The artifact holds every tensor of the compressed model (``core.artifact`` codec) and a header that
says how to rebuild the module around them: the task's architecture factory and the plan.  Loading
calls the factory, lets each technique of the plan restore the *structure* it leaves
(``Technique.restore_structure``), then loads the tensors, so the loaded module computes bitwise
the same outputs as the one that was saved, and nothing is unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.core import trust
from slimforge.core.artifact import read_artifact, write_artifact
from slimforge.core.errors import ArtifactError, SlimforgeError
from slimforge.core.plan import Plan
from slimforge.core.task import FactoryRef, Task
from slimforge.core.technique import TechniqueRegistry


# Whitelist: dtype names in a file are never resolved with getattr on arbitrary strings.
INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


@dataclass
class LoadedArtifact:
    model: nn.Module
    plan: Plan
    meta: dict[str, Any]


def save_model(model: nn.Module, path: str | Path, *, task: Task, plan: Plan,
               structure: list[dict[str, Any]] | None = None, extra: dict | None = None) -> int:
    """Write ``model`` to ``path`` atomically; return the file's size in bytes.

    ``structure`` holds, per plan step, what that step's ``ctx.structure`` recorded."""
    structure = structure if structure is not None else [{} for _ in plan.steps]
    if len(structure) != len(plan.steps):
        raise ValueError(f"structure has {len(structure)} entries for {len(plan.steps)} plan steps")
    example = task.example_inputs()[0]
    meta = {
        "kind": "compressed-model",
        "task": task.source,
        "task_name": task.name,
        "architecture": task.architecture.to_dict(),
        "plan": plan.to_dict(),
        "structure": structure,
        "example_input": {"shape": list(example.shape), "dtype": str(example.dtype).removeprefix("torch.")},
        **(extra or {}),
    }
    size = write_artifact(path, model.state_dict(), meta)
    # Whoever saves a model with this task trusts its factories: loading it back may call them.
    trust.remember(meta["architecture"], meta["task"])
    return size


MAX_EXAMPLE_ELEMENTS = 1 << 26  # a header's example input is a shape: never allocate gigabytes for it


def _example_inputs(meta: dict, path) -> tuple[torch.Tensor]:
    spec = meta.get("example_input")
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or math.prod(shape) > MAX_EXAMPLE_ELEMENTS):
        raise ArtifactError(f"artifact is corrupted: {path} has a malformed example_input entry")
    return (torch.zeros(shape, dtype=INPUT_DTYPES.get(spec.get("dtype"), torch.float32)),)


def load_model(path: str | Path, registry: TechniqueRegistry, *, task: Task | None = None,
               trusted: bool = False) -> LoadedArtifact:
    """Rebuild the model saved at ``path``.

    The architecture comes from ``task`` when the caller gives one (its factories are the caller's
    own); otherwise from the header, whose factory is only called if ``core.trust`` allows it, or
    ``trusted`` says the caller vouches for the file (e.g. an MLflow model, which is code anyway)."""
    meta, tensors = read_artifact(path)
    if meta.get("kind") != "compressed-model":
        raise ArtifactError(f"{path}: holds a {meta.get('kind', 'unknown')!r}, not a compressed model")
    try:
        plan = Plan.from_dict(meta.get("plan", {}))
    except (SlimforgeError, AttributeError, ValueError) as exc:
        raise ArtifactError(f"artifact is corrupted: {path} has a malformed plan ({exc})") from None
    if task is not None:
        architecture = task.architecture
    else:
        if not trusted:
            trust.check(meta, str(path))
        architecture = FactoryRef.from_dict(trust.header_refs(meta, str(path))[0])
    model = architecture.call("artifact architecture")
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"{path}: architecture factory returned {type(model).__name__}, not an nn.Module")
    example_inputs = _example_inputs(meta, path)
    model.eval()
    structure = meta.get("structure") or [{} for _ in plan.steps]
    if not isinstance(structure, list) or len(structure) != len(plan.steps):
        raise ArtifactError(f"artifact is corrupted: {path} does not record one structure entry per plan step")
    for step, recorded in zip(plan.steps, structure, strict=True):
        technique = registry.get(step.technique)
        try:
            model = technique.restore_structure(model, technique.config_from_dict(step.config), example_inputs, recorded)
        except SlimforgeError:
            raise
        except Exception as exc:  # a header that does not match what the technique recorded
            raise ArtifactError(f"{path}: cannot restore the structure of step {step.technique!r} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: tensors do not fit the rebuilt model ({str(exc).splitlines()[0]})") from None
    return LoadedArtifact(model=model.eval(), plan=plan, meta=meta)
