"""Pieces several built-in techniques share: layer discovery, module replacement, masks, bit packing,
and how integer weight codes are stored."""

from __future__ import annotations

import math

import torch
from torch import nn

from slimforge.core.artifact import encode_tensors
from slimforge.core.errors import ArtifactError, PluginError
from slimforge.core.sites import WeightSite, is_hf_conv1d, from_matrix, uncovered_parameters, weight_sites
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
#
# A mask is keyed by the weight site it constrains (``WeightSite.name``: ``"fc.weight"``,
# ``"encoder.layers.0.self_attn.in_proj_weight"``, ``"rnn.weight_hh_l0"``) and shaped like the
# site's *stored* tensor, which is what it zeroes: a Hugging Face Conv1D's mask is (in, out) like its
# weight.  Techniques whose pattern has a direction (N:M groups along the input dimension) compute
# it on the logical ``out x in`` matrix (``site.matrix``) and convert it with ``site_mask``.  A
# module name is accepted as a key too and means that module's ``weight`` (the key masks had
# before sites, and a weight site's ``setting_key``), as is any place of a tied tensor: tied
# places are one tensor, so one mask holds for all of them.

def _mask_key(key: str) -> tuple[tuple[str, str], ...]:
    """(module, parameter) readings of a mask key: a site name, or a module name for its weight."""
    module, _, param = key.rpartition(".")
    return ((module, param), (key, "weight"))


def _masked_parameter(model: nn.Module, key: str) -> nn.Parameter | None:
    """The plain Parameter a mask key names, or None: a weight a later technique re-expressed
    (``derive_weight``, or a replaced module without ``weight``) holds no Parameter to zero."""
    for module, param in _mask_key(key):
        try:
            owner = model.get_submodule(module) if module else model
        except AttributeError:
            continue
        tensor = owner._parameters.get(param)  # not getattr: a parametrized weight is computed
        if isinstance(tensor, nn.Parameter):
            return tensor
    return None


def _site_names(sites: dict[str, WeightSite]) -> dict[str, str]:
    """Every key a mask may be given under -> the site it names."""
    names = {}
    for name, site in sites.items():
        for place in (name, *site.tied):
            names[place] = name
            if place.endswith(".weight"):
                names.setdefault(place.removesuffix(".weight"), name)
    return names


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], ctx: TechniqueContext) -> None:
    """Zero the masked weights now and remember the masks for ``reapply_masks``.

    ``masks`` maps a site (its name, a module name for a module's ``weight``, or any place of a tied
    tensor) to a boolean mask shaped like the stored tensor; True keeps a weight.  The masks are
    remembered under the site names, once per tensor."""
    sites = weight_sites(model)
    names = _site_names(sites)
    by_site: dict[str, torch.Tensor] = {}
    for key, mask in masks.items():
        if key not in names:
            raise KeyError(f"mask for {key!r}: no weight site of that name; sites: {', '.join(sites)}")
        name = names[key]
        weight = _masked_parameter(model, name)
        if weight is None:
            raise PluginError(f"mask for {key!r}: {name!r} is computed by an earlier technique, not a "
                              f"Parameter a mask can zero (skip derived sites: plugins.common.mask_sites)")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask for {key!r} has shape {tuple(mask.shape)}; the stored weight {name!r} is "
                             f"{tuple(weight.shape)} (masks are in the stored layout: plugins.common.site_mask)")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        by_site[name] = by_site[name] & mask if name in by_site else mask  # two keys, one tensor: both hold
    with torch.no_grad():
        for name, mask in by_site.items():
            _zero_masked(_masked_parameter(model, name), mask)
    ctx.state.setdefault("masks", {}).update(by_site)


def _zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> None:
    # masked_fill, not multiply: w * 0 is -0.0 for negative w, and the codec (which compares raw
    # bits so that -0.0 survives a round trip) would store those as nonzeros.
    weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0.0)


def reapply_masks(model: nn.Module, ctx: TechniqueContext) -> None:
    """After an optimizer step: zero the masked weights again (Adam moves them otherwise).

    A weight a later technique re-expressed (e.g. clustered: a parametrization or a replaced module)
    owns no Parameter any more; its zeros are kept by that technique, so it is skipped here.  Keys
    are resolved by name each step (no site discovery), so this costs one lookup per mask."""
    with torch.no_grad():
        for name, mask in ctx.state.get("masks", {}).items():
            weight = _masked_parameter(model, name)
            if weight is not None and weight.shape == mask.shape:
                _zero_masked(weight, mask)


