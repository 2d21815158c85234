"""Unstructured Fisher (Optimal-Brain-Damage-style) pruning: zero the smallest w^2 * F_ii.

OBD's saliency of removing w is H_ii w^2 / 2; the diagonal empirical Fisher (mean squared
gradient of the task loss) stands in for the Hessian diagonal, so the criterion weighs a weight's
size by how sensitive the loss is to it on average, without the sign cancellation of |w * mean g|.
Gradients come from ``batches`` seeded training batches (``plugins.pruning.importance``).  Config,
per-site density search space, masks and notes are those of magnitude_pruning (every weight site kind,
position embeddings dense by default).
Gradients are of the task loss (per token for a sequence model) with respect to each stored
weight, so a packed attention in_proj_weight, RNN weights and a tied embedding are scored like a
Linear weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimforge.core.hookspecs import hookimpl
from slimforge.plugins.pruning.importance import GradientScoredConfig, UnstructuredPruning


@dataclass(frozen=True, kw_only=True)
class FisherPruningConfig(GradientScoredConfig):
    technique = "fisher_pruning"


class FisherPruning(UnstructuredPruning):
    name = "fisher_pruning"
    Config = FisherPruningConfig
    criterion = "fisher"
    requires = frozenset({"training_data"})  # the gradients are of the task loss on training batches
    description = "Unstructured Fisher/OBD w^2*E[grad^2] pruning of every weight site, per-site sparsity searched; masks kept."


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(FisherPruning)
