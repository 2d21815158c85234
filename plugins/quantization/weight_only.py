"""Weight-only affine quantization at 2-8 bits, bit width searched per weight site (mixed precision).

Every weight site (``core.sites``: Conv, Linear, nn.MultiheadAttention's packed ``in_proj_weight``
and its ``out_proj``, Hugging Face ``Conv1D``, Embedding tables, RNN ``weight_ih/hh``) is quantized
per *logical* output row of its ``out x in`` matrix, ``q = clamp(round(w / s) + z, 0, 2**b - 1)``:
an output channel for Conv/Linear, a logical output channel for Conv1D (its stored ``(in, out)``
is transposed back), a q/k/v row of a packed projection (so q, k and v never share a scale), a
gate row of an RNN, and a token's row of an Embedding table (per-row scales: a rare token's small
vector keeps its own resolution).  Settings are keyed by ``site.setting_key`` (the module name for
a module's ``weight``, as before sites).  Every quantized site is stored through the public
storage hook (``plugins.api``: ``StoredWeight`` / ``store_weight`` / ``restore_stored_weights``)
as a ``QuantizedWeight`` (codes, one scale per row, zero points in asymmetric mode), in one of its
two places:

- a plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` that is only ever called
  (``plugins.common.replaceable_layer``) is replaced by ``WeightOnlyQuantized``, the same weight as
  a ``StoredLayer`` that also holds the float bias and calls ``F.linear`` / ``F.conv*`` itself (no
  parametrization dispatch per forward; its state_dict is the one these layers always had);
  recorded in ``ctx.structure["layers"]``;
- every other site becomes a ``QuantizedWeight`` parametrization: ``.weight`` stays readable, so
  nn.MultiheadAttention (which reads ``out_proj.weight``), nn.TransformerEncoderLayer (which reads
  its Linears for its fast path), RNN flat weights and Conv1D keep working, and tied input/output
  embeddings share one ``QuantizedWeight``, stored once (``ctx.structure["derived"]``).

Artifacts written before the hook recorded replaced layers as ``bits`` / ``storage`` maps (and the
first ones nothing at all); ``restore_structure`` still reads both.

A parameter no site covers (a hand-written position tensor, say) is left in float32 with a note,
and so is a site an earlier step already re-expressed.

A code is the level relative to the channel's zero point, ``(q - z) mod 2**b``, so every weight that
is exactly 0.0 (pruned by an earlier step, or rounded to 0) is code 0.  Each layer stores its codes
in the smaller of the two forms ``plugins.common.choose_code_storage`` offers (the rule k-means
clustering uses too): ``packed`` at exactly ``b`` bits per weight, at most ``b / 8`` bytes per
weight before entropy coding, or ``uint8`` in the weight's shape, which lets the artifact codec
store only the nonzero codes and their positions (Deep Compression's relative indices, or a
bitmask).  The choice is recorded in ``ctx.structure`` for ``restore_structure``.  Pruned layers
gain less than raw byte counts suggest, because the entropy coder already squeezed the zeros'
repeated code when every position was stored: LeNet-5 fc1, magnitude-pruned to 8 % density, takes
32,744 bytes of codes at 4 bits against 38,177 with every position's code packed, and 36,529 against
49,275 at 5 bits, where packed codes straddle bytes and byte-wise entropy coding does worse.
Artifacts written before record no storage and hold absolute levels, packed; they still load.

This is honest *weight-only* quantization: storage shrinks, compute stays float32.  The forward
pass dequantizes (decode -> ``(q - z) * s``) and calls ``F.conv2d`` / ``F.linear`` (the derived form:
the module's own forward reads the dequantized ``.weight``).  By default the dequantized weight is
computed once, when the module or parametrization is built or its state_dict is loaded, into a
non-persistent buffer (``dequantize_once=True``): latency then equals the float model's and run-time
memory is the float model's plus the codes; nothing of it reaches the artifact.  With
``dequantize_once=False`` every forward decodes the codes again, which keeps run-time memory at the
stored codes' size and costs extra latency on every call.

Why symmetric is the default: 0.0 is always a grid point, so the zeros pruning left behind decode
to exactly 0.0; no zero point is stored; and weights are near zero-centred, so at 4-8 bits an
asymmetric range buys little (LeNet-5, 4 bits: 98.5% vs 98.2%).  Asymmetric mode here keeps 0.0
exact too (its range is widened to contain 0 and its zero points are integers), and its zeros are
code 0 as well.  Symmetric mode uses the restricted range ``[-(2**(b-1) - 1), 2**(b-1) - 1]``, so
at 2 bits it is ternary ({-s, 0, s}) while asymmetric uses all four levels, which is worth accuracy
there (LeNet-5, 2 bits, no fine-tuning: 93.5% vs 88.8%): that is why ``symmetric`` is searched.

Scales are chosen per channel by a clipping search (``scale_method="mse"``: the range is shrunk by
the factor that minimises the channel's squared reconstruction error, which matters at 2-4 bits
where min/max wastes levels on outliers) and rounded to bfloat16: bfloat16 keeps float32's exponent
range (tiny scales stay exact, unlike float16) and its 2**-9 relative rounding moves the grid by far
less than one quantization step; the quantization is done with the rounded scale, so the stored
scale is exactly the one used.  The buffer stays float32 and the codec narrows it losslessly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.space import per_layer_knobs
from slimforge.core.sites import WeightSite, to_matrix, uncovered_parameters, weight_sites
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import (choose_code_storage, codes_from_stored, empty_code_buffer, first_calls,
                                      replaceable_layer, setting_for, site_order, stored_codes, suggest_site_bits,
                                      unmatched_settings, weight_layers)
from slimforge.plugins.storage import StoredLayer, StoredWeight, layer_site, restore_stored_weights, store_weight

BIT_CHOICES = (2, 4, 8)  # what the search samples; a config may name any width in BIT_RANGE
BIT_RANGE = (2, 8)  # 1 bit has no symmetric grid containing 0 and +-s
END_BITS = 8
SCALE_METHODS = ("mse", "minmax")
# Clipping ratios tried by the mse scale search, widest first (ties keep the wider range).  Down to
# 0.1: at 2 bits the error-optimal ternary threshold sits far below max|w|.
CLIP_RATIOS = tuple(round(1.0 - 0.02 * k, 2) for k in range(46))


@dataclass(frozen=True, kw_only=True)
class WeightOnlyQuantConfig:
    bits: dict[str, int] = field(default_factory=dict)  # layer name -> bit width
    default_bits: int = 8  # for layers not named in ``bits``
    keep_ends_8bit: bool = True  # first and last weight layers (execution order) stay at 8 bits
    symmetric: bool = True
    scale_method: str = "mse"
    dequantize_once: bool = True  # float weight cached at build/load (non-persistent) vs per forward

    def __post_init__(self) -> None:
        for layer, value in {**self.bits, "default_bits": self.default_bits}.items():
            if isinstance(value, bool) or not isinstance(value, int) or not BIT_RANGE[0] <= value <= BIT_RANGE[1]:
                raise ConfigError(f"weight_only_quant.bits[{layer!r}]: must be an int in "
                                  f"{BIT_RANGE[0]}..{BIT_RANGE[1]}, got {value!r}")
        if self.scale_method not in SCALE_METHODS:
            raise ConfigError(f"weight_only_quant.scale_method: unknown {self.scale_method!r}; "
                              f"valid choices: {', '.join(SCALE_METHODS)}")
        for flag in ("keep_ends_8bit", "symmetric", "dequantize_once"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"weight_only_quant.{flag}: must be true or false, got {getattr(self, flag)!r}")


# --- quantization maths ---------------------------------------------------------------------------

def _quantize_with(w2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w2d / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1)


# Rows are quantized independently, in chunks of about this many weights: the clipping search makes
# several matrix-sized float temporaries per ratio, which on an LM head (8192 x 768) were ~100 MB.
ROW_CHUNK_WEIGHTS = 1 << 20


def quantize_rows(w2d: torch.Tensor, bits: int, symmetric: bool, scale_method: str = "mse"):
    """Per-row (output channel) quantization of a 2-D float tensor.

    Returns ``(codes int64, scale float32 bfloat16-exact, zero_point int64)``."""
    w2d = w2d.detach().to(torch.float32)
    rows = max(1, ROW_CHUNK_WEIGHTS // max(1, w2d.shape[1]))
    if w2d.shape[0] <= rows:
        return _quantize_row_chunk(w2d, bits, symmetric, scale_method)
    parts = [_quantize_row_chunk(w2d[start:start + rows], bits, symmetric, scale_method)
             for start in range(0, w2d.shape[0], rows)]
    return tuple(torch.cat(part) for part in zip(*parts))


def _quantize_row_chunk(w2d: torch.Tensor, bits: int, symmetric: bool, scale_method: str):
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)  # largest code; the symmetric zero point
    if symmetric:
        span = w2d.abs().amax(dim=1) / (mid - 1)
        zero_of = lambda scale: torch.full_like(scale, mid)  # noqa: E731
    else:
        low = w2d.amin(dim=1).clamp(max=0.0)  # the range always contains 0: zeros stay exact
        span = (w2d.amax(dim=1).clamp(min=0.0) - low) / qmax
        zero_of = lambda scale: torch.clamp(torch.round(-low / scale), 0, qmax)  # noqa: E731
    ratios = CLIP_RATIOS if scale_method == "mse" else (1.0,)
    best_scale = best_zero = best_err = None
    for ratio in ratios:
        scale = (span * ratio).to(torch.bfloat16).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel: any scale
        zero = zero_of(scale)
        err = (((_quantize_with(w2d, scale, zero, bits) - zero[:, None]) * scale[:, None] - w2d) ** 2).sum(dim=1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    codes = _quantize_with(w2d, best_scale, best_zero, bits).to(torch.int64)
    return codes, best_scale, best_zero.to(torch.int64)


# --- the two forms a quantized site takes --------------------------------------------------------

def relative_codes(absolute: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Grid levels relative to each row's zero point, ``(q - z) mod 2**b``: a 0.0 weight (pruned, or
    rounded to 0) is code 0 in every row and in both modes, the value the codec's sparse layouts
    leave out."""
    return (absolute - zero[:, None]) % (1 << bits)