class MaskedTechnique(Technique):
    """Base for techniques whose constraint is a fixed mask (pruning, random and N:M sparsity):
    ``apply`` calls ``apply_masks`` (usually on ``mask_sites``); recovery training re-imposes the
    masks after every step."""

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


# --- mask sites: which weights the mask techniques constrain, and their per-site settings --------
#
# Every weight site of ``core.sites`` can carry a mask: Conv/Linear, HF Conv1D, the packed
# in_proj_weight of nn.MultiheadAttention, Embedding tables (a tied input/output embedding is one
# site) and RNN weight_ih/hh.  Not searched by default: *position* embeddings.  They are small (GPT-2
# small's wpe is 0.6 % of its weights, BERT-base's 0.4 %), so a density dimension for them buys the
# search almost nothing, while every token at a position reads its row; a config that names one (or
# a default_sparsity) still prunes it.

def site_mask(site: WeightSite, logical: torch.Tensor) -> torch.Tensor:
    """A mask computed on the logical ``out x in`` matrix, in the site's stored layout (the form
    ``apply_masks`` takes): transposed back for a HF Conv1D, reshaped to the kernel for a Conv."""
    return from_matrix(logical, site).contiguous()


def site_label(site: WeightSite) -> str:
    """How notes name a site: ``layer 'fc1'`` for a module's weight, ``weight 'rnn.weight_hh_l0'``
    for the others."""
    return f"layer {site.setting_key!r}" if site.param == "weight" else f"weight {site.name!r}"


def mask_sites(model: nn.Module, ctx: TechniqueContext | None = None, technique: str = "") -> dict[str, WeightSite]:
    """The sites a mask can constrain now, by name, in module order: every weight site whose
    stored tensor is a plain float Parameter.  With ``ctx``, notes (prefixed ``technique``) each
    site an earlier technique re-expressed and each >=2-D parameter that is no site (a bare learned
    position tensor, say), since both stay dense."""
    sites = weight_sites(model)
    usable = {}
    for name, site in sites.items():
        weight = _masked_parameter(model, name)
        if weight is not None and weight.is_floating_point():
            usable[name] = site
        elif ctx is not None:
            ctx.note(f"{technique}: {site_label(site)} is already re-expressed by an earlier technique "
                     f"(not a plain float weight); no mask, left as it is")
    if ctx is not None:
        for name, shape in uncovered_parameters(model, sites).items():
            ctx.note(f"{technique}: parameter {name!r} ({'x'.join(map(str, shape))}) is no weight site "
                     f"(a bare tensor its module reads directly); left dense")
    return usable


def density_sites(model: nn.Module) -> dict[str, WeightSite]:
    """The sites whose density the unstructured techniques search (``density.<setting_key>``):
    every maskable site except position embeddings (see above)."""
    return {name: site for name, site in mask_sites(model).items() if site.role != "position_embedding"}


def site_setting_keys(sites: dict[str, WeightSite]) -> list[str]:
    """Every key a per-site setting may be made under: each site's ``setting_key`` and the keys of
    the places tied to it (a setting for ``lm_head`` is one for the tied ``wte``)."""
    keys = []
    for site in sites.values():
        keys.append(site.setting_key)
        keys.extend(place.removesuffix(".weight") if place.endswith(".weight") else place for place in site.tied)
    return keys


def site_setting(site: WeightSite, settings: dict[str, float]):
    """The setting made for ``site``, under its ``setting_key`` or a tied place's, or for a named
    ancestor of either (``setting_for``); None when there is none."""
    for key in site_setting_keys({site.name: site}):
        value = setting_for(key, settings)
        if value is not None:
            return value
    return None


# The search samples *density* (fraction kept) log-uniformly: compression lives at high sparsity,
# and a uniform sparsity prior would spend most trials on sizes no budget accepts.
DENSITY_RANGE = (0.02, 1.0)  # per site (per-layer knobs)
GLOBAL_DENSITY_RANGE = (0.01, 1.0)  # the element-weighted density of the whole model (global knobs)
# Allocation temperature: 0 prunes every site alike; at 1-2 the sites whose pruning alone costs
# most validation accuracy (``core.sensitivity``) keep most of their weights.
ALLOCATION_RANGE = (0.0, 2.0)


