"""K-means weight sharing (Deep Compression, Han et al. 2016, section 3).

Per weight site (``core.sites``: Conv, Linear, nn.MultiheadAttention's packed ``in_proj_weight``
and ``out_proj``, Hugging Face ``Conv1D``, Embedding tables, RNN ``weight_ih/hh``), the weights are
clustered into ``k = 2**bits`` scalar centroids by Lloyd's algorithm with *linear* initialisation
(centroids evenly spaced between min and max: the paper's best, because it keeps the rare large
weights that matter most).  Convolutions default to ``conv_bits``, every other site (they are all
fully connected maps) to ``fc_bits``; settings are keyed by ``site.setting_key``.  The site keeps
only the codebook (k floats, fine-tuned by recovery training) and the cluster index (code) of every
weight, stored through the public storage hook (``plugins.api``: ``StoredWeight`` /
``store_weight`` / ``restore_stored_weights``) as a ``ClusteredWeight`` in one of its two places:

- a plain called ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (``plugins.common.replaceable_layer``)
  becomes a ``ClusteredLayer``, the same weight as a ``StoredLayer`` that also holds the trainable
  bias and calls the layer's functional op (no parametrization dispatch per forward; its state_dict
  is the one these layers always had; ``ctx.structure["layers"]``);
- every other site becomes a ``ClusteredWeight`` parametrization: ``.weight`` stays readable for
  the parents that read it (nn.MultiheadAttention, RNNs, Conv1D), the codes cover the logical
  ``out x in`` matrix, and tied input/output embeddings share one ``ClusteredWeight``, clustered
  and stored once (``ctx.structure["derived"]``).

Both decode through the same differentiable lookup while gradients are on, so autograd gives each
centroid the sum of its weights' gradients, the paper's centroid fine-tuning rule; with gradients
off the decoded weight is cached until the codebook changes.  A site too small for its codebook to
save bytes is left dense with a note, and so is any parameter no site covers and any site an
earlier step already re-expressed.

Weights an earlier plan step set to zero (pruning, N:M sparsity) keep code 0, which decodes to a
constant 0.0 outside the trainable codebook, so they stay exactly zero through fine-tuning and only
the nonzeros are clustered.

How the codes are stored is chosen per layer at ``apply`` time (the codes never change after it,
only the centroids do) by ``plugins.common.choose_code_storage``: ``uint8`` in the weight's shape,
which lets the artifact codec store a pruned layer's nonzero codes only (relative indices, the
paper's scheme), or ``packed`` at ``bits`` per weight, whichever the codec writes smaller (the forms
are described there).  The choice is recorded in ``ctx.structure`` so ``restore_structure`` rebuilds
the same buffer.  Measured on LeNet-5 fc1 (400,000 weights): at 5 bits (code entropy 4.05 bits)
``uint8`` takes 209,262 bytes against 240,139 packed, and pruned to 8 % density 35,081 against
46,616; dense at 4 bits ``packed`` wins, 174,896 against 182,247.  Artifacts written before the
choice existed hold packed codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import SiteKind, WeightSite, to_matrix, uncovered_parameters, weight_sites
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import (choose_code_storage, codes_from_stored, empty_code_buffer, packed_size,
                                      replaceable_layer, stored_codes, suggest_site_bits)
from slimforge.plugins.storage import StoredLayer, StoredWeight, layer_site, restore_stored_weights, store_weight

# Deep Compression's LeNet/AlexNet setting: convolutions are more sensitive to sharing than fully
# connected layers, so they default to (and search over) more bits.
CONV_BITS, FC_BITS = 8, 5
CONV_BITS_RANGE, FC_BITS_RANGE = (3, 8), (2, 6)
LLOYD_ITERATIONS = 30


@dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    bits: dict[str, int] = field(default_factory=dict)  # layer name -> code width (k = 2**bits)
    conv_bits: int = CONV_BITS  # for convolutions not named in ``bits``
    fc_bits: int = FC_BITS      # for Linear layers not named in ``bits``
    iterations: int = LLOYD_ITERATIONS  # Lloyd iterations at most (stops early once converged)

    def __post_init__(self) -> None:
        for layer, value in {**self.bits, "conv_bits": self.conv_bits, "fc_bits": self.fc_bits}.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
                raise ConfigError(f"kmeans_clustering.bits[{layer!r}]: must be an integer in 1..8, got {value!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"kmeans_clustering.iterations: must be an integer >= 1, got {self.iterations!r}")

    def bits_for(self, name: str, layer: nn.Module | WeightSite) -> int:
        """``bits[name]``, else ``conv_bits`` for a convolution and ``fc_bits`` for every other weight
        matrix (Linear, Conv1D, attention, Embedding, RNN): they are all fully connected maps."""
        conv = layer.kind == SiteKind.CONV if isinstance(layer, WeightSite) else not isinstance(layer, nn.Linear)
        return self.bits.get(name, self.conv_bits if conv else self.fc_bits)


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linspace(float(values.min()), float(values.max()), k, dtype=values.dtype)


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # 1-D: the nearest of sorted centroids is found by binary search on the midpoints, O(n log k)
    # instead of the O(n k) distance matrix a general k-means computes.
    return torch.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = LLOYD_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars from linear initialisation; returns sorted ``(centroids, codes)``.

    Deterministic: no random restarts.  A centroid whose cluster empties keeps its position."""
    values = values.flatten().to(torch.float64)
    if values.numel() == 0:
        return torch.zeros(k, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    centroids = linear_init(values, k)
    for _ in range(iterations):
        codes = _nearest(values, centroids)
        counts = torch.bincount(codes, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, values)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, _nearest(values, centroids)


class _CodebookLookup(torch.autograd.Function):
    """``table[index]`` whose backward sums each centroid's gradient in a fixed order.

    The gather's own backward accumulates with a parallel index_put on CPU, whose float sums
    depend on thread scheduling: the same plan and seed then gave artifacts a few bytes apart
    with 2 threads (identical with 1).  ``bincount`` sums serially on CPU, in float64."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.table_size = table.numel()
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        if grad.device.type != "cpu":  # CUDA has no bitwise promise here; keep its fast path
            return torch.zeros(ctx.table_size, dtype=grad.dtype, device=grad.device).index_add_(
                0, index.reshape(-1), grad.reshape(-1)), None
        sums = torch.bincount(index.reshape(-1), weights=grad.reshape(-1).double(), minlength=ctx.table_size)
        return sums.to(grad.dtype), None


class ClusteredWeight(StoredWeight):
    """A site's weight computed as ``codebook[codes]``: kmeans_clustering's ``StoredWeight``
    (``plugins.api``), in the derived place, so the module keeps its class and reads ``.weight`` as
    before (nn.MultiheadAttention's ``out_proj`` and packed ``in_proj_weight``, Hugging Face Conv1D,
    Embedding tables, RNN flat weights, and tied embeddings: one ``ClusteredWeight`` for both
    places, clustered and stored once).

    State: ``codebook`` (trainable centroids), ``codes`` (uint8 cluster indices of the logical
    ``out x in`` matrix, Conv1D's transposed storage undone: one per weight with
    ``storage="uint8"``, bit-packed and flat with ``storage="packed"``).  With ``zero_code`` the
    code 0 means an exact, untrainable 0.0 and ``codebook`` holds the other ``2**bits - 1``
    centroids.  While gradients are on, every read decodes again through a differentiable lookup, so
    recovery training fine-tunes the centroids (the paper's rule: each centroid gets the sum of its
    weights' gradients); otherwise the decoded weight is cached until the codebook changes."""

    # Codes of the logical matrix; the layer form keeps them in the weight's own shape, as its
    # artifacts always had them.
    codes_in_stored_shape = False

    def __init__(self, site: WeightSite, bits: int, zero_code: bool, storage: str = "packed",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.bits, self.zero_code, self.storage = bits, zero_code, storage
        self.stored_shape, self.transposed = tuple(site.shape), site.transposed
        self.codes_shape = self.stored_shape if self.codes_in_stored_shape else (site.out_features, site.in_features)
        self.codebook = nn.Parameter(torch.zeros((1 << bits) - int(zero_code), dtype=dtype, device=device))
        self.register_buffer("codes", empty_code_buffer(self.codes_shape, bits, storage, device))
        # Decoded indices for the forward pass; derived from ``codes``, so never saved.
        self.register_buffer("code_index", torch.zeros(self.codes_shape, dtype=torch.int64, device=device),
                             persistent=False)
        self._decoded_from = None  # the codebook ``decoded`` was computed from

    @classmethod
    def from_matrix(cls, site: WeightSite, matrix: torch.Tensor, bits: int, iterations: int) -> ClusteredWeight:
        """``matrix`` (the site's logical ``out x in`` weights) clustered into ``2**bits`` centroids."""
        centroids, codes, zero_code = cluster(matrix, bits, iterations)
        codes = codes.view(site.shape) if cls.codes_in_stored_shape else codes
        storage = choose_code_storage(codes, bits)
        weight = cls(site, bits, zero_code, storage, matrix.dtype, matrix.device)
        with torch.no_grad():
            weight.codebook.copy_(centroids.to(weight.codebook.dtype))
        weight.set_codes(codes)
        return weight

    def set_codes(self, codes: torch.Tensor) -> None:
        codes = codes.to(torch.int64).reshape(self.codes_shape)
        with torch.no_grad():
            self.codes.copy_(stored_codes(codes.cpu(), self.bits, self.storage))
            self.code_index.copy_(codes)
        self.refresh()

    # --- the storage hook -----------------------------------------------------------------------
    def spec(self) -> dict:
        return {"bits": self.bits, "zero_code": self.zero_code, "storage": self.storage}

    @classmethod
    def empty(cls, site: WeightSite, spec: dict, like: torch.Tensor) -> ClusteredWeight:
        # Artifacts from before the per-layer storage choice always hold packed codes.
        return cls(site, int(spec["bits"]), bool(spec["zero_code"]), spec.get("storage", "packed"), like.dtype,
                   like.device)

    def decode(self) -> torch.Tensor:
        table = torch.cat([self.codebook.new_zeros(1), self.codebook]) if self.zero_code else self.codebook
        decoded = _CodebookLookup.apply(table, self.code_index)
        return decoded.t() if self.transposed else decoded.reshape(self.stored_shape)

    def refresh(self) -> None:
        self.decoded = self._decoded_from = None  # decoded again on the next read without gradients

    def _load_from_state_dict(self, *args, **kwargs):
        nn.Module._load_from_state_dict(self, *args, **kwargs)
        with torch.no_grad():
            self.code_index.copy_(codes_from_stored(self.codes, self.bits, self.storage, self.codes_shape))
        self.refresh()

    def compute(self) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: decode every time, so gradients reach the codebook
            return self.decode()
        # Inference decodes once, as a deployed Deep Compression model does at load time: the
        # per-call gather otherwise costs more than the layer's matmul.  The codebook is compared
        # by value (a few hundred floats), because writes through ``.data`` or a fused optimizer
        # leave no trace in its version counter; the codes only change in set_codes/load.
        book = self.codebook.detach()
        cached = self._decoded_from
        stale = cached is None or (cached.device, cached.dtype) != (book.device, book.dtype)
        if stale or not torch.equal(cached, book):
            self.decoded, self._decoded_from = self.decode().contiguous(), book.clone()
        return self.decoded

    def decoded_weight(self) -> torch.Tensor:
        """The weight in the site's stored layout (``compute``: what the layer multiplies by)."""
        return self.compute()

    def extra_repr(self) -> str:
        return (f"{list(self.codes_shape)}{' transposed' if self.transposed else ''}, bits={self.bits}, "
                f"storage={self.storage}, centroids={self.codebook.numel()}{' + exact zero' if self.zero_code else ''}")


class ClusteredLayer(StoredLayer, ClusteredWeight):
    """A ``ClusteredWeight`` in the layer place (``plugins.api.StoredLayer``): it replaces a plain
    Conv/Linear its parent only calls, holding codebook, codes (in the weight's shape) and the
    trainable bias, and calls the layer's functional op (any padding mode).  Kept beside the derived
    place because it skips the parametrization dispatch on every forward and writes shorter keys
    (``plugins.storage``); its state_dict is the one these layers always had."""

    codes_in_stored_shape = True
    trainable_bias = True

    @classmethod
    def from_layer(cls, layer: nn.Module, bits: int, iterations: int) -> ClusteredLayer:
        site = layer_site(layer)
        return cls.from_matrix(site, to_matrix(layer.weight, site), bits, iterations).host(layer)

    @classmethod
    def for_layer(cls, layer: nn.Module, bits: int, zero_code: bool, storage: str = "packed") -> ClusteredLayer:
        """An empty one for ``layer`` (its state_dict loads next)."""
        weight = layer.weight
        return cls(layer_site(layer), bits, zero_code, storage, weight.dtype, weight.device).host(layer)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.stored_shape

    def extra_repr(self) -> str:
        return f"{self.kind}, " + super().extra_repr()


def _worth_clustering(numel: int, element_size: int, bits: int) -> bool:
    """Codebook + packed codes must be smaller than the dense weight, or sharing only adds bytes."""
    clustered = packed_size(numel, bits) + (1 << bits) * element_size
    return clustered < numel * element_size


def cluster(weight: torch.Tensor, bits: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(centroids, codes in weight's shape, zero_code)``: exact zeros keep code 0 outside the
    codebook when there are any, the nonzeros are clustered into the other centroids."""
    weight = weight.detach().cpu()
    nonzero = weight != 0
    zero_code = not bool(nonzero.all())
    centroids, codes = kmeans_1d(weight[nonzero], (1 << bits) - int(zero_code), iterations)
    all_codes = torch.zeros(weight.shape, dtype=torch.int64)
    all_codes[nonzero] = codes + int(zero_code)
    return centroids, all_codes, zero_code


class KMeansClustering(Technique):
    name = "kmeans_clustering"
    family = Family.SHARING
    stage = Stage.SHARING
    Config = KMeansConfig
    needs_recovery = True
    description = ("Deep Compression weight sharing on every weight site (attention, Conv1D, Embedding incl. tied, "
                   "RNN): per-site k-means codebook (2**bits centroids); codes entropy-coded, pruned zeros by "
                   "relative index.")
    # Clustered weights are codebook-derived: torch.ao quantization looks for plain layers and
    # weight-only quantizers would dequantize the sharing away.
    cannot_precede = frozenset({"int8_ptq", "int8_dynamic", "weight_only_quant"})

    def suggest(self, space, task) -> KMeansConfig:
        def per_site_range(site):
            low, high = CONV_BITS_RANGE if site.kind == SiteKind.CONV else FC_BITS_RANGE
            return range(low, high + 1)

        # Global knobs: a mean codebook width and its allocation over the sites by sensitivity,
        # over the union of both ranges (a sensitive Linear may take 8 bits, a robust conv 2).
        choices = tuple(range(min(FC_BITS_RANGE[0], CONV_BITS_RANGE[0]), max(FC_BITS_RANGE[1], CONV_BITS_RANGE[1]) + 1))
        return KMeansConfig(bits=suggest_site_bits(space, task, weight_sites(task.teacher), choices, per_site_range))

    def apply(self, model: nn.Module, config: KMeansConfig, ctx: TechniqueContext) -> nn.Module:
        sites = weight_sites(model)
        keys = {site.setting_key for site in sites.values()}
        for name in sorted(set(config.bits) - keys):
            ctx.note(f"kmeans_clustering: layer {name!r} not found among the model's weight sites; ignored")
        for name, shape in uncovered_parameters(model, sites).items():
            ctx.note(f"kmeans_clustering: {name!r} {list(shape)} is not a weight matrix of a known layer kind; "
                     "left dense")
        ctx.structure["layers"] = {}  # recorded even when empty, as before the storage hook: same header bytes
        for name, site in sites.items():
            key = site.setting_key
            if site.is_derived(model):
                ctx.note(f"kmeans_clustering: {name!r} is already computed by an earlier step's tensors; left as is")
                continue
            bits = config.bits_for(key, site)
            if not _worth_clustering(site.numel, site.tensor(model).element_size(), bits):
                ctx.note(f"kmeans_clustering: {key!r} has {site.numel} weights, too few for a "
                         f"{1 << bits}-entry codebook to save bytes; left dense")
                continue
            place = ClusteredLayer if replaceable_layer(model, site, padding_modes=None) else ClusteredWeight
            store_weight(model, site, place.from_matrix(site, site.matrix(model), bits, config.iterations), ctx)
        return model

    def restore_structure(self, model, config: KMeansConfig, example_inputs, structure) -> nn.Module:
        return restore_stored_weights(model, structure, self.name, ClusteredWeight, ClusteredLayer)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(KMeansClustering)
