"""Low-rank factorization by truncated SVD: W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T).

Acts on every weight site (``core.sites``) with a matrix to factor: Conv and Linear layers, Hugging
Face ``Conv1D`` (GPT-2; its transposed storage undone), ``nn.MultiheadAttention``'s packed
``in_proj_weight`` (or its separate ``q/k/v_proj_weight``) and ``out_proj``, ``nn.Embedding``
tables (token, position and token-type, tied input/output embeddings included) and RNN/GRU/LSTM
``weight_ih_l*`` / ``weight_hh_l*``.  A conv's weight is factorized as the ``(out, in*kh*kw)``
matrix its GEMM uses, an Embedding's as its ``(vocab, dim)`` table.  sqrt(S) goes into both
factors so they have similar scales for recovery training, which trains the factors (this stage
runs before recovery).

Two forms, chosen per site:

- **modules** (the only form that makes inference faster): the module is replaced by two smaller
  ones.  ``Linear(in, out)`` and ``Conv1D`` become ``Sequential(Linear(in, r, bias=False),
  Linear(r, out))``; ``ConvNd(in, out, k)`` becomes ``Sequential(ConvNd(in, r, k, bias=False),
  ConvNd(r, out, 1))``, the first conv keeping stride, padding, dilation and padding mode;
  ``Embedding(V, D)`` becomes ``Sequential(Embedding(V, r), Linear(r, D, bias=False))``, an r-wide
  lookup followed by a projection (smaller, but a lookup plus an r x D product per token instead of
  a lookup).  The original bias moves to the second factor, so at full rank the pair computes the
  original layer up to float rounding.  Used wherever the parent only *calls* the module: FFN
  layers of user-written and Hugging Face models, BERT's query/key/value, Llama's q/k/v/o_proj
  (grouped-query k/v included: each is its own Linear), GPT-2's ``c_attn`` / ``c_proj`` /
  ``c_fc``, untied embeddings and lm heads.
- **derived** (``core.sites.derive_weight``): the weight stays readable as ``module.weight`` but is
  computed from trainable factors U (out x r) and V (r x in) by ``LowRankWeight``.  Used where a
  parent reads the tensor: ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj.weight``),
  ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` (their fast path reads ``linear1/2.weight``),
  RNN weights (re-read each forward) and tied embeddings (the lm head uses the same factors,
  stored once in the artifact).  This form shrinks the artifact but not the compute: the model
  multiplies by the dense U @ V.  Outside training the product is cached (recomputed only when a
  factor changes), so no forward repeats the r-wide product and the arithmetic is the dense
  model's; what remains is ``torch.nn.utils.parametrize``'s Python cost per weight read (about
  50 us on the shared CPU this was measured on, against 0.6 us for a plain parameter: the tiny
  torch encoder, which reads ~15 derived weights per forward, took 1.9 ms against 1.1 ms dense,
  with or without the cache; negligible next to real-sized layers).  In training the product is
  recomputed each forward so gradients reach U and V.

Packed q/k/v (``in_proj_weight``, ``c_attn``) and gate-stacked RNN weights are factorized as one
matrix, not block by block: ``benchmarks/low_rank_packed.py`` trained tiny torch-transformer,
GPT-2 and GRU character-level language models and compared the energy lost at equal parameters.
Each block at the same energy threshold (what a per-site energy does) lost more than the whole
matrix in 10 of 18 (site, budget) pairs, up to 0.08 of the energy more on GPT-2's ``c_attn`` and
0.06 more on the GRU's ``weight_hh``; even the best cross-block rank allocation (which a per-site
energy cannot express) lost at most 0.07 less, 0.03 or less in 16 of 18 pairs, and more on
``weight_hh``.  One matrix also keeps ``c_attn`` a plain pair of Linears.

Each site's rank is the smallest r whose leading singular values hold a searched fraction of the
squared Frobenius norm ("energy"), or a fixed fraction of the full rank.  A site is factorized only
where it saves parameters, r * (in + out) < in * out, i.e. r < out*in/(out+in); other sites are
kept whole with a note, as are grouped convs, Embeddings with ``max_norm`` (it renormalises stored
rows, which the factors do not have), sites another technique already re-expressed and parameters
no site covers (a hand-written learned position tensor).  The chosen ranks go into
``ctx.structure``: ``ranks`` (module name -> rank, the module form; the key old artifacts use) and
``derived`` (site name -> rank); the energy threshold alone cannot rebuild the shapes without the
trained weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.core.errors import ArtifactError, ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import (
    DerivedWeight,
    SiteKind,
    WeightSite,
    derive_weight,
    from_matrix,
    is_hf_conv1d,
    uncovered_parameters,
    weight_sites,
)
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import replace_module

# Searched as the energy *discarded*, log-uniformly: accuracy is lost fast once more than a few
# percent of the energy goes, so the prior spends most trials near the top of [0.5, 0.99].
DISCARDED_ENERGY_RANGE = (0.01, 0.5)

# torch.nn modules that read their children's weights instead of calling them, so a child
# replaced by a pair of modules would break them: MultiheadAttention passes out_proj.weight to
# F.multi_head_attention_forward, the Transformer layers' inference fast path passes linear1/2's.
_WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    energy: dict[str, float] = field(default_factory=dict)  # site setting key -> energy fraction kept
    default_energy: float | None = None  # for sites not named in ``energy``; None: leave them whole
    rank_fraction: float | None = None  # instead of energies: every site keeps ceil(f * full rank)

    def __post_init__(self) -> None:
        named = {f"energy[{layer!r}]": value for layer, value in self.energy.items()}
        optional = {"default_energy": self.default_energy, "rank_fraction": self.rank_fraction}
        for field_name, value in {**named, **{k: v for k, v in optional.items() if v is not None}}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ConfigError(f"low_rank.{field_name}: must be in (0, 1], got {value!r}")
        if self.rank_fraction is not None and (self.energy or self.default_energy is not None):
            raise ConfigError("low_rank.rank_fraction: give either rank_fraction or energy/default_energy, not both")


def matrix_of(layer: nn.Module) -> torch.Tensor:
    """The (out, in * prod(kernel)) matrix a Conv/Linear layer multiplies its input (patches) by."""
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
    """The two-factor module replacing ``layer`` (Linear, Conv, HF Conv1D or Embedding) at
    ``rank``, with fresh weights of the same dtype/device."""
    kwargs = {"dtype": layer.weight.dtype, "device": layer.weight.device}
    if isinstance(layer, nn.Embedding):
        first = nn.Embedding(layer.num_embeddings, rank, padding_idx=layer.padding_idx,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse, **kwargs)
        return nn.Sequential(first, nn.Linear(rank, layer.embedding_dim, bias=False, **kwargs))
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
        out_dim, in_dim = (layer.weight.shape[1], layer.weight.shape[0]) if is_hf_conv1d(layer) else layer.weight.shape
        return nn.Sequential(nn.Linear(in_dim, rank, bias=False, **kwargs), nn.Linear(rank, out_dim, bias=has_bias, **kwargs))
    conv = type(layer)
    first = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                 dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **kwargs)
    return nn.Sequential(first, conv(rank, layer.out_channels, 1, bias=has_bias, **kwargs))


def svd_factors(matrix: torch.Tensor, rank: int, svd=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r sqrt(S_r), sqrt(S_r) V_r^T) of an ``out x in`` matrix, in float64; ``svd`` reuses a
    precomputed ``torch.linalg.svd(matrix.double(), full_matrices=False)``."""
    u, s, vh = svd if svd is not None else torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def factorize(layer: nn.Module, rank: int, svd=None) -> nn.Sequential:
    """Replace-ready rank-``rank`` factorization of a Linear/Conv/HF Conv1D/Embedding layer;
    ``svd`` reuses a precomputed ``torch.linalg.svd`` of its logical matrix in float64 (for a
    Conv1D the transpose of its stored weight, for an Embedding its table)."""
    weight = layer.weight.detach()
    matrix = weight.t() if is_hf_conv1d(layer) else weight.reshape(weight.shape[0], -1)
    left, right = svd_factors(matrix, rank, svd)
    new = factorized_like(layer, rank)
    first, second = new[0], new[1]
    with torch.no_grad():
        if isinstance(layer, nn.Embedding):
            first.weight.copy_(left)  # (V, r): the lookup ...
            second.weight.copy_(right.t())  # (D, r): ... then x @ right
            if layer.padding_idx is not None and not weight[layer.padding_idx].any():
                first.weight[layer.padding_idx] = 0  # a zero padding row stays exactly zero
            return new
        first.weight.copy_(right.reshape(first.weight.shape))
        second.weight.copy_(left.reshape(second.weight.shape))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return new


