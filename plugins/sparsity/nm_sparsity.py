"""N:M semi-structured sparsity: in every group of M consecutive weights along the reduction
dimension, only the N largest |w| survive.

The reduction dimension is what a GEMM sums over: the input dimension of the site's logical
``out x in`` matrix (``core.sites``).  That is ``in_features`` for Linear, the flattened
``in_channels * kh * kw`` of each output filter for Conv, the *stored rows' transpose* for Hugging
Face Conv1D (GPT-2 stores (in, out), so groups run down its stored columns), the embedding dim for
nn.MultiheadAttention's packed in_proj_weight and the input / hidden size for RNN weight_ih /
weight_hh.  Token Embedding tables get groups along the embedding dimension: for a tied
input/output embedding (one site, one mask) that is the output projection's reduction dimension;
for an untied table it is a lookup and the pattern buys file size only.  Position embeddings are
left dense, with a note: an additive table with no reduction for N:M to speed up, and under 1 %
of a transformer's weights.  A >=2-D parameter that is no weight site (a bare learned position
tensor) and a site an earlier technique re-expressed stay dense, with a note.  The pattern (1:4, 2:4, 2:8, 4:8) is
searched; the mask is fixed at ``apply`` and re-imposed after every recovery-training step, so the
pattern holds in the saved model (at most N nonzeros per group; exactly N unless the weight already
had zeros there, e.g. from an earlier pruning step).

A layer whose reduction dimension is not a multiple of M is *padded logically*, not skipped: the
last group of each row is treated as if zero-padded to M, i.e. keeps its min(N, L) largest of its
L real weights.  That is exactly the pattern a 2:4 kernel sees after the usual physical zero
padding of K to a multiple of M, and it still shrinks the artifact.  Each such layer gets a note.

Honest limits.  Hardware that speeds N:M up is CUDA-only: 2:4 on Ampere and newer through
cuSPARSELt / ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16/int8, shape constraints), and
no other N:M pattern is accelerated anywhere in PyTorch.  On the CPU the dense kernels run
unchanged, so latency does not move and the benefit is artifact size only (the codec stores the
zeros as a bitmask or relative indices, about as compact as N:M metadata: 4 bits per group of 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, TechniqueContext
from slimforge.plugins.common import MaskedTechnique, apply_masks, mask_sites, site_label, site_mask

GROUP_SIZES = (4, 8, 16)
PATTERNS = ("1:4", "2:4", "2:8", "4:8")  # searched; any valid n:m can be configured by hand


@dataclass(frozen=True, kw_only=True)
class NMSparsityConfig:
    n: int = 2  # weights kept per group
    m: int = 4  # group size along the reduction dimension

    def __post_init__(self) -> None:
        for field_name in ("n", "m"):
            if isinstance(getattr(self, field_name), bool) or not isinstance(getattr(self, field_name), int):
                raise ConfigError(f"nm_sparsity.{field_name}: must be an integer, got {getattr(self, field_name)!r}")
        if self.m not in GROUP_SIZES:
            raise ConfigError(f"nm_sparsity.m: must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.m}")
        if not 1 <= self.n < self.m:
            raise ConfigError(f"nm_sparsity.n: must be in 1..{self.m - 1} (N < M), got {self.n}")


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest |w| of every ``m`` consecutive weights along the
    flattened reduction dimension (dim 1 onwards); a short last group keeps min(n, its length)."""
    rows = weight.shape[0]
    scores = weight.detach().abs().reshape(rows, -1)
    k = scores.shape[1]
    # Padded slots score -1, below every |w|: they are only "kept" where a short group has fewer
    # than n real weights, and they are cut off again below.
    scores = F.pad(scores, (0, (-k) % m), value=-1.0).view(rows, -1, m)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # stable: ties break by position
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=weight.device).scatter_(-1, order[..., :n], True)
    return keep.view(rows, -1)[:, :k].reshape(weight.shape)


class NMSparsity(MaskedTechnique):
    name = "nm_sparsity"
    family = Family.SPARSITY
    stage = Stage.SPARSITY
    Config = NMSparsityConfig
    needs_recovery = True
    description = "N:M semi-structured sparsity (1:4, 2:4, 2:8, 4:8) along each weight site's reduction dim; masks kept in fine-tuning."

    def suggest(self, space, task) -> NMSparsityConfig:
        n, m = map(int, space.suggest_categorical("pattern", list(PATTERNS)).split(":"))
        return NMSparsityConfig(n=n, m=m)

    def apply(self, model: nn.Module, config: NMSparsityConfig, ctx: TechniqueContext) -> nn.Module:
        masks = {}
        for name, site in mask_sites(model, ctx, self.name).items():
            if site.role == "position_embedding":
                ctx.note(f"nm_sparsity: position embedding {site_label(site)} left dense: an additive table, "
                         f"no reduction for an N:M pattern to speed up, and a small one")
                continue
            k = site.in_features
            if k % config.m:
                ctx.note(f"nm_sparsity: {site_label(site)}: reduction dim {k} is not a multiple of {config.m}; "
                         f"its last group per row ({k % config.m} weights) is padded logically")
            # Groups run along the logical matrix's input dimension, whatever the storage order.
            masks[name] = site_mask(site, nm_mask(site.matrix(model), config.n, config.m))
        apply_masks(model, masks, ctx)
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(NMSparsity)
