"""Save a compressed model as an artifact, and load it back into a runnable module.

The artifact holds every tensor of the compressed model (``core.artifact`` codec) and a header that
says how to rebuild the module around them: the task's architecture factory and the plan.  Loading
calls the factory, lets each technique of the plan restore the *structure* it leaves
(``Technique.restore_structure``), then loads the tensors, so the loaded module computes bitwise
the same outputs as the one that was saved, and nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.core.artifact import read_artifact, write_artifact
from slimforge.core.errors import ArtifactError
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
    return write_artifact(path, model.state_dict(), meta)


def load_model(path: str | Path, registry: TechniqueRegistry) -> LoadedArtifact:
    meta, tensors = read_artifact(path)
    if meta.get("kind") != "compressed-model":
        raise ArtifactError(f"{path}: holds a {meta.get('kind', 'unknown')!r}, not a compressed model")
    plan = Plan.from_dict(meta["plan"])
    model = FactoryRef.from_dict(meta["architecture"]).call("artifact architecture")
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"{path}: architecture factory returned {type(model).__name__}, not an nn.Module")
    dtype = INPUT_DTYPES.get(meta["example_input"]["dtype"], torch.float32)
    example_inputs = (torch.zeros(meta["example_input"]["shape"], dtype=dtype),)
    model.eval()
    structure = meta.get("structure") or [{} for _ in plan.steps]
    for step, recorded in zip(plan.steps, structure, strict=True):
        technique = registry.get(step.technique)
        model = technique.restore_structure(model, technique.config_from_dict(step.config), example_inputs, recorded)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: tensors do not fit the rebuilt model ({str(exc).splitlines()[0]})") from None
    return LoadedArtifact(model=model.eval(), plan=plan, meta=meta)