def suggest_site_sparsity(space, task) -> dict[str, float]:
    """The per-site sparsity an unstructured mask technique searches, over ``density_sites`` of the
    task's teacher.  Global knobs (the search's default, ``core.space.per_layer_knobs``): a target
    density for the whole model (``density``) and an allocation temperature (``allocation``) that
    ``core.sensitivity.allocate_density`` spreads over the sites by their measured sensitivity.
    Per-layer knobs: one density per site (``density.<setting_key>``), log-uniform in ``DENSITY_RANGE``."""
    from slimforge.core.sensitivity import allocate_density, sensitivity_of
    from slimforge.core.space import per_layer_knobs

    sites = density_sites(task.teacher)
    if per_layer_knobs(space):
        return {site.setting_key: round(1.0 - space.suggest_float(f"density.{site.setting_key}", *DENSITY_RANGE,
                                                                  log=True), 3)
                for site in sites.values()}
    density = space.suggest_float("density", *GLOBAL_DENSITY_RANGE, log=True)
    temperature = space.suggest_float("allocation", *ALLOCATION_RANGE)
    allocated = allocate_density(sensitivity_of(task), [site.setting_key for site in sites.values()],
                                 density, temperature)
    return {key: round(1.0 - kept, 4) for key, kept in allocated.items()}


# Global bit-width knobs (``suggest_site_bits``): the element-weighted mean width the sampler
# picks, in half-bit steps so that neighbouring trials differ by a real step, not float noise.
MEAN_BITS_STEP = 0.5


def suggest_site_bits(space, task, sites: dict[str, WeightSite], choices: tuple[int, ...],
                      per_site_choices=None) -> dict[str, int]:
    """Bit widths for ``sites`` (by ``setting_key``).  Global knobs (the search's default): a mean
    width ``bits`` (element-weighted, in ``[min(choices), max(choices)]``) and an allocation
    temperature ``allocation``, spread over the sites by their measured quantization sensitivity
    (``core.sensitivity.allocate_bits``: sensitive sites get wider codes).  Per-layer knobs: one
    ``bits.<setting_key>`` per site, from ``per_site_choices(site)`` (default ``choices``) as an
    integer range when the choices are contiguous, else a categorical."""
    from slimforge.core.sensitivity import allocate_bits, sensitivity_of
    from slimforge.core.space import per_layer_knobs

    if per_layer_knobs(space):
        bits = {}
        for site in sites.values():
            options = tuple(per_site_choices(site)) if per_site_choices else tuple(choices)
            contiguous = list(options) == list(range(min(options), max(options) + 1))
            bits[site.setting_key] = (space.suggest_int(f"bits.{site.setting_key}", min(options), max(options))
                                      if contiguous else space.suggest_categorical(f"bits.{site.setting_key}",
                                                                                   list(options)))
        return bits
    mean = space.suggest_float("bits", float(min(choices)), float(max(choices)), step=MEAN_BITS_STEP)
    temperature = space.suggest_float("allocation", *ALLOCATION_RANGE)
    return allocate_bits(sensitivity_of(task), [site.setting_key for site in sites.values()], mean, temperature,
                         tuple(choices))


def note_unmatched_sites(model: nn.Module, settings: dict, ctx: TechniqueContext, technique: str) -> None:
    """A note for each configured name that is no weight site (nor an ancestor of one) of ``model``."""
    for name in unmatched_settings(settings, dict.fromkeys(site_setting_keys(weight_sites(model)))):
        ctx.note(f"{technique}: layer {name!r} not found in the model; ignored")


def site_sparsity(site: WeightSite, config, ctx: TechniqueContext, technique: str) -> float:
    """The sparsity an unstructured mask technique's ``config`` (``sparsity`` per site,
    ``default_sparsity``) sets for ``site``.  A position embedding is not searched, so without a
    setting of its own it stays dense, and the notes say so."""
    value = site_setting(site, config.sparsity)
    if value is not None:
        return value
    if site.role == "position_embedding" and not config.default_sparsity:
        ctx.note(f"{technique}: position embedding {site_label(site)} left dense: not searched "
                 f"(a small table every token reads); name it in sparsity to prune it")
    return config.default_sparsity


# --- bit packing: sub-byte codes (k-means indices, 4/2-bit weights) stored at their real width --

