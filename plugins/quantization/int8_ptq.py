"""Static int8 post-training quantization with real int8 kernels (torch.ao FX graph mode).

Weights: int8, per-channel symmetric.  Activations: uint8, per-tensor, calibrated on the task's
calibration data.  ``convert_fx`` swaps Conv/Linear for ``torch.ao.nn.quantized`` modules that call
the x86 (fbgemm/oneDNN) int8 kernels, so the latency we time is int8 compute, not fake-quant.

torch.ao.quantization is deprecated in favour of torchao's PT2E flow; on CPU the PT2E flow needs
torch.compile/inductor lowering to reach int8 kernels, which would make the measured model differ
from the saved one.  FX mode gives an eager module that *is* the artifact, so it stays until the
replacement gives the same property.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext

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


def _qconfig_mapping(observer: str):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, default_per_channel_weight_observer

    activation = (HistogramObserver if observer == "histogram" else MinMaxObserver).with_args(
        dtype=torch.quint8, reduce_range=True)  # reduce_range: fbgemm's int16 accumulation stays exact
    return get_default_qconfig_mapping(BACKEND).set_global(
        QConfig(activation=activation, weight=default_per_channel_weight_observer))


def _prepare(model: nn.Module, observer: str, example_inputs) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = BACKEND
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation chatter, once per trial otherwise
        return prepare_fx(model.eval(), _qconfig_mapping(observer), example_inputs)


def _convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


class Int8PTQ(Technique):
    name = "int8_ptq"
    family = Family.QUANTIZATION
    stage = Stage.QUANTIZATION
    Config = Int8PTQConfig
    requires = frozenset({"calibration_data"})
    description = "Static int8 PTQ (torch.ao FX, x86 kernels): per-channel weights, calibrated activations."
    cannot_follow = frozenset({"kmeans_clustering"})  # clustered layers are not plain Conv/Linear

    def suggest(self, space, task) -> Int8PTQConfig:
        return Int8PTQConfig(observer=space.suggest_categorical("observer", list(OBSERVERS)),
                             calibration_batches=space.suggest_int("calibration_batches", 2, 16, log=True))

    def apply(self, model: nn.Module, config: Int8PTQConfig, ctx: TechniqueContext) -> nn.Module:
        if ctx.device != "cpu":
            ctx.note("int8_ptq: int8 kernels are CPU-only; the quantized model is measured on the CPU")
        model = model.to("cpu").eval()
        prepared = _prepare(model, config.observer, ctx.task.example_inputs())
        generator = torch.Generator().manual_seed(ctx.seed)
        loader = DataLoader(ctx.task.calibration, batch_size=config.calibration_batch_size,
                            shuffle=True, generator=generator)
        with torch.inference_mode():
            for x, _ in itertools.islice(loader, config.calibration_batches):
                prepared(x)
        return _convert(prepared)

    def restore_structure(self, model, config: Int8PTQConfig, example_inputs, structure) -> nn.Module:
        # Uncalibrated observers give placeholder scales; the artifact's tensors replace them all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _convert(_prepare(model, config.observer, example_inputs))


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Int8PTQ)
