"""Unstructured first-order Taylor pruning: zero the weights with the smallest mean_b |w * dL_b/dw|.

|w * g| estimates how much the task loss changes when w is removed (Molchanov et al., CVPR 2019),
so a small weight on a steep direction of the loss is kept where magnitude pruning would drop it.
The score is taken per mini-batch and averaged over ``batches`` seeded training batches
(``plugins.pruning.importance`` says why per batch).  Config,
per-layer density search space and masks are those of magnitude_pruning; the planner's per-family
choice between the three unstructured techniques therefore searches the pruning criterion.
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
    description = "Unstructured first-order Taylor mean|w*grad| pruning, per-layer sparsity searched; masks kept."


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(GradientPruning)
