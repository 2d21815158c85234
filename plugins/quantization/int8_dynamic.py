"""Dynamic int8 quantization of Linear layers with real int8 kernels (torch.ao eager mode).

``torch.ao.quantization.quantize_dynamic`` swaps every ``nn.Linear`` for
``torch.ao.nn.quantized.dynamic.Linear``: int8 weights (symmetric, per output channel or per
tensor) packed for the x86 (fbgemm) kernels; activations are quantized to uint8 at run time from
each batch's own min/max, so no calibration data is needed.  Convolutions stay float32 (torch.ao
has no dynamic conv kernels on x86); ``apply`` notes how many.

Because the activation range is taken per batch, one sample's output can depend slightly on the
other samples of its batch: accuracy measured on large evaluation batches can differ a little from
batch-1 serving.  The state_dict holds each layer's ``_packed_params._packed_params`` tuple (int8
weight qtensor, float bias), which the artifact codec stores natively.

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
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext

GRANULARITIES = ("per_channel", "per_tensor")
BACKEND = "x86"  # packed-weight layout depends on the engine: apply and restore must agree


@dataclass(frozen=True, kw_only=True)
class Int8DynamicConfig:
    weight_granularity: str = "per_channel"

    def __post_init__(self) -> None:
        if self.weight_granularity not in GRANULARITIES:
            raise ConfigError(f"int8_dynamic.weight_granularity: unknown {self.weight_granularity!r}; "
                              f"valid choices: {', '.join(GRANULARITIES)}")


def quantize_linears(model: nn.Module, granularity: str) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = BACKEND
    qconfig = per_channel_dynamic_qconfig if granularity == "per_channel" else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation chatter, once per trial otherwise
        return quantize_dynamic(model.eval(), {nn.Linear: qconfig}, dtype=torch.qint8)


class Int8Dynamic(Technique):
    name = "int8_dynamic"
    family = Family.QUANTIZATION
    stage = Stage.QUANTIZATION
    Config = Int8DynamicConfig
    description = "Dynamic int8 (torch.ao, x86 kernels): int8 Linear weights, activations quantized per batch."
    # k-means clustering leaves codebook modules, not plain Linear layers to quantize.
    cannot_follow = frozenset({"kmeans_clustering"})

    def suggest(self, space, task) -> Int8DynamicConfig:
        granularity = space.suggest_categorical("weight_granularity", list(GRANULARITIES))
        return Int8DynamicConfig(weight_granularity=granularity)

    def apply(self, model: nn.Module, config: Int8DynamicConfig, ctx: TechniqueContext) -> nn.Module:
        if ctx.device != "cpu":
            ctx.note("int8_dynamic: int8 kernels are CPU-only; the quantized model is measured on the CPU")
        model = model.to("cpu")
        kept = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if kept:
            ctx.note(f"int8_dynamic: {len(kept)} conv layer(s) stay float32 (dynamic quantization covers "
                     f"Linear only): {', '.join(kept)}")
        if not any(type(m) is nn.Linear for m in model.modules()):
            ctx.note("int8_dynamic: the model has no nn.Linear layer; nothing was quantized")
        return quantize_linears(model, config.weight_granularity)

    def restore_structure(self, model, config: Int8DynamicConfig, example_inputs, structure) -> nn.Module:
        # Quantizing the untrained weights gives the same modules; the artifact's tensors replace them.
        return quantize_linears(model, config.weight_granularity)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Int8Dynamic)
