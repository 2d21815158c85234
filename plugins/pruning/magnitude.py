"""Unstructured magnitude pruning with a per-site sparsity chosen by the search.

The smallest-|w| fraction of each weight site is set to zero: Conv/Linear, Hugging Face Conv1D
(GPT-2), nn.MultiheadAttention's packed in_proj_weight (and its out_proj), Embedding tables (a tied
input/output embedding is one site, masked once for both uses) and RNN/GRU/LSTM weight_ih/hh.
Position embeddings are not searched and stay dense unless a config names them; a >=2-D parameter
that is no site (a bare learned position tensor) stays dense; both are noted in the trial record
(``plugins.pruning.importance`` says why).  Recovery training re-imposes the mask after every
optimizer step so the zeros survive fine-tuning.  The zeros shrink the
artifact (the codec stores sparse tensors sparsely); they do not speed up dense kernels, and the
latency we report says so by not moving.

Config, search space and masks are shared with gradient_pruning and fisher_pruning
(``plugins.pruning.importance.UnstructuredPruning``); only the score differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimforge.core.hookspecs import hookimpl
from slimforge.plugins.common import DENSITY_RANGE
from slimforge.plugins.pruning.importance import UnstructuredPruning, UnstructuredPruningConfig

__all__ = ["DENSITY_RANGE", "MagnitudePruning", "MagnitudePruningConfig"]


@dataclass(frozen=True, kw_only=True)
class MagnitudePruningConfig(UnstructuredPruningConfig):
    technique = "magnitude_pruning"


class MagnitudePruning(UnstructuredPruning):
    name = "magnitude_pruning"
    Config = MagnitudePruningConfig
    criterion = "magnitude"
    description = "Unstructured |w| pruning of every weight site, per-site sparsity searched; masks kept during fine-tuning."


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(MagnitudePruning)