def signed_levels(codes: torch.Tensor, bits: int, zero_point: torch.Tensor | None, absolute: bool = False) -> torch.Tensor:
    """Signed level of every weight of ``codes`` (rows x columns, uint8): weight = level * scale.
    ``zero_point`` is None in symmetric mode (the zero point is then ``2**(b-1)``)."""
    codes = codes.to(torch.int16)
    zero = zero_point.to(torch.int16)[:, None] if zero_point is not None else 1 << (bits - 1)
    levels = codes if absolute else (codes + zero) & ((1 << bits) - 1)
    return levels - zero


class QuantizedWeight(StoredWeight):
    """A site's weight computed from ``bits``-bit codes and one scale per *logical* output row
    (``core.sites``: Conv1D's transposed storage undone, a packed q/k/v projection's rows each their
    own channel, an Embedding's rows its tokens): weight_only_quant's ``StoredWeight``
    (``plugins.api``), in the derived place, so the module keeps its class and reads ``.weight`` as
    before (nn.MultiheadAttention, Hugging Face Conv1D, Embedding, RNN flat weights, and tied
    embeddings: one ``QuantizedWeight`` for both places, stored once).

    Buffers: ``relative_codes`` (each weight's grid level minus its row's zero point, modulo
    ``2**bits``, so every weight that is exactly 0.0 has code 0) of the logical ``out x in`` matrix
    in ``storage`` form (``plugins.common``: ``uint8``, whose zero codes the artifact codec leaves
    out, or ``packed``), ``scale`` and, asymmetric, ``zero_point``.  With ``dequantize_once`` the
    dequantized weight is decoded at build and load into the non-persistent ``weight_cache``;
    without, every read decodes again.  ``absolute_codes=True`` reads the first layer-form artifacts:
    absolute levels, packed, in a buffer named ``codes``.  The names differ so that an older
    slimforge, which knows only ``codes``, refuses a newer artifact (unexpected key) instead of
    decoding relative codes as absolute levels into wrong weights."""

    # Codes of the logical matrix; the layer form keeps them in the weight's own shape (conv kernels
    # 4-D), as its artifacts always had them.
    codes_in_stored_shape = False

    def __init__(self, site: WeightSite, bits: int, symmetric: bool, dequantize_once: bool = True,
                 storage: str = "packed", dtype: torch.dtype = torch.float32, device=None,
                 absolute_codes: bool = False):
        super().__init__()
        self.bits, self.symmetric, self.dequantize_once, self.storage = bits, symmetric, dequantize_once, storage
        self.absolute_codes = absolute_codes
        self.stored_shape, self.transposed, self.dtype = tuple(site.shape), site.transposed, dtype
        self.matrix_shape = (site.out_features, site.in_features)
        self.codes_shape = self.stored_shape if self.codes_in_stored_shape else self.matrix_shape
        self.codes_name = "codes" if absolute_codes else "relative_codes"
        self.register_buffer(self.codes_name, empty_code_buffer(self.codes_shape, bits, storage, device))
        self.register_buffer("scale", torch.ones(site.out_features, dtype=torch.float32, device=device))
        if not symmetric:
            self.register_buffer("zero_point", torch.zeros(site.out_features, dtype=torch.uint8, device=device))

    @classmethod
    def from_matrix(cls, site: WeightSite, matrix: torch.Tensor, bits: int, symmetric: bool, scale_method: str,
                    dequantize_once: bool = True) -> QuantizedWeight:
        absolute, scale, zero = quantize_rows(matrix.detach(), bits, symmetric, scale_method)
        codes = relative_codes(absolute, zero, bits).cpu()
        codes = codes.view(site.shape) if cls.codes_in_stored_shape else codes
        storage = choose_code_storage(codes, bits)
        derived = cls(site, bits, symmetric, dequantize_once, storage, matrix.dtype, matrix.device)
        with torch.no_grad():
            derived.codes_buffer.copy_(stored_codes(codes, bits, storage))
            derived.scale.copy_(scale)
            if not symmetric:
                derived.zero_point.copy_(zero.to(torch.uint8))
        derived.refresh()
        return derived

    # --- the storage hook -----------------------------------------------------------------------
    def spec(self) -> dict:
        # ``symmetric`` and ``dequantize_once`` are the config's, the same for every site:
        # ``restore_structure`` adds them back from the config instead of repeating them per site.
        return {"bits": self.bits, "storage": self.storage}

    @classmethod
    def empty(cls, site: WeightSite, spec: dict, like: torch.Tensor) -> QuantizedWeight:
        return cls(site, int(spec["bits"]), bool(spec["symmetric"]), bool(spec["dequantize_once"]), spec["storage"],
                   like.dtype, like.device, absolute_codes=bool(spec.get("absolute_codes", False)))

    def decode(self) -> torch.Tensor:
        """The weight in the site's stored layout (contiguous: Conv1D's transpose is materialised)."""
        matrix = (self.levels().to(torch.float32) * self.scale[:, None]).to(self.dtype)
        return matrix.t().contiguous() if self.transposed else matrix.reshape(self.stored_shape)

    def refresh(self) -> None:
        self.decoded = self.decode() if self.dequantize_once else None

    # --- reading the codes ----------------------------------------------------------------------
    @property
    def codes_buffer(self) -> torch.Tensor:
        """The codes buffer, whichever name it has."""
        return getattr(self, self.codes_name)

    @property
    def weight_cache(self) -> torch.Tensor | None:
        """The dequantized weight decoded at build/load (None without ``dequantize_once``)."""
        return self.decoded

    def levels(self) -> torch.Tensor:
        """Signed integer level of every weight of the logical ``out x in`` matrix: weight = level * scale."""
        codes = codes_from_stored(self.codes_buffer, self.bits, self.storage, self.codes_shape)
        return signed_levels(codes.reshape(self.matrix_shape), self.bits,
                             None if self.symmetric else self.zero_point, self.absolute_codes)

    def dequantize(self) -> torch.Tensor:
        return self.decode()

    def extra_repr(self) -> str:
        mode = "symmetric" if self.symmetric else "asymmetric"
        return (f"{list(self.matrix_shape)}{' transposed' if self.transposed else ''}, bits={self.bits}, {mode}, "
                f"storage={self.storage}, dequantize_once={self.dequantize_once}")