# Codes packed / unpacked per chunk: the bit planes are int64, 8 bytes per bit of every code, so a
# whole LM head at once (6M codes at 4 bits) would take 400 MB of temporaries.  A multiple of 8
# codes is a whole number of bytes at any width, so chunks pack to exactly the bytes of one pass.
_PACK_CHUNK = 1 << 18


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (< 2**bits) into a flat uint8 tensor, ``8 // bits`` per byte
    for bits in {1, 2, 4, 8}, or as a little-endian bit stream for other widths (3, 5, 6, 7)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.flatten()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    chunks = []
    for start in range(0, flat.numel(), _PACK_CHUNK):
        part = flat[start:start + _PACK_CHUNK].to(torch.int64)
        bitstream = ((part.unsqueeze(1) >> shifts) & 1).flatten()  # LSB first
        pad = (-bitstream.numel()) % 8
        bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).view(-1, 8)
        chunks.append((bitstream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes as int64."""
    chunks = []
    for start in range(0, count, _PACK_CHUNK):
        n = min(_PACK_CHUNK, count - start)
        first = start * bits // 8  # a whole byte: start is a multiple of 8
        part = packed[first:first + packed_size(n, bits)].to(torch.int64)
        bitstream = ((part.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).flatten()
        bitstream = bitstream[: n * bits].view(n, bits)
        chunks.append((bitstream << torch.arange(bits, dtype=torch.int64)).sum(dim=1))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)


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


# --- code storage on weight sites: which form a site's codes take, and in which order sites run -----
#
# Code-storing techniques (weight_only_quant, kmeans_clustering) give a site one of two forms:
# a *replacement module* for a plain Conv/Linear that is only ever called (its artifact bytes are
# those written before weight sites existed), or a ``core.sites.DerivedWeight`` everywhere else
# (a parent reads ``.weight``, Hugging Face Conv1D, Embedding, RNN flat weights, tied weights).

def replaceable_layer(model: nn.Module, site, padding_modes: tuple[str, ...] | None = ("zeros",)) -> bool:
    """True when ``site`` may keep the replacement-module form: the weight of a plain
    nn.Linear / nn.Conv1d / nn.Conv2d (exact types: nn.MultiheadAttention's ``out_proj`` is a Linear
    subclass that its parent reads by attribute), zero padding, not tied to another place, not
    already derived by an earlier step, with a ``padding_mode`` in ``padding_modes`` (None: any; a
    replacement module that pads by itself passes None), and not held by a torch.nn layer other than a container:
    those read their children's tensors (nn.TransformerEncoderLayer checks ``linear1.weight`` for
    its fast path), where a user's or library's module calls them."""
    owner = site.owner(model)
    parent = model.get_submodule(site.module.rpartition(".")[0]) if site.module else None
    parent_reads = (parent is not None and type(parent).__module__.startswith("torch.nn")
                    and not isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))
    return (site.param == "weight" and type(owner) in WEIGHT_LAYERS and not site.tied and not site.is_derived(model)
            and (padding_modes is None or getattr(owner, "padding_mode", "zeros") in padding_modes)
            and not parent_reads)


def first_calls(model: nn.Module, example_inputs, modules: dict[str, nn.Module]) -> dict[str, int]:
    """``{name: rank}`` of the ``modules`` one eval forward pass on ``example_inputs`` calls, in the
    order it first calls them (registration order says nothing about which layer sees the input
    first)."""
    called: dict[str, int] = {}

    def hook(name):
        def record(_module, _inputs):  # returns None: a pre-hook's return value replaces the inputs
            called.setdefault(name, len(called))
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model.eval()(*(t.to(device) for t in example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return called


def site_order(model: nn.Module, example_inputs, sites: dict | None = None) -> list[str]:
    """Site names in the order the forward pass first uses them.  A site is used when its module
    (or, for a module its parent only reads, e.g. nn.MultiheadAttention's ``out_proj``, the nearest
    ancestor) is called; a tied site at the first of its places.  Sites never used go last."""
    from slimforge.core.sites import weight_sites  # here, not at the top: only this section needs it

    sites = weight_sites(model) if sites is None else sites
    called = first_calls(model, example_inputs, dict(model.named_modules(remove_duplicate=False)))

    def first_use(place: str) -> float:
        module = place.rpartition(".")[0]
        while module:  # the root is called for every site: it says nothing of the order
            if module in called:
                return called[module]
            module = module.rpartition(".")[0]
        return math.inf

    uses = {name: min(first_use(p) for p in (name, *site.tied)) for name, site in sites.items()}
    return sorted(sites, key=lambda name: uses[name])  # stable: never-used sites keep module order


# --- shapes: structural techniques record layer shapes so artifacts rebuild the smaller model ---

RESIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def layer_shapes(model: nn.Module) -> dict[str, list[int] | dict]:
    """Weight shape of every resizable layer (JSON-friendly), for ``ctx.structure``.  Grouped
    convolutions (e.g. depthwise) also record their group count, which pruning changes."""
    shapes: dict[str, list[int] | dict] = {}
    for name, m in model.named_modules():
        if (type(m) in RESIZABLE or is_hf_conv1d(m)) and getattr(m, "weight", None) is not None:
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
        if is_hf_conv1d(old):  # stored (in, out); transformers' Conv1D(nf, nx) always has a bias
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
