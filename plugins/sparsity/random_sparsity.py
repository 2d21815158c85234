"""Random unstructured sparsity: the control for importance-based pruning.

Each weight site (``plugins.common.mask_sites``: Conv/Linear, HF Conv1D, nn.MultiheadAttention's
in_proj_weight, Embedding tables with a tied input/output embedding masked once, RNN
weight_ih/hh) loses a uniformly random subset of its entries (exactly ``round(sparsity * numel)``
of them), the mask seeded by ``ctx.seed + site index`` so a trial is reproducible.  Per-site
density is searched with the same log-uniform prior and the same sites as ``magnitude_pruning``
(``density.<site.setting_key>``; position embeddings are not searched and stay dense unless a
config names them, with a note) and the zeros are stored the same way (the codec writes sparse
tensors sparsely), so at equal size any accuracy gap between the two is what choosing *which*
weights to drop is worth.  Masks are re-imposed after every recovery-training step.

Notes: each >=2-D parameter that is no weight site (a bare learned position tensor) and each site
an earlier technique re-expressed stay dense; configured names that match no site are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, TechniqueContext
from slimforge.plugins.common import (MaskedTechnique, apply_masks, keep_top, mask_sites, note_unmatched_sites,
                                      site_sparsity, suggest_site_sparsity)


@dataclass(frozen=True, kw_only=True)
class RandomSparsityConfig:
    sparsity: dict[str, float] = field(default_factory=dict)  # site setting_key -> fraction of zeros
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
    description = "Random unstructured masks (seeded) on every weight site, per-site sparsity searched: baseline for magnitude pruning."

    def suggest(self, space, task) -> RandomSparsityConfig:
        return RandomSparsityConfig(sparsity=suggest_site_sparsity(space, task))

    def apply(self, model: nn.Module, config: RandomSparsityConfig, ctx: TechniqueContext) -> nn.Module:
        note_unmatched_sites(model, config.sparsity, ctx, self.name)
        masks = {}
        for index, (name, site) in enumerate(mask_sites(model, ctx, self.name).items()):
            sparsity = site_sparsity(site, config, ctx, self.name)
            if sparsity > 0:
                weight = site.tensor(model)
                masks[name] = random_mask(weight.shape, sparsity, ctx.seed + index).to(weight.device)
        apply_masks(model, masks, ctx)
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(RandomSparsity)
