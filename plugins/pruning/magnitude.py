"""Unstructured magnitude pruning with a per-layer sparsity chosen by the search.

The smallest-|w| fraction of each Conv/Linear weight is set to zero; recovery training re-imposes
the mask after every optimizer step so the zeros survive fine-tuning.  The zeros shrink the
artifact (the codec stores sparse tensors sparsely); they do not speed up dense kernels, and the
latency we report says so by not moving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import apply_masks, keep_top, reapply_masks, weight_layers

# The search samples each layer's *density* (fraction kept) log-uniformly: compression lives at
# high sparsity, and a uniform sparsity prior would spend most trials on sizes no budget accepts.
DENSITY_RANGE = (0.02, 1.0)


@dataclass(frozen=True, kw_only=True)
class MagnitudePruningConfig:
    sparsity: dict[str, float] = field(default_factory=dict)  # layer name -> fraction of zeros
    default_sparsity: float = 0.0  # for layers not named in ``sparsity``

    def __post_init__(self) -> None:
        for layer, value in {**self.sparsity, "default_sparsity": self.default_sparsity}.items():
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"magnitude_pruning.sparsity[{layer!r}]: must be in [0, 1), got {value!r}")


class MagnitudePruning(Technique):
    name = "magnitude_pruning"
    family = Family.PRUNING
    stage = Stage.PRUNING
    Config = MagnitudePruningConfig
    needs_recovery = True
    description = "Unstructured |w| pruning, per-layer sparsity searched; masks kept during fine-tuning."

    def suggest(self, space, task) -> MagnitudePruningConfig:
        sparsity = {name: round(1.0 - space.suggest_float(f"density.{name}", *DENSITY_RANGE, log=True), 3)
                    for name in weight_layers(task.teacher)}
        return MagnitudePruningConfig(sparsity=sparsity)

    def apply(self, model: nn.Module, config: MagnitudePruningConfig, ctx: TechniqueContext) -> nn.Module:
        layers = weight_layers(model)
        for name in set(config.sparsity) - set(layers):
            ctx.note(f"magnitude_pruning: layer {name!r} not found in the model; ignored")
        masks = {name: keep_top(layer.weight.detach().abs(), config.sparsity.get(name, config.default_sparsity))
                 for name, layer in layers.items() if config.sparsity.get(name, config.default_sparsity) > 0}
        apply_masks(model, masks, ctx)
        return model

    def after_optimizer_step(self, model: nn.Module, config, ctx: TechniqueContext) -> None:
        reapply_masks(model, ctx)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(MagnitudePruning)
