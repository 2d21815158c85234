"""Parameter distillation: a smaller student initialised from the teacher's own parameters.

Width: the student is built exactly as structured pruning removes structure
(``plugins.pruning.structured.prune_channels``, magnitude criterion): every Conv/Linear keeps
round(C * width) of its C output channels / neurons, those with the largest L1 norm scored on each
channel's coupled group, and the kept weights (and the matching input slices of the layers that
consume them) are copied from the teacher.  On transformers the units are whole attention heads
(round(H * width) per layer; under grouped-query attention the key/value heads are kept and each
group keeps the same number of query heads) and FFN intermediate channels; the hidden width
(embeddings, LayerNorms, residual stream) and position embeddings are kept.  Torch-Pruning's
dependency graph does the bookkeeping (which inputs of the next layer, through pooling, flatten,
gates, belong to a removed channel), so the student is a genuinely smaller dense network: fewer
bytes *and* fewer FLOPs, measurably faster.  The classifier's outputs are never removed.

Depth (``depth``, DistilBERT-style): a model with a list of repeated transformer blocks
(``nn.TransformerEncoder.layers``, Hugging Face ``encoder.layer`` / ``h`` / ``layers``: an
``nn.ModuleList`` of same-class blocks holding attention) keeps round(N * depth) of its N blocks,
evenly spaced from the first (12 -> 6 keeps 0, 2, 4, ...), each initialised from the teacher's
block.  Kept blocks are renumbered (``layer_idx``, which Hugging Face uses for cache slots) and
``nn.TransformerEncoder.num_layers`` is updated.  Architectures without such a list (LeNet-5, plain
MLPs, RNNs) only get narrower, and the trial notes say so.

Recovery training then fine-tunes the student, with knowledge distillation when the plan also
picks it.  ``ctx.structure`` records the kept blocks and the pruned shapes / head counts;
``restore_structure`` rebuilds them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import SiteKind, weight_sites
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import replace_module
from slimforge.plugins.pruning.structured import (ATTENTION_ROLES, StructuredPruningConfig, prune_channels,
                                                  restore_pruned)

WIDTH_RANGE = (0.05, 0.75)
DEPTH_RANGE = (0.25, 1.0)  # searched in quarters, only for models with repeated blocks
DEPTH_STEP = 0.25


@dataclass(frozen=True, kw_only=True)
class ParameterDistillationConfig:
    width: float = 0.25  # fraction of channels / neurons / attention heads each hidden layer keeps
    depth: float = 1.0  # fraction of repeated transformer blocks kept (1.0: all)

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 1.0:
            raise ConfigError(f"parameter_distillation.width: must be in (0, 1], got {self.width}")
        value = self.depth
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigError(f"parameter_distillation.depth: must be in (0, 1], got {value!r}")


def block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The outermost ``nn.ModuleList``s of two or more same-class blocks that each hold attention:
    a transformer's stack of layers, by qualified name."""
    attention_modules = {s.module for s in weight_sites(model).values()
                         if s.role in ATTENTION_ROLES or s.kind == SiteKind.ATTENTION_IN_PROJ}
    found: dict[str, nn.ModuleList] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(b) for b in module}) != 1:
            continue
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        prefix = f"{name}." if name else ""
        if all(any(a.startswith(f"{prefix}{i}.") for a in attention_modules) for i in range(len(module))):
            found[name] = module
    return found


def kept_blocks(count: int, depth: float) -> list[int]:
    """round(N * depth) block indices (at least one), evenly spaced from the first."""
    kept = max(1, int(count * depth + 0.5))
    return sorted({int(i * count / kept) for i in range(kept)})


def drop_blocks(model: nn.Module, name: str, kept: list[int]) -> None:
    """Keep blocks ``kept`` (sorted) of the ModuleList ``name``, renumbered from 0."""
    blocks = model.get_submodule(name)
    smaller = nn.ModuleList([blocks[i] for i in kept])
    replace_module(model, name, smaller)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(getattr(parent, "num_layers", None), int):  # nn.TransformerEncoder / Decoder
        parent.num_layers = len(kept)
    for index, block in enumerate(smaller):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):  # Hugging Face cache slot
                module.layer_idx = index


class ParameterDistillation(Technique):
    name = "parameter_distillation"
    family = Family.STUDENT
    stage = Stage.STUDENT_INIT
    Config = ParameterDistillationConfig
    needs_recovery = True
    recovery_epochs = (3, 12)  # a narrow student must relearn much of the function (benchmarks: 10 epochs)
    description = ("Student of reduced width (channels, attention heads, FFN) and, for transformers, depth "
                   "(every k-th block), initialised from the teacher's most important parts (Torch-Pruning).")

    def suggest(self, space, task) -> ParameterDistillationConfig:
        width = round(space.suggest_float("width", *WIDTH_RANGE, log=True), 3)
        if not block_lists(task.teacher):  # nothing to drop: the space stays one-dimensional
            return ParameterDistillationConfig(width=width)
        depth = round(space.suggest_float("depth", *DEPTH_RANGE, step=DEPTH_STEP), 3)
        return ParameterDistillationConfig(width=width, depth=depth)

    def apply(self, model: nn.Module, config: ParameterDistillationConfig, ctx: TechniqueContext) -> nn.Module:
        lists = block_lists(model)
        blocks = {}
        for name, stack in lists.items():
            kept = kept_blocks(len(stack), config.depth)
            if len(kept) < len(stack):
                drop_blocks(model, name, kept)
                blocks[name] = kept
                ctx.note(f"parameter_distillation: {name!r} keeps blocks {kept} of {len(stack)} "
                         "(initialised from the teacher's)")
            else:
                ctx.note(f"parameter_distillation: {name!r} keeps all {len(stack)} blocks (depth {config.depth})")
        # The width is reduced exactly as structured pruning removes channels and heads (same
        # rounding, same dependency handling); only the intent and the search range differ.
        channels = StructuredPruningConfig(channel_sparsity=round(1.0 - config.width, 6), criterion="magnitude")
        model = prune_channels(model, channels, ctx, owner=self.name)
        if blocks:
            ctx.structure["blocks"] = blocks
        if not lists:
            ctx.note("parameter_distillation: width reduced only; this architecture has no repeated blocks to drop")
        return model

    def restore_structure(self, model, config, example_inputs, structure) -> nn.Module:
        for name, kept in structure.get("blocks", {}).items():
            drop_blocks(model, name, kept)
        return restore_pruned(model, structure)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(ParameterDistillation)
