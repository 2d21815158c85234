"""Unstructured first-order Taylor pruning: zero the weights with the smallest mean_b |w * dL_b/dw|.

|w * g| estimates how much the task loss changes when w is removed (Molchanov et al., CVPR 2019),
so a small weight on a steep direction of the loss is kept where magnitude pruning would drop it.
The score is taken per mini-batch and averaged over ``batches`` seeded training batches
(``plugins.pruning.importance`` says why per batch).  Config,
per-site density search space, masks and notes are those of magnitude_pruning (every weight site kind,
position embeddings dense by default); the planner's per-family
choice between the three unstructured techniques therefore searches the pruning criterion.
Gradients are of the task loss (per token for a sequence model) with respect to each stored
weight, so a packed attention in_proj_weight, RNN weights and a tied embedding are scored like a
Linear weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimforge.core.hookspecs import hookimpl
from slimforge.plugins.pruning.importance import GradientScoredConfig, UnstructuredPruning


@dataclass(frozen=True, kw_only=True)
class GradientPruningConfig(GradientScoredConfig):
    technique = "gradient_pruning"


class GradientPruning(UnstructuredPruning):
    name = "gradient_pruning"
    Config = GradientPruningConfig
    criterion = "taylor"
    requires = frozenset({"training_data"})  # the gradients are of the task loss on training batches
    description = "Unstructured first-order Taylor mean|w*grad| pruning of every weight site, per-site sparsity searched; masks kept."


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(GradientPruning)