class WeightOnlyQuantized(StoredLayer, QuantizedWeight):
    """A ``QuantizedWeight`` in the layer place (``plugins.api.StoredLayer``): it replaces a plain
    Conv1d/Conv2d/Linear its parent only calls, holding the same codes/scales/zero points plus the
    float ``bias`` (a buffer: nothing in a quantized layer trains), and calls ``F.linear`` /
    ``F.conv*`` on the dequantized weight.  Kept beside the derived place because it skips the
    parametrization dispatch on every forward and writes shorter keys (``plugins.storage``); its
    state_dict is the one these layers always had (codes in the weight's shape)."""

    codes_in_stored_shape = True

    @classmethod
    def from_layer(cls, layer: nn.Module, bits: int, symmetric: bool, scale_method: str,
                   dequantize_once: bool = True) -> WeightOnlyQuantized:
        site = layer_site(layer)
        return cls.from_matrix(site, to_matrix(layer.weight, site), bits, symmetric, scale_method, dequantize_once).host(layer)

    @classmethod
    def for_layer(cls, layer: nn.Module, bits: int, symmetric: bool, dequantize_once: bool = True,
                  storage: str = "packed", absolute_codes: bool = False) -> WeightOnlyQuantized:
        """An empty one for ``layer`` (its state_dict loads next)."""
        weight = layer.weight
        return cls(layer_site(layer), bits, symmetric, dequantize_once, storage, weight.dtype, weight.device,
                   absolute_codes).host(layer)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.stored_shape

    def refresh_cache(self) -> None:
        self.refresh()

    def extra_repr(self) -> str:
        return f"{self.kind}{list(self.stored_shape)}, " + super().extra_repr().split(", ", 1)[1]


