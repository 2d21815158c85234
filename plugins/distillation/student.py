"""Parameter distillation: a smaller student initialised from the teacher's own parameters.

Width: every Conv/Linear keeps round(C * width) of its C output channels / neurons, those with the
largest L1 norm (scored on each channel's coupled group), and the kept weights (and the matching input slices of the layers that consume
them) are copied from the teacher.  Torch-Pruning's dependency graph does the bookkeeping (which
inputs of the next layer, through pooling and flatten, belong to a removed channel), so the student
is a genuinely smaller dense network: fewer bytes *and* fewer FLOPs, measurably faster.  The
classifier's outputs are never removed.  Recovery training then fine-tunes it, with knowledge
distillation when the plan also picks it.

Depth (dropping whole blocks) needs repeated same-shape blocks; for architectures without them
(LeNet-5, plain MLPs) only width is reduced, and the trial notes say so.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import resize_layers
from slimforge.plugins.pruning.structured import StructuredPruningConfig, prune_channels

WIDTH_RANGE = (0.05, 0.75)


@dataclass(frozen=True, kw_only=True)
class ParameterDistillationConfig:
    width: float = 0.25  # fraction of channels / neurons each hidden layer keeps

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 1.0:
            raise ConfigError(f"parameter_distillation.width: must be in (0, 1], got {self.width}")


class ParameterDistillation(Technique):
    name = "parameter_distillation"
    family = Family.STUDENT
    stage = Stage.STUDENT_INIT
    Config = ParameterDistillationConfig
    needs_recovery = True
    recovery_epochs = (3, 12)  # a narrow student must relearn much of the function (benchmarks: 10 epochs)
    description = "Student of reduced width initialised from the teacher's most important channels (Torch-Pruning)."

    def suggest(self, space, task) -> ParameterDistillationConfig:
        return ParameterDistillationConfig(width=round(space.suggest_float("width", *WIDTH_RANGE, log=True), 3))

    def apply(self, model: nn.Module, config: ParameterDistillationConfig, ctx: TechniqueContext) -> nn.Module:
        # The student is built exactly as structured pruning removes channels (same rounding, same
        # dependency handling); only the intent and the search range differ.
        channels = StructuredPruningConfig(channel_sparsity=round(1.0 - config.width, 6), criterion="magnitude")
        model = prune_channels(model, channels, ctx, owner=self.name)
        ctx.note("parameter_distillation: width reduced only; this architecture has no repeated blocks to drop")
        return model

    def restore_structure(self, model, config, example_inputs, structure) -> nn.Module:
        return resize_layers(model, structure["shapes"])


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(ParameterDistillation)
