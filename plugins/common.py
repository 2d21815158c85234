"""Pieces several built-in techniques share: layer discovery, module replacement, masks, bit packing,
and how integer weight codes are stored."""

from __future__ import annotations

import math

import torch
from torch import nn

from slimforge.core.artifact import encode_tensors
from slimforge.core.errors import ArtifactError
from slimforge.core.sites import _is_hf_conv1d
from slimforge.core.technique import Technique, TechniqueContext

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Plain Conv/Linear layers by qualified name: what most techniques compress."""
    return {name: m for name, m in model.named_modules() if type(m) in WEIGHT_LAYERS}


def replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- per-layer settings: a layer an earlier step split keeps the setting chosen for its parent ---

def setting_for(layer: str, settings: dict[str, float]):
    """The setting of ``layer`` or of its nearest named ancestor: a layer an earlier step split
    (low_rank turns ``fc1`` into ``fc1.0`` / ``fc1.1``) inherits the setting chosen for ``fc1``."""
    parts = layer.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in settings:
            return settings[name]
    return None


def unmatched_settings(settings: dict[str, float], layers: dict[str, nn.Module]) -> list[str]:
    """Configured names that are neither a weight layer nor an ancestor of one."""
    return [name for name in settings
            if not any(layer == name or layer.startswith(name + ".") for layer in layers)]


# --- masks: pruning and sparsity keep zeros through recovery training ---------------------------

def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], ctx: TechniqueContext) -> None:
    """Zero the masked weights now and remember the masks for ``reapply_masks``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            _zero_masked(modules[name].weight, mask)
    ctx.state.setdefault("masks", {}).update(masks)


def _zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> None:
    # masked_fill, not multiply: w * 0 is -0.0 for negative w, and the codec (which compares raw
    # bits so that -0.0 survives a round trip) would store those as nonzeros.
    weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0.0)


