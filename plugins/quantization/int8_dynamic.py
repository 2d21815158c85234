"""Dynamic int8 quantization with real int8 kernels (torch.ao eager mode), on every weight site
torch.ao has a dynamic kernel for.

- ``nn.Linear`` -> ``torch.ao.nn.quantized.dynamic.Linear``: int8 weights (symmetric, per output
  channel or per tensor) packed for the x86 (fbgemm) kernels; activations are quantized to uint8 at
  run time from each batch's own min/max, so no calibration data is needed.
- ``nn.MultiheadAttention``: its packed ``in_proj_weight`` and ``out_proj`` are read as tensors by
  its forward, so it is first swapped for ``int8_sites.ProjectedMultiheadAttention`` (same
  computation, separate q/k/v/out Linears; its parent ``nn.TransformerEncoderLayer`` keeps calling
  it), whose four projections then become dynamic int8 Linears.  Scores and softmax stay float32.
- Hugging Face ``Conv1D`` (GPT-2) -> the equivalent ``nn.Linear`` (weight transposed) -> int8.
- ``nn.GRU`` / ``nn.LSTM`` -> torch.ao's dynamic int8 GRU/LSTM (int8 ``weight_ih``/``weight_hh``),
  stored through ``int8_sites.PortableCellParams``.  ``nn.RNN``, ``bias=False`` and LSTM
  ``proj_size`` have no torch.ao kernel: noted, kept float32.
- ``nn.Embedding`` -> torch.ao's 8-bit Embedding (quint8 rows, a float scale and zero point per
  row; weight-only: a lookup has no activation).  ``weight_granularity`` does not apply to it.
- A table tied to an lm head (GPT-2): the head becomes a dynamic int8 Linear and the embedding an
  ``int8_sites.Int8TiedEmbedding`` that reads its rows from the head's int8 weight, so the table is
  stored once at 1 byte per weight -- less than two int8 copies or the float32 table kept tied;
  the note gives the bytes.
- Convolutions stay float32 (torch.ao has no dynamic conv kernels on x86), and so do plain
  parameters no layer owns (a learned position tensor): each is a note.

Because the activation range is taken per batch, one sample's output can depend slightly on the
other samples of its batch: accuracy measured on large evaluation batches can differ a little from
batch-1 serving.  The state_dict holds each Linear's ``_packed_params._packed_params`` tuple (int8
weight qtensor, float bias), which the artifact codec stores natively.  ``ctx.structure`` names the
modules converted beyond plain Linear layers (empty for a CNN/MLP, as in artifacts written before
weight sites, which still rebuild Linear-only).

Like ``int8_ptq``, this uses the deprecated torch.ao eager flow on purpose: the loaded module is
the measured one, with no compile step in between.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import SiteKind
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.quantization import int8_sites

GRANULARITIES = ("per_channel", "per_tensor")
BACKEND = "x86"  # packed-weight layout depends on the engine: apply and restore must agree


@dataclass(frozen=True, kw_only=True)
class Int8DynamicConfig:
    weight_granularity: str = "per_channel"

    def __post_init__(self) -> None:
        if self.weight_granularity not in GRANULARITIES:
            raise ConfigError(f"int8_dynamic.weight_granularity: unknown {self.weight_granularity!r}; "
                              f"valid choices: {', '.join(GRANULARITIES)}")


def _qconfig(granularity: str):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig if granularity == "per_channel" else default_dynamic_qconfig


def quantize_linears(model: nn.Module, granularity: str) -> nn.Module:
    """Every plain ``nn.Linear`` as a dynamic int8 Linear (all this technique did before weight sites:
    artifacts whose structure entry is empty are rebuilt this way)."""
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = BACKEND
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation chatter, once per trial otherwise
        return quantize_dynamic(model.eval(), {nn.Linear: _qconfig(granularity)}, dtype=torch.qint8)


def quantize_sites(model: nn.Module, granularity: str, record: dict | None = None) -> tuple[nn.Module, dict, list[str]]:
    """Every weight site torch.ao has a dynamic int8 (or 8-bit weight-only) module for.

    ``record`` None: decide from the model (``apply``); else rebuild what a record says
    (``restore_structure``).  Returns (model, record, notes); the record is empty when only Linear
    layers were quantized, which is also how artifacts from before weight sites read."""
    deciding = record is None
    notes: list[str] = []
    if deciding:
        record = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attention = int8_sites.convert_attention(model, None if deciding else record.get("attention", []))
        conv1d = int8_sites.convert_hf_conv1d(model, None if deciding else record.get("hf_conv1d", []))
        if deciding:
            tied = int8_sites.tied_heads(model)
            embeddings, embedding_notes = int8_sites.quantizable_embeddings(model, tied)
            rnns, rnn_notes = int8_sites.quantizable_rnns(model)
            notes += [f"int8_dynamic: {n}" for n in embedding_notes + rnn_notes]
        else:
            tied, embeddings, rnns = dict(record.get("tied", {})), record.get("embedding", []), record.get("rnn", [])
        model = quantize_linears(model, granularity)  # the heads of tied tables among them
        int8_sites.quantize_embeddings(model, embeddings)
        int8_sites.quantize_rnns(model, rnns, _qconfig(granularity))
        int8_sites.bind_tied_embeddings(model, tied)
    if deciding:
        for key, names in (("attention", attention), ("hf_conv1d", conv1d), ("embedding", embeddings), ("rnn", rnns)):
            if names:
                record[key] = list(names)
        if tied:
            record["tied"] = dict(tied)
    return model, record, notes


class Int8Dynamic(Technique):
    name = "int8_dynamic"
    family = Family.QUANTIZATION
    stage = Stage.QUANTIZATION
    Config = Int8DynamicConfig
    description = ("Dynamic int8 (torch.ao, x86 kernels): int8 Linear / attention / GRU / LSTM weights with "
                   "activations quantized per batch; 8-bit Embedding tables.")
    # k-means clustering leaves codebook modules, not plain Linear layers to quantize.
    cannot_follow = frozenset({"kmeans_clustering"})

    def suggest(self, space, task) -> Int8DynamicConfig:
        granularity = space.suggest_categorical("weight_granularity", list(GRANULARITIES))
        return Int8DynamicConfig(weight_granularity=granularity)

    def apply(self, model: nn.Module, config: Int8DynamicConfig, ctx: TechniqueContext) -> nn.Module:
        if ctx.device != "cpu":
            ctx.note("int8_dynamic: int8 kernels are CPU-only; the quantized model is measured on the CPU")
        model = model.to("cpu").eval()
        kept = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if kept:
            ctx.note(f"int8_dynamic: {len(kept)} conv layer(s) stay float32 (dynamic quantization covers "
                     f"Linear only): {', '.join(kept)}")
        model, record, notes = quantize_sites(model, config.weight_granularity)
        for note in notes:
            ctx.note(note)
        for embedding, head in record.get("tied", {}).items():
            ctx.note(int8_sites.tied_note("int8_dynamic", model, embedding, head))
        if record.get("attention"):
            ctx.note(f"int8_dynamic: nn.MultiheadAttention {', '.join(record['attention'])} computed with separate "
                     f"q/k/v/out int8 Linears (its packed in_proj_weight cannot feed an int8 kernel); the "
                     f"attention scores and softmax stay float32")
        for note in int8_sites.float_site_notes("int8_dynamic", model, skip_kinds=(SiteKind.CONV,)):
            ctx.note(note)
        if not any(_is_int8(m) for m in model.modules()):
            ctx.note("int8_dynamic: the model has no layer torch.ao quantizes dynamically; nothing was quantized")
        ctx.structure.update(record)
        return model

    def restore_structure(self, model, config: Int8DynamicConfig, example_inputs, structure) -> nn.Module:
        # Quantizing the untrained weights gives the same modules; the artifact's tensors replace them.
        return quantize_sites(model, config.weight_granularity, dict(structure or {}))[0]


def _is_int8(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized") or isinstance(module, int8_sites.Int8TiedEmbedding)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Int8Dynamic)
