"""GPTQ: weight-only 2-8-bit quantization with second-order error compensation, per weight site.

Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers".  For each weight matrix ``W`` (``out x in``) and the Hessian
``H = 2 X^T X`` of its layer-wise squared error on calibration inputs ``X``
(``plugins.oneshot.calibration``, gathered block by block so each layer sees the outputs of the
already-quantized layers before it), the columns are quantized one at a time and the rounding
error of each is spread over the columns not yet quantized, weighted by the inverse Hessian
(Optimal Brain Surgeon's update).  This is the paper's lazy-batch Cholesky form: ``H^-1`` is
replaced by the upper Cholesky factor of ``(H + lambda I)^-1``, updates are applied inside blocks
of 128 columns and to the rest of the matrix once per block.  Knobs: ``bits`` (per site or
``default_bits``), ``group_size`` (input columns sharing one scale per row; 0 = one per row),
``damping`` (lambda as a fraction of the mean diagonal of H, the paper's 1 %), ``act_order``
(columns in decreasing ``diag(H)``, with the groups' scales fixed beforehand on the stored column
order -- "static groups" -- so the stored layout does not depend on the order).

The grid is ``weight_only_quant``'s (``plugins.quantization.weight_only.quantize_rows``, applied
per group): per-row symmetric or asymmetric affine levels with a clipping search and
bfloat16-exact scales, codes relative to the zero point so that a 0.0 weight is code 0, stored in
the smaller of packed / uint8 form (``plugins.common.choose_code_storage``).  So round-to-nearest
and GPTQ at the same bits and group size write the same bytes' worth of codes; only the rounding
differs.  A weight that is exactly 0.0 before (pruned by sparsegpt / wanda / magnitude) stays 0.0:
its code is forced to the zero point and its error compensated like any other.

Every site kind is quantized: Linear, Conv (unfolded patches), Hugging Face Conv1D,
nn.MultiheadAttention's in_proj_weight and out_proj.  Sites whose inputs calibration cannot catch
(Embedding tables: a lookup; RNN weights; cross-attention in_proj) are rounded to nearest on the
same grid, with a note.  A site an earlier step re-expressed, or a parameter that is no site, is
left as it is, with a note.  Storage: ``GroupQuantizedWeight`` through the storage hook (codes,
scales and zero points are the artifact's bytes); compute stays float32 (dequantized once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import WeightSite, uncovered_parameters, weight_sites
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.api import StoredWeight, restore_stored_weights, store_weight
from slimforge.plugins.common import (choose_code_storage, codes_from_stored, empty_code_buffer, setting_for,
                                      site_label, site_order, stored_codes, suggest_site_bits)
from slimforge.plugins.oneshot.calibration import calibration_inputs, compress_sequentially
from slimforge.plugins.quantization.weight_only import SCALE_METHODS, quantize_rows

BIT_RANGE = (2, 8)
BIT_CHOICES = (2, 3, 4, 8)  # per-layer knobs sample these; a config may name any width in BIT_RANGE
GROUP_SIZES = (0, 32, 128)  # searched; 0 = one scale per output row
BLOCK_COLUMNS = 128  # the lazy-batch block of the paper


@dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    bits: dict[str, int] = field(default_factory=dict)  # site setting_key -> bit width
    default_bits: int = 4
    group_size: int = 128  # input columns per scale; 0 = one scale per row
    damping: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = False
    symmetric: bool = True
    scale_method: str = "mse"  # how each group's range is chosen (weight_only_quant's: clipping search or min/max)
    calibration_samples: int = 128
    calibration_batch_size: int = 32

    def __post_init__(self) -> None:
        for key, value in {**self.bits, "default_bits": self.default_bits}.items():
            if isinstance(value, bool) or not isinstance(value, int) or not BIT_RANGE[0] <= value <= BIT_RANGE[1]:
                raise ConfigError(f"gptq.bits[{key!r}]: must be an int in {BIT_RANGE[0]}..{BIT_RANGE[1]}, got {value!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"gptq.group_size: must be an int >= 0 (0 = one scale per row), got {self.group_size!r}")
        if not isinstance(self.damping, (int, float)) or not 0.0 < self.damping <= 1.0:
            raise ConfigError(f"gptq.damping: must be in (0, 1] (a fraction of the mean Hessian diagonal), "
                              f"got {self.damping!r}")
        for flag in ("act_order", "symmetric"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"gptq.{flag}: must be true or false, got {getattr(self, flag)!r}")
        if self.scale_method not in SCALE_METHODS:
            raise ConfigError(f"gptq.scale_method: unknown {self.scale_method!r}; valid choices: "
                              f"{', '.join(SCALE_METHODS)}")
        for count in ("calibration_samples", "calibration_batch_size"):
            value = getattr(self, count)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"gptq.{count}: must be an int >= 1, got {value!r}")


# --- the grid: weight_only_quant's, per group of input columns -------------------------------------

def group_columns(columns: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or all of them for 0 or a group wider than the row."""
    return group_size if 0 < group_size < columns else columns