def reapply_masks(model: nn.Module, ctx: TechniqueContext) -> None:
    """After an optimizer step: zero the masked weights again (Adam moves them otherwise).

    A layer a later technique replaced (e.g. clustered) owns no ``weight`` Parameter any more; its
    zeros are kept by that technique, so it is skipped here."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in ctx.state.get("masks", {}).items():
            weight = getattr(modules.get(name), "weight", None)
            if isinstance(weight, nn.Parameter) and weight.shape == mask.shape:
                _zero_masked(weight, mask)


class MaskedTechnique(Technique):
    """Base for techniques whose constraint is a fixed mask (pruning, random and N:M sparsity):
    ``apply`` calls ``apply_masks``; recovery training re-imposes the masks after every step."""

    needs_recovery = True

    def after_optimizer_step(self, model: nn.Module, config, ctx: TechniqueContext) -> None:
        reapply_masks(model, ctx)


def keep_top(scores: torch.Tensor, fraction_zero: float) -> torch.Tensor:
    """Boolean mask keeping the highest scores; exactly round(fraction_zero * n) entries are False."""
    n_zero = int(round(fraction_zero * scores.numel()))
    flat = scores.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_zero:
        mask[torch.argsort(flat, stable=True)[:n_zero]] = False
    return mask.view_as(scores)


# --- bit packing: sub-byte codes (k-means indices, 4/2-bit weights) stored at their real width --

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (< 2**bits) into a flat uint8 tensor, ``8 // bits`` per byte
    for bits in {1, 2, 4, 8}, or as a little-endian bit stream for other widths (3, 5, 6, 7)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.flatten().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    bitstream = ((flat.unsqueeze(1) >> shifts) & 1).flatten()  # LSB first
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).view(-1, 8)
    return (bitstream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes as int64."""
    bitstream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).flatten()
    bitstream = bitstream[: count * bits].view(count, bits)
    return (bitstream << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``unpack_bits`` as uint8, vectorised per byte when ``bits`` divides 8 (a per-forward decode
    runs this every call; the generic bit-stream decoder builds int64 bit planes)."""
    if 8 % bits:
        return unpack_bits(packed.cpu(), bits, count).to(device=packed.device, dtype=torch.uint8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).flatten()[:count]


# --- code storage: how a layer's integer weight codes sit in its state_dict ----------------------
#
# Techniques that turn weights into integer codes (k-means indices, weight-only quantization levels)
# give an exactly-zero weight code 0.  Two storage forms, chosen per layer by the bytes the artifact
# codec actually writes for each (``choose_code_storage``):
#
# - ``uint8``: one byte per weight, in the weight's shape.  The codec stores only the nonzero codes
#   of a pruned layer (Deep Compression's relative indices, or a bitmask, whichever has fewer raw
#   bytes) and entropy-codes positions and codes as separate streams, so each surviving weight costs
#   about the entropy of its gap plus that of its code.  Dense layers win too when the code
#   histogram is skewed, since deflate's Huffman stage then codes each byte near its entropy.
# - ``packed``: ``bits`` per weight, bit-packed (``pack_bits``), then entropy-coded: best for dense
#   layers whose codes are near-uniform.  Zero codes still help here (a byte of all-zero codes is a
#   zero byte, which the codec's sparse layouts also skip), but less than in ``uint8``.
#
# Why not a third form with a packed bitmask and bit-packed nonzero codes: on LeNet-5 pruned to
# Deep Compression's densities (2-8 bits, both modes) it was at most 1.4 % smaller than the better
# of these two and often larger, and it would need the nonzero count recorded before the buffer
# could be rebuilt.

CODE_STORAGES = ("uint8", "packed")


def empty_code_buffer(weight_shape: tuple[int, ...], bits: int, storage: str,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The zero ``codes`` buffer a layer registers before its state_dict loads.  ``storage`` may come
    from an artifact header, so an unknown one is an ``ArtifactError``."""
    if storage not in CODE_STORAGES:
        raise ArtifactError(f"unknown code storage {storage!r}; valid choices: {', '.join(CODE_STORAGES)}")
    shape = tuple(weight_shape) if storage == "uint8" else (packed_size(math.prod(weight_shape), bits),)
    return torch.zeros(shape, dtype=torch.uint8, device=device)


def stored_codes(codes: torch.Tensor, bits: int, storage: str) -> torch.Tensor:
    """The ``codes`` buffer for integer ``codes`` (< 2**bits, in the weight's shape) in ``storage``."""
    return codes.to(torch.uint8) if storage == "uint8" else pack_bits(codes, bits)


def codes_from_stored(stored: torch.Tensor, bits: int, storage: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``stored_codes``: the codes as uint8, in the weight's shape."""
    if storage == "uint8":
        return stored.view(weight_shape)
    return unpack_codes(stored, bits, math.prod(weight_shape)).view(weight_shape)


def encoded_codes_size(codes: torch.Tensor, bits: int, storage: str) -> int:
    """Bytes the artifact codec writes for ``codes`` in ``storage``, plus a container of 100-200
    bytes that differs between the forms only by their shape and layout names in the header."""
    return len(encode_tensors({"codes": stored_codes(codes, bits, storage)}, {}))


def choose_code_storage(codes: torch.Tensor, bits: int) -> str:
    """The storage form the artifact codec makes smaller; ties keep ``uint8``.  Deterministic: the
    codec is.  At 8 bits the two forms are the same bytes, so ``uint8`` is taken without encoding."""
    if bits == 8:
        return "uint8"
    return min(CODE_STORAGES, key=lambda storage: encoded_codes_size(codes, bits, storage))


# --- shapes: structural techniques record layer shapes so artifacts rebuild the smaller model ---

RESIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def layer_shapes(model: nn.Module) -> dict[str, list[int] | dict]:
    """Weight shape of every resizable layer (JSON-friendly), for ``ctx.structure``.  Grouped
    convolutions (e.g. depthwise) also record their group count, which pruning changes."""
    shapes: dict[str, list[int] | dict] = {}
    for name, m in model.named_modules():
        if (type(m) in RESIZABLE or _is_hf_conv1d(m)) and getattr(m, "weight", None) is not None:
            groups = getattr(m, "groups", 1)
            shapes[name] = list(m.weight.shape) if groups == 1 else {"weight": list(m.weight.shape), "groups": groups}
    return shapes


def resize_layers(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Replace each named layer by a fresh one of the recorded weight shape (values come later,
    from the artifact).  Only the channel counts change; every other hyperparameter is kept."""
    modules = dict(model.named_modules())
    for name, recorded in shapes.items():
        old = modules[name]
        shape, groups = (recorded["weight"], recorded["groups"]) if isinstance(recorded, dict) else (recorded, 1)
        if list(old.weight.shape) == list(shape) and getattr(old, "groups", 1) == groups:
            continue
        has_bias = getattr(old, "bias", None) is not None
        if _is_hf_conv1d(old):  # stored (in, out); transformers' Conv1D(nf, nx) always has a bias
            new = type(old)(shape[1], shape[0])
        elif isinstance(old, nn.Linear):
            new = nn.Linear(shape[1], shape[0], bias=has_bias)
        elif isinstance(old, (nn.Conv1d, nn.Conv2d)):
            new = type(old)(shape[1] * groups, shape[0], old.kernel_size, stride=old.stride, padding=old.padding,
                            dilation=old.dilation, groups=groups, bias=has_bias, padding_mode=old.padding_mode)
        else:  # BatchNorm
            new = type(old)(shape[0], eps=old.eps, momentum=old.momentum, affine=old.affine,
                            track_running_stats=old.track_running_stats)
        replace_module(model, name, new)
    return model
