"""What the one-shot pruners (sparsegpt, wanda) share: config, search space, sites and masks.

Both score each weight site from calibration statistics (``plugins.oneshot.calibration``), site
after site in forward order, so a layer is pruned with the inputs the already-pruned layers give
it; both support unstructured sparsity (a fraction per site) and N:M patterns along the input
dimension of the site's logical ``out x in`` matrix (as ``nm_sparsity``).  The zeros are written
into the float weights, which the artifact codec stores sparsely; the masks go to
``ctx.state["masks"]`` (``plugins.common.apply_masks``) so that a later step that fine-tunes
keeps them.  Neither declares ``needs_recovery``: they are one-shot.

Sites: every maskable weight site (``plugins.common.mask_sites``: Linear, Conv, HF Conv1D,
nn.MultiheadAttention's in_proj_weight and out_proj, Embedding, RNN).  Position embeddings stay
dense unless a config names them (as for magnitude_pruning), with a note.  A site calibration
cannot feed (an Embedding lookup, RNN weights) is pruned by magnitude on the same pattern, with a
note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.sites import WeightSite
from slimforge.core.technique import Family, Stage, TechniqueContext
from slimforge.plugins.common import (MaskedTechnique, apply_masks, keep_top, mask_sites, note_unmatched_sites,
                                      site_label, site_mask, site_setting, suggest_site_sparsity)
from slimforge.plugins.oneshot.calibration import InputStatistics, calibration_inputs, compress_sequentially
from slimforge.plugins.sparsity.nm_sparsity import nm_mask

UNSTRUCTURED = "unstructured"
PATTERNS = (UNSTRUCTURED, "2:4", "4:8")  # searched; any n:m with n < m can be configured


@dataclass(frozen=True, kw_only=True)
class OneShotPruningConfig:
    technique: ClassVar[str] = "one-shot pruning"  # names the fields in error messages
    pattern: str = UNSTRUCTURED  # or "n:m": n kept of every m consecutive inputs
    # Site setting_key -> fraction of zeros (N:M: any nonzero value means "apply the pattern").
    sparsity: dict[str, float] = field(default_factory=dict)
    default_sparsity: float = 0.5  # for sites not named in ``sparsity``
    calibration_samples: int = 128
    calibration_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.pattern != UNSTRUCTURED:
            try:
                n, m = (int(part) for part in self.pattern.split(":"))
            except ValueError:
                n = m = 0
            if not 1 <= n < m:
                raise ConfigError(f"{self.technique}.pattern: must be {UNSTRUCTURED!r} or 'n:m' with 1 <= n < m "
                                  f"(searched: {', '.join(PATTERNS)}), got {self.pattern!r}")
        for key, value in {**self.sparsity, "default_sparsity": self.default_sparsity}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{self.technique}.sparsity[{key!r}]: must be in [0, 1), got {value!r}")
        for count in ("calibration_samples", "calibration_batch_size"):
            value = getattr(self, count)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.technique}.{count}: must be an int >= 1, got {value!r}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(n, m)`` of an N:M pattern, None when unstructured."""
        if self.pattern == UNSTRUCTURED:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


def magnitude_keep(matrix: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """The fallback where calibration cannot feed a site: keep the largest |w| (over the whole
    site, as magnitude_pruning, or per N:M group, as nm_sparsity)."""
    scores = matrix.detach().abs()
    return nm_mask(scores, *n_m) if n_m else keep_top(scores, sparsity)


class OneShotPruning(MaskedTechnique):
    """Base of sparsegpt and wanda: subclasses set ``name``, ``Config``, ``description``,
    ``full_hessian`` and implement ``prune``."""

    family = Family.PRUNING
    stage = Stage.PRUNING
    needs_recovery = False  # one-shot; the masks still hold if a later step fine-tunes
    requires = frozenset({"calibration_data"})
    full_hessian: ClassVar[bool] = True  # False: only the input norms (the Hessian's diagonal)

    def prune(self, matrix: torch.Tensor, stats: InputStatistics, sparsity: float, n_m: tuple[int, int] | None,
              config) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new matrix, keep mask)`` for one site's logical ``out x in`` matrix."""
        raise NotImplementedError

    def suggest(self, space, task):
        pattern = space.suggest_categorical("pattern", list(PATTERNS))
        if pattern != UNSTRUCTURED:
            return self.Config(pattern=pattern)
        return self.Config(sparsity=suggest_site_sparsity(space, task), default_sparsity=0.0)

    def site_sparsity(self, site: WeightSite, config, ctx: TechniqueContext) -> float:
        """The fraction of zeros ``config`` asks of ``site``: its ``sparsity`` setting (or
        ``default_sparsity``); with an N:M pattern, the pattern's on every site whose setting is
        nonzero (so a sparsity of 0 keeps a site dense in both modes)."""
        configured = site_setting(site, config.sparsity)
        if site.role == "position_embedding" and configured is None:
            ctx.note(f"{self.name}: position embedding {site_label(site)} left dense: not searched (a small table "
                     "every token reads); name it in sparsity to prune it")
            return 0.0
        value = config.default_sparsity if configured is None else configured
        return 1.0 - config.n_m[0] / config.n_m[1] if config.n_m and value > 0 else value

    def apply(self, model: nn.Module, config, ctx: TechniqueContext) -> nn.Module:
        model.eval()
        note_unmatched_sites(model, config.sparsity, ctx, self.name)
        sites = {name: site for name, site in mask_sites(model, ctx, self.name).items()
                 if self.site_sparsity(site, config, ctx) > 0}
        if not sites:
            return model
        inputs = calibration_inputs(ctx.task, config.calibration_samples, config.calibration_batch_size,
                                    ctx.seed, next(model.parameters()).device)
        masks = {}

        def prune_site(site: WeightSite, stats, why: str) -> None:
            sparsity, matrix = self.site_sparsity(site, config, ctx), site.matrix(model)
            if stats is None:
                ctx.note(f"{self.name}: {site_label(site)}: {why}; pruned by magnitude on the same pattern")
                keep = magnitude_keep(matrix, sparsity, config.n_m)
                pruned = matrix.detach().masked_fill(~keep, 0.0)
            else:
                pruned, keep = self.prune(matrix, stats, sparsity, config.n_m, config)
            site.set_matrix(model, pruned.masked_fill(~keep, 0.0))
            masks[site.name] = site_mask(site, keep)

        compress_sequentially(model, sites, inputs, prune_site, full_hessian=self.full_hessian)
        apply_masks(model, masks, ctx)
        return model