# --- the technique --------------------------------------------------------------------------------

def execution_order(model: nn.Module, example_inputs) -> list[str]:
    """Plain Conv/Linear layer names in the order the forward pass first calls them (registration
    order says nothing about which layer sees the input first); layers never called go last."""
    layers = weight_layers(model)
    called = first_calls(model, example_inputs, layers)
    return sorted(layers, key=lambda name: called.get(name, math.inf))  # stable: never-called layers keep module order


class WeightOnlyQuant(Technique):
    name = "weight_only_quant"
    family = Family.QUANTIZATION
    stage = Stage.QUANTIZATION
    Config = WeightOnlyQuantConfig
    description = ("Weight-only 2/4/8-bit per-channel quantization of every weight site (attention, Conv1D, "
                   "Embedding incl. tied, RNN), bits per site searched; pruned zeros stored sparsely; float compute.")
    # k-means clustering leaves codebook-derived weights: quantizing them would dequantize the sharing away.
    cannot_follow = frozenset({"kmeans_clustering"})

    def suggest(self, space, task) -> WeightOnlyQuantConfig:
        teacher = task.teacher
        sites = weight_sites(teacher)
        order = [sites[name].setting_key for name in site_order(teacher, task.example_inputs(), sites)]
        if per_layer_knobs(space):
            keep_ends = space.suggest_categorical("keep_ends_8bit", [True, False])
            searched = [key for key in order if key not in _ends(order)] if keep_ends else order
            bits = {key: space.suggest_categorical(f"bits.{key}", list(BIT_CHOICES)) for key in searched}
        else:
            # Global knobs: a mean width over every width the codec stores, allocated by measured
            # sensitivity, which already gives the first and last layers the bits they need.
            keep_ends = False
            by_key = {site.setting_key: site for site in sites.values()}
            bits = suggest_site_bits(space, task, {key: by_key[key] for key in order},
                                     tuple(range(BIT_RANGE[0], BIT_RANGE[1] + 1)))
        symmetric = space.suggest_categorical("symmetric", [True, False])
        return WeightOnlyQuantConfig(bits=bits, keep_ends_8bit=keep_ends, symmetric=symmetric)

    def resolve_bits(self, model: nn.Module, config: WeightOnlyQuantConfig, example_inputs,
                     ctx: TechniqueContext | None = None) -> dict[str, int]:
        """Bit width of every site to quantize by its ``setting_key`` (the module name for a
        module's ``weight``), in execution order, ends included; notes the weights left alone."""
        note = ctx.note if ctx is not None else (lambda _msg: None)
        sites = weight_sites(model)
        order = site_order(model, example_inputs, sites)
        for key in sorted(unmatched_settings(config.bits, {sites[n].setting_key: None for n in order})):
            note(f"weight_only_quant: layer {key!r} not found in the model; ignored")
        ends = _ends(order) if config.keep_ends_8bit else set()
        chosen = {}
        for name in order:
            site = sites[name]
            if site.is_derived(model):
                note(f"weight_only_quant: {name!r} is already computed by an earlier step's tensors; left as is")
                continue
            configured = setting_for(site.setting_key, config.bits)
            chosen[site.setting_key] = END_BITS if name in ends else (
                config.default_bits if configured is None else configured)
        for name, shape in uncovered_parameters(model, sites).items():
            note(f"weight_only_quant: {name!r} {list(shape)} is not a weight matrix of a known layer kind; "
                 "left in float32")
        return chosen

    def apply(self, model: nn.Module, config: WeightOnlyQuantConfig, ctx: TechniqueContext) -> nn.Module:
        model.eval()
        bits = self.resolve_bits(model, config, ctx.task.example_inputs(), ctx)
        sites = {site.setting_key: site for site in weight_sites(model).values()}
        # Always recorded, even empty: a structure without it is one of the first artifacts (below).
        ctx.structure["layers"] = {}
        for key, b in bits.items():
            site = sites[key]
            place = WeightOnlyQuantized if replaceable_layer(model, site, padding_modes=None) else QuantizedWeight
            store_weight(model, site, place.from_matrix(site, site.matrix(model), b, config.symmetric,
                                                        config.scale_method, config.dequantize_once), ctx)
        return model

    def restore_structure(self, model, config: WeightOnlyQuantConfig, example_inputs, structure) -> nn.Module:
        layers = structure.get("layers") or {}
        if "layers" not in structure and ("bits" in structure or "derived" not in structure):
            # Written before the storage hook: replaced layers recorded as bits / storage maps.
            bits = structure.get("bits")
            if bits is None:  # the first artifacts recorded nothing: their layers follow from the config
                bits = _legacy_bits(model, config, example_inputs)
            # Artifacts written before the storage choice record none: absolute levels, packed.
            storage = structure.get("storage")
            layers = {name: {"bits": int(b), "storage": "packed" if storage is None else storage[name],
                             "absolute_codes": storage is None} for name, b in bits.items()}
        facts = {"symmetric": config.symmetric, "dequantize_once": config.dequantize_once}
        return restore_stored_weights(model, {place: {key: {**facts, **spec} for key, spec in records.items()}
                                              for place, records in (("layers", layers),
                                                                     ("derived", structure.get("derived") or {}))},
                                      self.name, QuantizedWeight, WeightOnlyQuantized)


def _ends(order: list) -> set:
    """The first and last entries of an execution order (one entry when the model has one)."""
    return {order[0], order[-1]} if order else set()


def _legacy_bits(model: nn.Module, config: WeightOnlyQuantConfig, example_inputs) -> dict[str, int]:
    """The layers and widths the first weight_only_quant artifacts held, which recorded none: every
    plain Conv/Linear with zero padding in execution order, the ends at 8 bits when kept."""
    order = execution_order(model, example_inputs)
    ends = _ends(order) if config.keep_ends_8bit else set()
    chosen = {}
    for name in order:
        layer = model.get_submodule(name)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.padding_mode != "zeros":
            continue
        configured = setting_for(name, config.bits)
        chosen[name] = END_BITS if name in ends else (config.default_bits if configured is None else configured)
    return chosen


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(WeightOnlyQuant)
