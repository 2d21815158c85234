"""Ternary weights, stored at 1.6 bits per weight through slimforge's storage hook.

Every weight site becomes ``scale[row] * t`` with ``t`` in {-1, 0, +1} (ternary weight networks, Li
et al. 2016, "Ternary Weight Networks"): per logical output row, weights whose magnitude is below
``threshold * mean|w|`` become 0, the others keep their sign, and the row's scale is the mean
magnitude of the weights kept (the least-squares scale for that pattern).

Storage: three values fit a byte five at a time (3**5 = 243 <= 256), so a row-major stream of
trits costs ``ceil(n / 5)`` bytes, 1.6 bits per weight, plus one float32 scale per row.  The codes
live in a ``StoredWeight`` (``slimforge.plugins.api``): the site's module keeps its class and reads
its ``.weight`` as before (attention, Hugging Face Conv1D, embeddings, RNN gates and tied
embeddings all work), the dense tensor leaves the artifact, and ``restore_structure`` rebuilds empty
buffers of the recorded shapes before the artifact's tensors load.  Nothing here mimics a module's
shapes.

The plugin imports only ``slimforge.plugins.api``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimforge.plugins.api import (ConfigError, Family, Stage, StoredWeight, Technique, TechniqueContext, WeightSite,
                                   from_matrix, hookimpl, restore_stored_weights, site_order, store_weight,
                                   uncovered_parameters, weight_sites)

TRITS_PER_BYTE = 5  # 3**5 = 243 values fit in a byte: 8 / 5 = 1.6 bits per weight
FORMAT = "trits5"
THRESHOLD_RANGE = (0.3, 1.0)
_POWERS = torch.tensor([3 ** i for i in range(TRITS_PER_BYTE)], dtype=torch.int64)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Codes in {0, 1, 2} (flattened) -> ``ceil(n / 5)`` bytes, five base-3 digits per byte, least
    significant first; the last byte is padded with zeros."""
    flat = trits.flatten().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2):
        raise ValueError("trits must be 0, 1 or 2")
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % TRITS_PER_BYTE)]).view(-1, TRITS_PER_BYTE)
    return (flat * _POWERS).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``pack_trits``: the first ``count`` codes as int64."""
    values = packed.to(torch.int64).unsqueeze(1)
    return ((values // _POWERS.to(packed.device)) % 3).flatten()[:count]


def packed_trits_size(count: int) -> int:
    return math.ceil(count / TRITS_PER_BYTE)


def ternarize(matrix: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels in {-1, 0, 1}, per-row scale) of a logical ``out x in`` matrix."""
    magnitude = matrix.abs().to(torch.float32)
    delta = threshold * magnitude.mean(dim=1, keepdim=True)
    kept = magnitude > delta
    levels = torch.sign(matrix.to(torch.float32)) * kept
    scale = (magnitude * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)
    return levels.to(torch.int64), scale


class TernaryWeight(StoredWeight):
    """A site's weight as packed trits and one float32 scale per logical output row."""

    def __init__(self, site: WeightSite, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.site, self.dtype = site, dtype
        self.register_buffer("trits", torch.zeros(packed_trits_size(site.numel), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(site.out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_matrix(cls, site: WeightSite, matrix: torch.Tensor, threshold: float) -> TernaryWeight:
        levels, scale = ternarize(matrix.detach(), threshold)
        weight = cls(site, matrix.dtype, matrix.device)
        with torch.no_grad():
            weight.trits.copy_(pack_trits((levels + 1).cpu()))
            weight.scale.copy_(scale)
        weight.refresh()
        return weight

    def levels(self) -> torch.Tensor:
        """The {-1, 0, 1} matrix, ``out x in``."""
        codes = unpack_trits(self.trits, self.site.numel)
        return (codes - 1).view(self.site.out_features, self.site.in_features)

    def decode(self) -> torch.Tensor:
        matrix = (self.levels().to(torch.float32) * self.scale[:, None]).to(self.dtype)
        return from_matrix(matrix, self.site).contiguous()

    def spec(self) -> dict:
        # The shapes follow from the site itself; the format name lets a later version of this
        # plugin read artifacts written by this one.
        return {"format": FORMAT}

    @classmethod
    def empty(cls, site: WeightSite, spec: dict, like: torch.Tensor) -> TernaryWeight:
        if spec.get("format") != FORMAT:
            raise ValueError(f"unknown ternary storage format {spec.get('format')!r}; this version reads {FORMAT!r}")
        return cls(site, like.dtype, like.device)

    def extra_repr(self) -> str:
        return f"{self.site.out_features}x{self.site.in_features}, {FORMAT}"


@dataclass(frozen=True, kw_only=True)
class TernaryConfig:
    threshold: float = 0.7  # zero the weights below threshold * mean|w| of their row (TWN's 0.7)
    keep_ends: bool = True  # leave the first and last site the forward pass uses in float

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                THRESHOLD_RANGE[0] <= self.threshold <= THRESHOLD_RANGE[1]):
            raise ConfigError(f"ternary.threshold: must be a number in [{THRESHOLD_RANGE[0]}, {THRESHOLD_RANGE[1]}], "
                              f"got {self.threshold!r}")
        if not isinstance(self.keep_ends, bool):
            raise ConfigError(f"ternary.keep_ends: must be true or false, got {self.keep_ends!r}")


class Ternary(Technique):
    name = "ternary"
    family = Family.QUANTIZATION  # competes with the built-in quantizers: one quantizer per plan
    stage = Stage.QUANTIZATION  # a finishing step: applied to the fine-tuned model; needs no recovery
    Config = TernaryConfig
    description = "Ternary weights {-s, 0, +s} per output row on every weight site, stored at 1.6 bits per weight."
    # kmeans_clustering leaves codebook-derived weights; they are noted and left alone, so a plan
    # holding both would ternarize nothing the clustering touched: not worth a trial.
    cannot_follow = frozenset({"kmeans_clustering"})

    def suggest(self, space, task) -> TernaryConfig:
        return TernaryConfig(threshold=space.suggest_float("threshold", *THRESHOLD_RANGE, step=0.05),
                             keep_ends=space.suggest_categorical("keep_ends", [True, False]))

    def apply(self, model, config: TernaryConfig, ctx: TechniqueContext):
        model.eval()
        sites = weight_sites(model)
        order = site_order(model, ctx.task.example_inputs(), sites)
        ends = {order[0], order[-1]} if config.keep_ends and order else set()
        stored, code_bytes = 0, 0
        for name in order:
            site = sites[name]
            if site.is_derived(model):
                ctx.note(f"ternary: {name!r} is already computed by an earlier step's tensors; left as is")
            elif name in ends:
                ctx.note(f"ternary: {name!r} is the first or last weight the forward pass uses; kept in float (keep_ends)")
            else:
                store_weight(model, site, TernaryWeight.from_matrix(site, site.matrix(model), config.threshold), ctx)
                stored, code_bytes = stored + site.numel, code_bytes + packed_trits_size(site.numel)
        for name, shape in uncovered_parameters(model, sites).items():
            ctx.note(f"ternary: {name!r} {list(shape)} is not a weight matrix of a known layer kind; left in float32")
        if stored:
            ctx.note(f"ternary: {stored} weights in {len(ctx.structure.get('derived', {}))} site(s) stored as trits "
                     f"({code_bytes} B of codes at 1.6 bits/weight)")
        return model

    def restore_structure(self, model, config: TernaryConfig, example_inputs, structure):
        return restore_stored_weights(model, structure, self.name, TernaryWeight)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Ternary)
