"""Static int8 post-training quantization with real int8 kernels (torch.ao, x86 kernels).

Weights: int8, per-channel symmetric.  Activations: uint8, per-tensor, calibrated on the task's
calibration data.  The quantized modules call the x86 (fbgemm/oneDNN) int8 kernels, so the latency
we time is int8 compute, not fake-quant.  Where the model can be traced, torch.fx graph mode
(``prepare_fx`` / ``convert_fx``) quantizes the whole graph, fusing Conv/Linear with their ReLUs
and keeping activations int8 between int8 ops; where it cannot, static int8 still reaches every
Linear/Conv, one layer at a time:

- FX tracing fails (Hugging Face models: ``co_varnames is too small``, data-dependent slicing):
  each Linear/Conv is wrapped in torch.ao's eager ``QuantWrapper`` -- a calibrated quantize, the
  static int8 kernel (int8 output with a calibrated scale), a dequantize -- calibrated in one pass
  over the calibration batches.  Activations between layers stay float32; the note says so.
- FX traces but keeps a torch.nn module whole (``nn.TransformerEncoder`` is a leaf to FX, so its
  attention and FFN would stay float): the Linears left inside get the same per-layer treatment.
- ``nn.MultiheadAttention`` is first swapped for ``int8_sites.ProjectedMultiheadAttention``
  (separate q/k/v/out Linears), Hugging Face ``Conv1D`` for the equivalent ``nn.Linear``.
- Embedding tables have no activation to quantize: torch.ao's 8-bit weight-only Embedding (per-row
  scale and zero point); a table tied to an lm head is read from the head's int8 weight and stored
  once (``int8_sites.Int8TiedEmbedding``).
- torch.ao has no static int8 GRU/LSTM: those get dynamic int8 (int8 weights, activations quantized
  per step), with a note.  Anything left float32 (``nn.RNN``, a plain position parameter) is a note.

A CNN or MLP that traces whole is quantized exactly as before (same modules, same artifact bytes,
empty ``ctx.structure``); otherwise ``ctx.structure`` records whether FX traced and which modules
were converted, so ``restore_structure`` rebuilds the same modules.

torch.ao.quantization is deprecated in favour of torchao's PT2E flow; on CPU the PT2E flow needs
torch.compile/inductor lowering to reach int8 kernels, which would make the measured model differ
from the saved one.  The eager/FX modules *are* the artifact, so they stay until the replacement
gives the same property.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import SiteKind, weight_sites
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import replace_module
from slimforge.plugins.quantization import int8_sites

OBSERVERS = ("histogram", "minmax")
BACKEND = "x86"


@dataclass(frozen=True, kw_only=True)
class Int8PTQConfig:
    observer: str = "histogram"
    calibration_batches: int = 8
    calibration_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ConfigError(f"int8_ptq.observer: unknown {self.observer!r}; valid choices: {', '.join(OBSERVERS)}")
        if self.calibration_batches < 1 or self.calibration_batch_size < 1:
            raise ConfigError("int8_ptq.calibration_batches and calibration_batch_size: must be >= 1")


def _static_qconfig(observer: str):
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, default_per_channel_weight_observer

    activation = (HistogramObserver if observer == "histogram" else MinMaxObserver).with_args(
        dtype=torch.quint8, reduce_range=True)  # reduce_range: fbgemm's int16 accumulation stays exact
    return QConfig(activation=activation, weight=default_per_channel_weight_observer)


def _qconfig_mapping(observer: str):
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping(BACKEND).set_global(_static_qconfig(observer))


def _prepare(model: nn.Module, observer: str, example_inputs, opaque=()) -> nn.Module:
    """``opaque``: module classes torch.fx keeps whole (call_module) instead of tracing into."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = BACKEND
    custom = PrepareCustomConfig().set_non_traceable_module_classes(list(opaque)) if opaque else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation chatter, once per trial otherwise
        return prepare_fx(model.eval(), _qconfig_mapping(observer), example_inputs, prepare_custom_config=custom)


def _convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


# --- where the whole graph cannot be traced: static int8 per layer (eager torch.ao) ------------------

