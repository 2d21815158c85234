"""Random unstructured sparsity: the control for importance-based pruning.

Each Conv/Linear weight loses a uniformly random subset of its entries (exactly
``round(sparsity * numel)`` of them), the mask seeded by ``ctx.seed + layer index`` so a trial is
reproducible.  Per-layer density is searched with the same log-uniform prior as
``magnitude_pruning`` and the zeros are stored the same way (the codec writes sparse tensors
sparsely), so at equal size any accuracy gap between the two is what choosing *which* weights to
drop is worth.  Masks are re-imposed after every recovery-training step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, TechniqueContext
from slimforge.plugins.common import (MaskedTechnique, apply_masks, keep_top, setting_for, unmatched_settings,
                                      weight_layers)

# Same prior as magnitude_pruning, so both searches spend their trials at the same sizes.
from slimforge.plugins.pruning.magnitude import DENSITY_RANGE


@dataclass(frozen=True, kw_only=True)
class RandomSparsityConfig:
    sparsity: dict[str, float] = field(default_factory=dict)  # layer name -> fraction of zeros
    default_sparsity: float = 0.0  # for layers not named in ``sparsity``

    def __post_init__(self) -> None:
        for layer, value in {**self.sparsity, "default_sparsity": self.default_sparsity}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"random_sparsity.sparsity[{layer!r}]: must be in [0, 1), got {value!r}")


def random_mask(shape: torch.Size, sparsity: float, seed: int) -> torch.Tensor:
    """Boolean mask with exactly ``round(sparsity * numel)`` False entries at seeded random places."""
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return keep_top(scores, sparsity)


class RandomSparsity(MaskedTechnique):
    name = "random_sparsity"
    family = Family.SPARSITY
    stage = Stage.SPARSITY
    Config = RandomSparsityConfig
    needs_recovery = True
    # A random mask on top of a magnitude mask only destroys what the magnitude mask chose: the
    # pair measures nothing either baseline is for.
    cannot_follow = frozenset({"magnitude_pruning"})
    description = "Random unstructured masks (seeded), per-layer sparsity searched: baseline for magnitude pruning."

    def suggest(self, space, task) -> RandomSparsityConfig:
        sparsity = {name: round(1.0 - space.suggest_float(f"density.{name}", *DENSITY_RANGE, log=True), 3)
                    for name in weight_layers(task.teacher)}
        return RandomSparsityConfig(sparsity=sparsity)

    def apply(self, model: nn.Module, config: RandomSparsityConfig, ctx: TechniqueContext) -> nn.Module:
        layers = weight_layers(model)
        for name in unmatched_settings(config.sparsity, layers):
            ctx.note(f"random_sparsity: layer {name!r} not found in the model; ignored")
        masks = {}
        for index, (name, layer) in enumerate(layers.items()):
            sparsity = setting_for(name, config.sparsity)
            sparsity = config.default_sparsity if sparsity is None else sparsity
            if sparsity > 0:
                masks[name] = random_mask(layer.weight.shape, sparsity, ctx.seed + index).to(layer.weight.device)
        apply_masks(model, masks, ctx)
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(RandomSparsity)
