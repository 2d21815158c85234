"""Wanda: one-shot pruning by |weight| x input-feature norm, no weight update.

Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models".
The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``, the norm of input feature ``j`` over the
calibration tokens (``plugins.oneshot.calibration``, gathered block by block: each layer is scored
on the inputs the already-pruned layers give it).  Unstructured: each output row keeps its highest
scores (the paper's per-output comparison group); N:M: the ``n`` highest of every ``m`` consecutive
inputs.  Needs only the input norms (the Hessian's diagonal), not the full Hessian.  What it acts
on and notes: ``plugins.oneshot.pruning``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimforge.core.hookspecs import hookimpl
from slimforge.plugins.oneshot.pruning import OneShotPruning, OneShotPruningConfig
from slimforge.plugins.sparsity.nm_sparsity import nm_mask


@dataclass(frozen=True, kw_only=True)
class WandaConfig(OneShotPruningConfig):
    technique = "wanda"


def wanda_keep(matrix: torch.Tensor, square_norm: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None) -> torch.Tensor:
    """Keep mask of an ``out x in`` matrix given the inputs' per-feature sums of squares."""
    scores = matrix.detach().abs().float() * square_norm.sqrt()[None, :]
    if n_m:
        return nm_mask(scores, *n_m)
    pruned_per_row = int(matrix.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned_per_row:
        lowest = torch.argsort(scores, dim=1, stable=True)[:, :pruned_per_row]
        keep.scatter_(1, lowest, False)
    return keep


class Wanda(OneShotPruning):
    name = "wanda"
    Config = WandaConfig
    full_hessian = False
    description = ("Wanda one-shot pruning (|w| x input norm from calibration data, no update), unstructured "
                   "per row or N:M; layer by layer; no fine-tuning.")

    def prune(self, matrix, stats, sparsity, n_m, config):
        keep = wanda_keep(matrix, stats.square_norm, sparsity, n_m)
        return matrix.detach(), keep


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Wanda)