STATIC_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _float_leaves(model: nn.Module) -> list[str]:
    """Plain float Linear/Conv modules holding a weight site (or a place tied to one: an lm head
    sharing the embedding table): what static int8 can take one by one."""
    names = []
    for site in weight_sites(model).values():
        if site.kind == SiteKind.ATTENTION_IN_PROJ or site.kind == SiteKind.RNN:
            continue
        for place in (site.name, *site.tied):
            module_name, _, param = place.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if param == "weight" and type(module) in STATIC_LEAVES and module_name not in names \
                    and not parametrize.is_parametrized(module, "weight"):
                names.append(module_name)
    return names


def _wrap_static(model: nn.Module, names, observer: str) -> None:
    """Each named layer inside quantize -> layer -> dequantize stubs with observers (torch.ao eager
    static quantization), ready for calibration."""
    from torch.ao.quantization import QuantWrapper, prepare

    for name in names:
        wrapper = QuantWrapper(model.get_submodule(name))
        wrapper.qconfig = _static_qconfig(observer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare(wrapper, inplace=True)
        replace_module(model, name, wrapper)


def _convert_static(model: nn.Module, names) -> None:
    """Observers -> int8 modules: calibrated Quantize, nnq.Linear/Conv (int8 kernel, requantized
    output), DeQuantize."""
    from torch.ao.quantization import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            convert(model.get_submodule(name), inplace=True)


def _quantized_head(model: nn.Module, name: str) -> str | None:
    """Where the int8 Linear that an lm head became lives (inside its static wrapper or not)."""
    from torch.ao.quantization import QuantWrapper

    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(module, QuantWrapper):
        name, module = f"{name}.module", module.module
    return name if callable(getattr(module, "weight", None)) and hasattr(module, "_packed_params") else None


def _calibrate(model: nn.Module, config: Int8PTQConfig, ctx: TechniqueContext) -> None:
    generator = torch.Generator().manual_seed(ctx.seed)
    loader = DataLoader(ctx.task.calibration, batch_size=config.calibration_batch_size,
                        shuffle=True, generator=generator)
    with torch.inference_mode():
        for x, _ in itertools.islice(loader, config.calibration_batches):
            model(x)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _fx_blocker(model: nn.Module, leaves) -> str:
    """The torch.nn modules torch.fx kept whole (called, not traced into) around ``leaves``."""
    kept = set()
    for leaf in leaves:
        parts = leaf.split(".")
        for end in range(1, len(parts)):
            module = model.get_submodule(".".join(parts[:end]))
            if type(module).__module__.startswith("torch.nn") and not isinstance(module, _CONTAINERS):
                kept.add(type(module).__name__)
                break
    return ", ".join(sorted(kept)) or "none"


class Int8PTQ(Technique):
    name = "int8_ptq"
    family = Family.QUANTIZATION
    stage = Stage.QUANTIZATION
    Config = Int8PTQConfig
    requires = frozenset({"calibration_data"})
    description = ("Static int8 PTQ (torch.ao, x86 kernels): per-channel weights, calibrated activations; FX graph "
                   "where it traces, per layer where it does not.")
    cannot_follow = frozenset({"kmeans_clustering"})  # clustered layers are not plain Conv/Linear

    def suggest(self, space, task) -> Int8PTQConfig:
        return Int8PTQConfig(observer=space.suggest_categorical("observer", list(OBSERVERS)),
                             calibration_batches=space.suggest_int("calibration_batches", 2, 16, log=True))

    def apply(self, model: nn.Module, config: Int8PTQConfig, ctx: TechniqueContext) -> nn.Module:
        if ctx.device != "cpu":
            ctx.note("int8_ptq: int8 kernels are CPU-only; the quantized model is measured on the CPU")
        model = model.to("cpu").eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attention = int8_sites.convert_attention(model)
            conv1d = int8_sites.convert_hf_conv1d(model)
        ties = int8_sites.tied_heads(model)
        opaque = (int8_sites.ProjectedMultiheadAttention,) if attention else ()
        try:
            prepared = _prepare(copy.deepcopy(model), config.observer, ctx.task.example_inputs(), opaque)
            _calibrate(prepared, config, ctx)
            model, traced = _convert(prepared), True
        except Exception as exc:  # noqa: BLE001 - any tracing failure: quantize layer by layer instead
            traced = False
            ctx.note(f"int8_ptq: torch.fx cannot quantize {type(model).__name__} as one graph ({type(exc).__name__}: "
                     f"{(str(exc).splitlines() or [''])[0][:120]}); each Linear/Conv is quantized on its own "
                     f"instead (eager torch.ao: calibrated quantize -> static int8 kernel -> dequantize), so the "
                     f"activations between layers stay float32")
        static = _float_leaves(model)
        if static and traced:
            ctx.note(f"int8_ptq: {len(static)} layer(s) inside modules torch.fx keeps whole ({_fx_blocker(model, static)}) "
                     f"are quantized on their own (eager torch.ao static int8, calibrated quantize/dequantize "
                     f"around each): {', '.join(static)}")
        _wrap_static(model, static, config.observer)
        if static:
            _calibrate(model, config, ctx)
        _convert_static(model, static)
        record = self._finish(model, ties, None)
        for note in record.pop("notes"):
            ctx.note(note)
        if attention:
            ctx.note(f"int8_ptq: nn.MultiheadAttention {', '.join(attention)} computed with separate q/k/v/out int8 "
                     f"Linears (its packed in_proj_weight cannot feed an int8 kernel); attention scores and softmax "
                     f"stay float32")
        for note in int8_sites.float_site_notes("int8_ptq", model):
            ctx.note(note)
        if traced and not (attention or conv1d or static or record):
            return model  # the whole graph traced: the structure is the FX graph, as before weight sites
        ctx.structure.update({"fx": traced, **{k: v for k, v in (("attention", attention), ("hf_conv1d", conv1d),
                                                                  ("static", static)) if v}, **record})
        return model

    @staticmethod
    def _finish(model: nn.Module, ties: dict[str, str], record: dict | None) -> dict:
        """Sites static int8 has no kernel for: Embedding tables 8-bit weight-only, GRU/LSTM dynamic
        int8, tied tables read from their int8 head.  Returns what to record (+ ``notes`` when
        deciding)."""
        deciding = record is None
        notes: list[str] = []
        if deciding:
            bound = {e: h for e, h in ((e, _quantized_head(model, h)) for e, h in ties.items()) if h}
            embeddings, embedding_notes = int8_sites.quantizable_embeddings(model, bound)
            rnns, rnn_notes = int8_sites.quantizable_rnns(model)
            notes += [f"int8_ptq: {n}" for n in embedding_notes + rnn_notes]
        else:
            bound, embeddings, rnns = dict(record.get("tied", {})), record.get("embedding", []), record.get("rnn", [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8_sites.quantize_embeddings(model, embeddings)
            int8_sites.quantize_rnns(model, rnns, _dynamic_qconfig())
            int8_sites.bind_tied_embeddings(model, bound)
        if not deciding:
            return {}
        if embeddings:
            notes.append(f"int8_ptq: embedding table(s) {', '.join(embeddings)}: 8-bit weight-only (torch.ao quantized "
                         f"Embedding, a float scale and zero point per row); a lookup has no activation to quantize")
        if rnns:
            notes.append(f"int8_ptq: {', '.join(rnns)}: torch.ao has no static int8 GRU/LSTM, so dynamic int8 instead "
                         f"(int8 weights, activations quantized per step, no calibration)")
        for embedding, head in bound.items():
            notes.append(int8_sites.tied_note("int8_ptq", model, embedding, head, ties[embedding]))
        out = {k: v for k, v in (("embedding", embeddings), ("rnn", rnns)) if v}
        if bound:
            out["tied"] = bound
        return {**out, "notes": notes}

    def restore_structure(self, model, config: Int8PTQConfig, example_inputs, structure) -> nn.Module:
        # Uncalibrated observers give placeholder scales; the artifact's tensors replace them all.
        if not structure:  # the whole graph traced (every artifact from before weight sites)
            return _convert(_prepare(model, config.observer, example_inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attention = int8_sites.convert_attention(model, structure.get("attention", []))
            int8_sites.convert_hf_conv1d(model, structure.get("hf_conv1d", []))
        if structure.get("fx", True):
            opaque = (int8_sites.ProjectedMultiheadAttention,) if attention else ()
            model = _convert(_prepare(model, config.observer, example_inputs, opaque))
        static = structure.get("static", [])
        _wrap_static(model, static, config.observer)
        _convert_static(model, static)
        self._finish(model, {}, structure)
        return model


def _dynamic_qconfig():
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Int8PTQ)