def group_grid(matrix: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               scale_method: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group of input columns: ``(scale, zero_point)``, each ``(out, groups)``, from
    weight_only_quant's per-row grid search on each group's columns."""
    width = group_columns(matrix.shape[1], group_size)
    scales, zeros = [], []
    for start in range(0, matrix.shape[1], width):
        _, scale, zero = quantize_rows(matrix[:, start:start + width], bits, symmetric, scale_method)
        scales.append(scale)
        zeros.append(zero)
    return torch.stack(scales, dim=1), torch.stack(zeros, dim=1)


def per_column(values: torch.Tensor, columns: int, group_size: int) -> torch.Tensor:
    """A per-(row, group) tensor expanded to one entry per (row, column)."""
    return values.repeat_interleave(group_columns(columns, group_size), dim=1)[:, :columns]


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Absolute grid levels of ``w`` (broadcasting with ``scale`` and ``zero``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def without_dead_inputs(W: torch.Tensor, hessian: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``hessian`` in float32 (a copy unless ``in_place``) whose all-zero inputs (they multiply
    nothing in calibration) get diagonal 1, their columns of ``W`` zeroed in place: the reference
    implementations' rule."""
    H = hessian.to(device=W.device, dtype=torch.float32)
    H = H if in_place and H.data_ptr() == hessian.data_ptr() else H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return H


def inverse_hessian_factor(H: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of ``(H + lambda I)^-1`` with ``lambda = damping * mean(diag H)``,
    and the damping used: one that leaves the matrix not positive definite is retried 10x larger."""
    if not torch.isfinite(H).all():
        raise torch.linalg.LinAlgError("the calibration Hessian holds NaN or inf: the site's inputs overflowed "
                                       "or the model computes NaN on the calibration data")
    diagonal = torch.diag(H).clone()
    used = damping
    # Damped in place on the diagonal (no identity matrix, no damped copy): on a 2560-column
    # Hessian each extra full matrix is 26 MB of peak memory.
    while used <= 1e3:
        H.diagonal().copy_(diagonal + used * diagonal.mean())
        factor, info = torch.linalg.cholesky_ex(H)
        if not info:
            inverse = torch.cholesky_inverse(factor)
            del factor  # one matrix fewer alive at the peak
            inverse, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                H.diagonal().copy_(diagonal)
                return inverse, used
        used *= 10
    H.diagonal().copy_(diagonal)
    raise torch.linalg.LinAlgError("the calibration Hessian stays singular after damping")


def gptq_quantize(matrix: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int, symmetric: bool,
                  damping: float, act_order: bool, scale_method: str = "mse", block_columns: int = BLOCK_COLUMNS,
                  consume_hessian: bool = False):
    """GPTQ on one ``out x in`` matrix: ``(absolute codes uint8, scale, zero_point, damping used)``.

    ``hessian`` None: round to nearest on the same grid.  Exact zeros of ``matrix`` stay zero.
    A Hessian that is not positive definite after damping is retried with 10x the damping.
    ``consume_hessian``: the caller is done with ``hessian``, which is then changed in place
    instead of copied (dead inputs get diagonal 1): one Hessian less of peak memory."""
    W = matrix.detach().to(torch.float32).clone()
    columns = W.shape[1]
    pruned = W == 0
    scale, zero = group_grid(W, bits, group_size, symmetric, scale_method)
    # The group of every column, not scales expanded per weight: this runs on the largest matrices
    # of a model, and a per-weight copy would cost 4 bytes a weight (peak memory, benchmarks/one_shot.py).
    group = torch.arange(columns, device=W.device) // group_columns(columns, group_size)
    zero_f = zero.to(torch.float32)
    if hessian is None:
        codes = torch.empty(W.shape, dtype=torch.uint8, device=W.device)
        for g in range(scale.shape[1]):
            cols = group == g
            codes[:, cols] = torch.where(pruned[:, cols], zero_f[:, g:g + 1],
                                         round_to_grid(W[:, cols], scale[:, g:g + 1], zero_f[:, g:g + 1],
                                                       bits)).to(torch.uint8)
        return codes, scale, zero, 0.0
    H = without_dead_inputs(W, hessian, in_place=consume_hessian)
    order = None
    if act_order:  # permuted copies only when the order changes: each is a copy of the matrix
        order = torch.argsort(torch.diag(H), descending=True)
        W, H, pruned, group = W[:, order], H[order][:, order], pruned[:, order], group[order]
    inverse, used = inverse_hessian_factor(H, damping)
    del H
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)  # levels < 2**8, cast on assignment
    for start in range(0, columns, block_columns):
        end = min(start + block_columns, columns)
        block, block_inverse = W[:, start:end].clone(), inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            j, g = start + i, int(group[start + i])
            w, s, z = block[:, i], scale[:, g], zero_f[:, g]
            q = torch.where(pruned[:, j], z, round_to_grid(w, s, z, bits))
            codes[:, j] = q
            error = (w - (q - z) * s) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        W[:, end:] -= errors @ inverse[start:end, end:]
    return (codes if order is None else codes[:, torch.argsort(order)]), scale, zero, used


# --- storage ------------------------------------------------------------------------------------

class GroupQuantizedWeight(StoredWeight):
    """A site's weight from ``bits``-bit codes with one scale (and, asymmetric, one zero point)
    per row and group of ``group_size`` input columns of its logical ``out x in`` matrix.

    Buffers: ``relative_codes`` (level minus zero point mod 2**bits, so 0.0 is code 0; packed or
    uint8 as ``plugins.common.choose_code_storage`` picks), ``scale`` ``(out, groups)``,
    ``zero_point`` ``(out, groups)`` uint8 when asymmetric."""

    def __init__(self, site: WeightSite, bits: int, group_size: int, symmetric: bool, storage: str,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.bits, self.group_size, self.symmetric, self.storage = bits, group_size, symmetric, storage
        self.stored_shape, self.transposed, self.dtype = tuple(site.shape), site.transposed, dtype
        self.matrix_shape = (site.out_features, site.in_features)
        groups = math.ceil(site.in_features / group_columns(site.in_features, group_size))
        self.register_buffer("relative_codes", empty_code_buffer(self.matrix_shape, bits, storage, device))
        self.register_buffer("scale", torch.ones(site.out_features, groups, dtype=torch.float32, device=device))
        if not symmetric:
            self.register_buffer("zero_point", torch.zeros(site.out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_codes(cls, site: WeightSite, absolute: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int, symmetric: bool, like: torch.Tensor) -> GroupQuantizedWeight:
        """Built from absolute grid levels (``out x in``) and the per-group ``scale`` / ``zero``."""
        relative = torch.empty_like(absolute, dtype=torch.uint8, device="cpu")
        width = group_columns(absolute.shape[1], group_size)
        for g, start in enumerate(range(0, absolute.shape[1], width)):  # per group: no per-weight zero copy
            part = absolute[:, start:start + width].to(torch.int16) - zero[:, g:g + 1].to(torch.int16)
            relative[:, start:start + width] = (part % (1 << bits)).cpu()
        storage = choose_code_storage(relative, bits)
        weight = cls(site, bits, group_size, symmetric, storage, like.dtype, like.device)
        values = {"relative_codes": stored_codes(relative, bits, storage), "scale": scale}
        if not symmetric:
            values["zero_point"] = zero.to(torch.uint8)
        with torch.no_grad():
            for buffer, value in values.items():
                getattr(weight, buffer).copy_(value)
        return weight

    def decode(self) -> torch.Tensor:
        columns = self.matrix_shape[1]
        codes = codes_from_stored(self.relative_codes, self.bits, self.storage, self.matrix_shape).to(torch.int16)
        zero = (per_column(self.zero_point, columns, self.group_size).to(torch.int16) if not self.symmetric
                else 1 << (self.bits - 1))
        levels = ((codes + zero) & ((1 << self.bits) - 1)) - zero
        matrix = (levels.to(torch.float32) * per_column(self.scale, columns, self.group_size)).to(self.dtype)
        return matrix.t().contiguous() if self.transposed else matrix.reshape(self.stored_shape)

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "storage": self.storage}

    @classmethod
    def empty(cls, site: WeightSite, spec: dict[str, Any], like: torch.Tensor) -> GroupQuantizedWeight:
        return cls(site, int(spec["bits"]), int(spec["group_size"]), bool(spec["symmetric"]), spec["storage"],
                   like.dtype, like.device)


# --- the technique ------------------------------------------------------------------------------

def quantizable_sites(model: nn.Module, technique: str, ctx: TechniqueContext) -> dict[str, WeightSite]:
    """Every weight site a quantizer may store codes for, by name; notes the derived sites (an
    earlier step's tensors) and the parameters no site covers."""
    sites = weight_sites(model)
    chosen = {}
    for name, site in sites.items():
        if site.is_derived(model):
            ctx.note(f"{technique}: {site_label(site)} is already computed by an earlier step's tensors; left as is")
        else:
            chosen[name] = site
    for name, shape in uncovered_parameters(model, sites).items():
        ctx.note(f"{technique}: {name!r} {list(shape)} is not a weight matrix of a known layer kind; left in float32")
    return chosen


def suggest_bits(space, task, choices: tuple[int, ...]) -> dict[str, int]:
    """Per-site bit widths over the teacher's sites in forward order (``suggest_site_bits``)."""
    teacher = task.teacher
    sites = weight_sites(teacher)
    order = site_order(teacher, task.example_inputs(), sites)
    return suggest_site_bits(space, task, {sites[name].setting_key: sites[name] for name in order}, choices)


class GPTQ(Technique):
    name = "gptq"
    description = ("GPTQ one-shot weight-only 2-8-bit quantization with Hessian error compensation from "
                   "calibration data, layer by layer; group scales; codes bit-packed; no fine-tuning.")
    family, stage, Config = Family.QUANTIZATION, Stage.QUANTIZATION, GPTQConfig
    requires = frozenset({"calibration_data"})  # one-shot: no needs_recovery
    # k-means leaves codebook-derived weights; quantizing them would undo the sharing.
    cannot_follow = frozenset({"kmeans_clustering"})

    def suggest(self, space, task) -> GPTQConfig:
        bits = suggest_bits(space, task, BIT_CHOICES)
        return GPTQConfig(bits=bits, group_size=space.suggest_categorical("group_size", list(GROUP_SIZES)),
                          damping=space.suggest_float("damping", 0.001, 0.1, log=True),
                          act_order=space.suggest_categorical("act_order", [False, True]),
                          symmetric=space.suggest_categorical("symmetric", [True, False]))

    def apply(self, model: nn.Module, config: GPTQConfig, ctx: TechniqueContext) -> nn.Module:
        model.eval()
        sites = quantizable_sites(model, self.name, ctx)
        if not sites:
            return model
        device = next(model.parameters()).device
        inputs = calibration_inputs(ctx.task, config.calibration_samples, config.calibration_batch_size,
                                    ctx.seed, device)

        def quantize(site: WeightSite, stats, why: str) -> None:
            configured = setting_for(site.setting_key, config.bits)
            bits = config.default_bits if configured is None else configured
            if stats is None:
                ctx.note(f"gptq: {site_label(site)}: {why}; rounded to nearest on the same grid (no error compensation)")
            matrix = site.matrix(model)
            try:
                codes, scale, zero, used = gptq_quantize(matrix, None if stats is None else stats.hessian, bits,
                                                         config.group_size, config.symmetric, config.damping,
                                                         config.act_order, config.scale_method,
                                                         consume_hessian=True)  # used once: see compress_sequentially
            except torch.linalg.LinAlgError as exc:
                raise torch.linalg.LinAlgError(f"gptq: {site_label(site)}: {exc}") from None
            if stats is not None and used != config.damping:
                ctx.note(f"gptq: {site_label(site)}: Hessian needed damping {used:g} to be positive definite")
            weight = GroupQuantizedWeight.from_codes(site, codes, scale, zero, bits, config.group_size,
                                                     config.symmetric, site.tensor(model))
            store_weight(model, site, weight, ctx)

        compress_sequentially(model, sites, inputs, quantize)
        return model

    def restore_structure(self, model, config: GPTQConfig, example_inputs, structure) -> nn.Module:
        return restore_stored_weights(model, structure, self.name, GroupQuantizedWeight)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(GPTQ)
