"""Low-rank factorization by truncated SVD: W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T).

``Linear(in, out)`` becomes ``Sequential(Linear(in, r, bias=False), Linear(r, out))`` and
``ConvNd(in, out, k)`` becomes ``Sequential(ConvNd(in, r, k, bias=False), ConvNd(r, out, 1))``, the
first conv keeping stride, padding, dilation and padding mode, the original bias moving to the
second factor.  A conv's weight is factorized as the (out, in*kh*kw) matrix its GEMM uses, so at
full rank the pair computes the original layer up to float rounding.  sqrt(S) goes into both
factors so they have similar scales for recovery training.

Each layer's rank is the smallest r whose leading singular values hold a searched fraction of the
squared Frobenius norm ("energy"), or a fixed fraction of the full rank.  A layer is factorized
only where it saves parameters, r * (in + out) < in * out; other layers, and grouped convs, are
kept whole with a note.  The chosen ranks go into ``ctx.structure``: the energy threshold alone
cannot rebuild the shapes without the trained weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.core.errors import ArtifactError, ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import replace_module, weight_layers

# Searched as the energy *discarded*, log-uniformly: accuracy is lost fast once more than a few
# percent of the energy goes, so the prior spends most trials near the top of [0.5, 0.99].
DISCARDED_ENERGY_RANGE = (0.01, 0.5)


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    energy: dict[str, float] = field(default_factory=dict)  # layer name -> energy fraction kept
    default_energy: float | None = None  # for layers not named in ``energy``; None: leave them whole
    rank_fraction: float | None = None  # instead of energies: every layer keeps ceil(f * full rank)

    def __post_init__(self) -> None:
        named = {f"energy[{layer!r}]": value for layer, value in self.energy.items()}
        optional = {"default_energy": self.default_energy, "rank_fraction": self.rank_fraction}
        for field_name, value in {**named, **{k: v for k, v in optional.items() if v is not None}}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ConfigError(f"low_rank.{field_name}: must be in (0, 1], got {value!r}")
        if self.rank_fraction is not None and (self.energy or self.default_energy is not None):
            raise ConfigError("low_rank.rank_fraction: give either rank_fraction or energy/default_energy, not both")


def matrix_of(layer: nn.Module) -> torch.Tensor:
    """The (out, in * prod(kernel)) matrix the layer multiplies its input (patches) by."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]**2) >= energy * sum(s**2) (at least 1, at most len(s))."""
    squared = singular_values.double() ** 2
    cumulative = torch.cumsum(squared, 0) / squared.sum().clamp_min(torch.finfo(torch.float64).tiny)
    r = int(torch.searchsorted(cumulative, torch.tensor([energy], dtype=torch.float64)).item()) + 1
    return min(max(r, 1), len(singular_values))


def saves_parameters(layer: nn.Module, rank: int) -> bool:
    out_dim, in_dim = matrix_of(layer).shape
    return rank * (in_dim + out_dim) < in_dim * out_dim


def factorized_like(layer: nn.Module, rank: int) -> nn.Sequential:
    """The two-factor module replacing ``layer`` at ``rank`` (fresh weights, same dtype/device)."""
    kwargs = {"dtype": layer.weight.dtype, "device": layer.weight.device}
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False, **kwargs),
                             nn.Linear(rank, layer.out_features, bias=has_bias, **kwargs))
    conv = type(layer)
    first = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                 dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **kwargs)
    return nn.Sequential(first, conv(rank, layer.out_channels, 1, bias=has_bias, **kwargs))


def factorize(layer: nn.Module, rank: int, svd=None) -> nn.Sequential:
    """Replace-ready rank-``rank`` factorization of a Linear/Conv layer; ``svd`` reuses a
    precomputed ``torch.linalg.svd`` of ``matrix_of(layer)`` in float64."""
    u, s, vh = svd if svd is not None else torch.linalg.svd(matrix_of(layer).double(), full_matrices=False)
    root = s[:rank].sqrt()
    new = factorized_like(layer, rank)
    first, second = new[0], new[1]
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
        second.weight.copy_((u[:, :rank] * root[None, :]).reshape(second.weight.shape))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return new


class LowRank(Technique):
    name = "low_rank"
    family = Family.FACTORIZATION
    stage = Stage.FACTORIZATION
    Config = LowRankConfig
    needs_recovery = True
    # The SVD of a sparse matrix is dense: every zero magnitude pruning paid accuracy for is lost.
    cannot_follow = frozenset({"magnitude_pruning"})
    description = "Truncated-SVD factorization of Conv/Linear, per-layer rank from a searched energy fraction."

    def suggest(self, space, task) -> LowRankConfig:
        energy = {name: round(1.0 - space.suggest_float(f"discarded_energy.{name}", *DISCARDED_ENERGY_RANGE, log=True), 4)
                  for name in weight_layers(task.teacher)}
        return LowRankConfig(energy=energy)

    def _rank(self, config: LowRankConfig, name: str, singular_values: torch.Tensor) -> int | None:
        if config.rank_fraction is not None:
            return max(1, math.ceil(config.rank_fraction * len(singular_values)))
        energy = config.energy.get(name, config.default_energy)
        return None if energy is None else rank_for_energy(singular_values, energy)

    def apply(self, model: nn.Module, config: LowRankConfig, ctx: TechniqueContext) -> nn.Module:
        layers = weight_layers(model)
        for name in set(config.energy) - set(layers):
            ctx.note(f"low_rank: layer {name!r} not found in the model; ignored")
        ranks = {}
        for name, layer in layers.items():
            if config.rank_fraction is None and name not in config.energy and config.default_energy is None:
                continue
            if getattr(layer, "groups", 1) != 1:
                ctx.note(f"low_rank: layer {name!r} is a grouped conv (groups={layer.groups}); kept whole")
                continue
            svd = torch.linalg.svd(matrix_of(layer).double(), full_matrices=False)
            rank = self._rank(config, name, svd[1])
            if not saves_parameters(layer, rank):
                out_dim, in_dim = matrix_of(layer).shape
                ctx.note(f"low_rank: layer {name!r}: rank {rank} of {len(svd[1])} saves no parameters "
                         f"({rank * (in_dim + out_dim)} >= {in_dim * out_dim}); kept whole")
                continue
            replace_module(model, name, factorize(layer, rank, svd))
            ranks[name] = rank
        ctx.structure["ranks"] = ranks
        return model

    def restore_structure(self, model, config: LowRankConfig, example_inputs, structure) -> nn.Module:
        layers = weight_layers(model)
        for name, rank in structure.get("ranks", {}).items():
            if name not in layers:
                raise ArtifactError(f"low_rank: artifact factorizes layer {name!r}, which the model lacks")
            replace_module(model, name, factorized_like(layers[name], int(rank)))
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(LowRank)