class LowRankWeight(DerivedWeight):
    """A site's weight computed as ``U @ V`` (U: out x r, V: r x in, both trained), in the site's
    stored layout (a Conv1D's transpose, a conv's kernel shape).

    Outside training the product is cached and recomputed only when a factor changes (a new
    tensor, or an in-place update bumping its version), so an eval-mode forward does the dense
    model's arithmetic (plus ``parametrize``'s cost per weight read; see the module docstring).
    Where the site is tied (input and output embeddings), one ``LowRankWeight`` serves every place
    (``derive_weight``): the state_dict names its factors under each place, and the artifact codec
    stores the shared tensors once (an alias entry for the others)."""

    def __init__(self, site: WeightSite, rank: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(site.out_features, rank, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.zeros(rank, site.in_features, dtype=dtype, device=device))
        self.site = site
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple = ()

    def product(self) -> torch.Tensor:
        return from_matrix(self.U @ self.V, self.site)

    def compute(self) -> torch.Tensor:
        u, v = self.U, self.V
        if self.training or (torch.is_grad_enabled() and (u.requires_grad or v.requires_grad)):
            return self.product()
        # Every weight read of an eval forward comes here, so the check is kept cheap: a version
        # counter moves on in-place writes (optimizer steps, load_state_dict), a data pointer
        # on new storage (.to(device / dtype)).
        key = (u._version, v._version, u.data_ptr(), v.data_ptr())
        if key != self._cache_key:
            # A normal tensor even under inference_mode, so that a later autograd-enabled use of
            # the cache (e.g. input gradients through a frozen model) may save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = self.product()
            self._cache_key = key
        return self._cache


def derive_factors(model: nn.Module, site: WeightSite, factors: LowRankWeight) -> None:
    """``derive_weight`` plus what an RNN owner needs (``_release_flat_weights``)."""
    derive_weight(model, site, factors)
    owner = site.owner(model)
    if isinstance(owner, nn.RNNBase) and _release_flat_weights not in owner._forward_hooks.values():
        owner.register_forward_hook(_release_flat_weights)


def _release_flat_weights(module: nn.RNNBase, args, output) -> None:
    """An RNN keeps the weights its last forward read in ``_flat_weights``; after a training
    forward those are U @ V products inside the autograd graph, which ``copy.deepcopy`` refuses
    (it copies only graph leaves), so the trial's copies of the model would fail.  Autograd
    holds what backward needs; the list gets detached views, and the next forward re-reads the
    weights anyway (the RNN sees they changed)."""
    module._flat_weights = [w.detach() if isinstance(w, torch.Tensor) and w.grad_fn is not None else w
                            for w in module._flat_weights]


def _parent(model: nn.Module, module_name: str) -> nn.Module:
    parent_name = module_name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def form_for(model: nn.Module, site: WeightSite) -> str:
    """``modules`` where replacing the site's module by a pair keeps its parent working (the
    parent only calls it), ``derived`` where something reads the tensor itself."""
    if site.kind in (SiteKind.ATTENTION_IN_PROJ, SiteKind.RNN) or site.tied or site.param != "weight":
        return "derived"
    if site.module and isinstance(_parent(model, site.module), _WEIGHT_READERS):
        return "derived"
    return "modules"


def _skip_reason(model: nn.Module, site: WeightSite) -> str | None:
    module = site.owner(model)
    if site.is_derived(model):
        return "already re-expressed by an earlier technique"
    if site.kind == SiteKind.CONV and getattr(module, "groups", 1) != 1:
        return f"is a grouped conv (groups={module.groups})"
    if site.kind == SiteKind.EMBEDDING and module.max_norm is not None:
        return f"is an Embedding with max_norm={module.max_norm}, which renormalises stored rows the factors do not have"
    return None


def _label(site: WeightSite) -> str:
    """How notes name a site: a layer by its module name (as before sites existed), else the weight."""
    label = f"{'layer' if site.param == 'weight' and site.module else 'weight'} {site.setting_key!r}"
    return f"{label} (tied to {', '.join(site.tied)})" if site.tied else label


class LowRank(Technique):
    name = "low_rank"
    family = Family.FACTORIZATION
    stage = Stage.FACTORIZATION
    Config = LowRankConfig
    needs_recovery = True
    # The SVD of a sparse matrix is dense: every zero magnitude pruning paid accuracy for is lost.
    cannot_follow = frozenset({"magnitude_pruning"})
    description = ("Truncated-SVD factorization of Conv/Linear/Conv1D, attention, Embedding and RNN weights, "
                   "per-site rank from a searched energy fraction.")

    def suggest(self, space, task) -> LowRankConfig:
        energy = {key: round(1.0 - space.suggest_float(f"discarded_energy.{key}", *DISCARDED_ENERGY_RANGE, log=True), 4)
                  for key in (site.setting_key for site in weight_sites(task.teacher).values())}
        return LowRankConfig(energy=energy)

    def _rank(self, config: LowRankConfig, key: str, singular_values: torch.Tensor) -> int | None:
        if config.rank_fraction is not None:
            return max(1, math.ceil(config.rank_fraction * len(singular_values)))
        energy = config.energy.get(key, config.default_energy)
        return None if energy is None else rank_for_energy(singular_values, energy)

    def apply(self, model: nn.Module, config: LowRankConfig, ctx: TechniqueContext) -> nn.Module:
        sites = weight_sites(model)
        for name in set(config.energy) - {site.setting_key for site in sites.values()}:
            ctx.note(f"low_rank: layer {name!r} not found in the model; ignored")
        for name, shape in uncovered_parameters(model, sites).items():
            ctx.note(f"low_rank: parameter {name!r} {list(shape)} is not a weight matrix of a known layer; kept dense")
        ranks, derived = {}, {}
        for site in sites.values():
            key = site.setting_key
            if config.rank_fraction is None and key not in config.energy and config.default_energy is None:
                continue
            reason = _skip_reason(model, site)
            if reason:
                ctx.note(f"low_rank: {_label(site)} {reason}; kept whole")
                continue
            svd = torch.linalg.svd(site.matrix(model).detach().double(), full_matrices=False)
            rank = self._rank(config, key, svd[1])
            if rank * (site.in_features + site.out_features) >= site.numel:
                ctx.note(f"low_rank: {_label(site)}: rank {rank} of {len(svd[1])} saves no parameters "
                         f"({rank * (site.in_features + site.out_features)} >= {site.numel}); kept whole")
                continue
            if form_for(model, site) == "modules":
                replace_module(model, site.module, factorize(site.owner(model), rank, svd))
                ranks[site.module] = rank
            else:
                weight = site.tensor(model)
                factors = LowRankWeight(site, rank, dtype=weight.dtype, device=weight.device)
                left, right = svd_factors(None, rank, svd)
                with torch.no_grad():
                    factors.U.copy_(left)
                    factors.V.copy_(right)
                derive_factors(model, site, factors)
                derived[site.name] = rank
        ctx.structure["ranks"] = ranks
        if derived:  # only then: structures (and artifacts) of models without such sites stay as before
            ctx.structure["derived"] = derived
        return model

    def restore_structure(self, model, config: LowRankConfig, example_inputs, structure) -> nn.Module:
        # Module names first, then site names: derived sites are found in the model as it is
        # then, and neither form touches the other's sites.
        for name, rank in structure.get("ranks", {}).items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ArtifactError(f"low_rank: artifact factorizes layer {name!r}, which the model lacks") from None
            if getattr(layer, "weight", None) is None:
                raise ArtifactError(f"low_rank: artifact factorizes layer {name!r}, which holds no weight")
            replace_module(model, name, factorized_like(layer, _restored_rank(rank, matrix_of(layer).shape, name)))
        derived = structure.get("derived", {})
        if derived:
            sites = weight_sites(model)
            for name, rank in derived.items():
                if name not in sites:
                    raise ArtifactError(f"low_rank: artifact factorizes weight {name!r}, which the model lacks")
                site, weight = sites[name], sites[name].tensor(model)
                rank = _restored_rank(rank, (site.out_features, site.in_features), name)
                derive_factors(model, site, LowRankWeight(site, rank, dtype=weight.dtype, device=weight.device))
        return model


def _restored_rank(rank, shape, name: str) -> int:
    """A rank read from an artifact, bounded by the rebuilt weight's own shape before any factor
    is allocated: a header asking for rank 10^6 would otherwise build gigabytes of empty factors."""
    full = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ArtifactError(f"low_rank: artifact asks {name!r} for rank {rank!r}; its {shape[0]}x{shape[1]} weight "
                            f"allows 1 to {full}: the file is corrupted or crafted")
    return rank


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(LowRank)
