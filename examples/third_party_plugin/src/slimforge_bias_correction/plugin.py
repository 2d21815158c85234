"""Empirical bias correction after weight quantization, as a third-party slimforge technique.

Quantizing a weight ``W`` to ``W_q`` shifts the *mean* of each output channel, not only its spread:
the error ``(W - W_q) x`` has expectation ``(W - W_q) E[x]``, which is not zero, and at 2-4 bits it
is large enough to move every downstream activation (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", section 4.2).  Bias correction adds the expected
error back to the layer's bias, ``b += E[W x] - E[W_q x]`` per output channel, so each layer's mean
pre-activation matches the float model's again.  This is the paper's *empirical* variant: both
expectations are measured on calibration data, the float side with the task's teacher, so no
batch-norm statistics are needed.

With ``sequential=True`` (the default) layers are corrected in execution order and each one is
measured with every layer before it already corrected, so a layer also absorbs the mean shift its
inputs still carry from upstream quantization.  ``sequential=False`` measures all layers in one
pass; downstream layers then also correct a shift their corrected inputs no longer have, which
overshoots at low bit widths.

What it can correct: a layer of the teacher (a plain Conv1d/Conv2d/Linear) whose module in the
compressed model, at the same name, computes ``op(x, W') + b`` with a float bias it can write --
one of ``slimforge.plugins.api.BIAS_LAYERS`` (plain Conv/Linear and every ``StoredLayer``:
weight_only_quant's and kmeans_clustering's layers), or an ``nn.Sequential`` ending in one of those (low_rank_factorization's
``Sequential(Linear(in, r), Linear(r, out))``: the last layer's bias shifts the pair's output).  A
layer without a bias gets one (recorded in the artifact header, so loading rebuilds it).  Layers
whose output shape differs from the teacher's (structured pruning, a distilled student) are
skipped with a note: there is no channel-for-channel float reference for them.

Why it cannot follow int8_ptq / int8_dynamic: torch.ao's int8 modules keep their bias inside packed
parameters (``_packed_params``) of an FX-converted graph, and int8_ptq requantizes every output with
a calibrated scale, so there is no float bias to adjust and every layer would be skipped.

The plugin imports only ``slimforge.plugins.api``.  The artifact is unchanged in kind: the corrected biases replace the old ones, value for value, in
the same float32 tensors, so the file is the same size up to entropy coding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from slimforge.plugins.api import (BIAS_LAYERS, ConfigError, Stage, Technique, TechniqueContext, first_calls,
                                   hookimpl, set_bias, weight_layers)

SAMPLES_RANGE = (16, 65536)
BATCH_SIZE = 128


@dataclass(frozen=True, kw_only=True)
class BiasCorrectionConfig:
    samples: int = 512  # calibration examples the channel means are estimated on
    sequential: bool = True  # correct layer by layer, each measured after the ones before it
    strength: float = 1.0  # fraction of the measured mean error added back (< 1 damps noisy estimates)

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or not (
                SAMPLES_RANGE[0] <= self.samples <= SAMPLES_RANGE[1]):
            raise ConfigError(f"bias_correction.samples: must be an int in {SAMPLES_RANGE[0]}..{SAMPLES_RANGE[1]}, "
                              f"got {self.samples!r}")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"bias_correction.sequential: must be true or false, got {self.sequential!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not 0 < self.strength <= 1:
            raise ConfigError(f"bias_correction.strength: must be a number in (0, 1], got {self.strength!r}")


@dataclass(frozen=True)
class _Target:
    name: str  # the teacher layer, and the module at that name in the compressed model
    owner: str  # the module whose bias is written (``name`` itself, or a Sequential's last layer)
    channel_dim: int  # 1 for convolutions (N, C, ...), -1 for linear layers (..., C)


def _bias_owner(model: nn.Module, name: str) -> str | None:
    """Qualified name of the module whose bias shifts the output of ``model.<name>``, or None."""
    module, owner = model.get_submodule(name), name
    while isinstance(module, nn.Sequential) and len(module):
        owner, module = f"{owner}.{len(module) - 1}", module[-1]
    return owner if isinstance(module, BIAS_LAYERS) else None


def _batches(dataset, samples: int) -> list[torch.Tensor]:
    subset = Subset(dataset, range(min(samples, len(dataset))))
    return [batch[0] for batch in DataLoader(subset, batch_size=BATCH_SIZE, shuffle=False)]


def channel_means(model: nn.Module, targets: list[_Target], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean output of each target layer of ``model`` per channel (float64, on the CPU)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(target: _Target):
        def record(_module, _inputs, output):
            out = output.detach().to(torch.float64).movedim(target.channel_dim, -1)
            flat = out.reshape(-1, out.shape[-1])
            sums[target.name] = sums.get(target.name, 0) + flat.sum(dim=0).cpu()
            counts[target.name] = counts.get(target.name, 0) + flat.shape[0]
        return record

    handles = [model.get_submodule(t.name).register_forward_hook(hook(t)) for t in targets]
    device = _device_of(model)
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / counts[name] for name, total in sums.items()}


class BiasCorrection(Technique):
    name = "bias_correction"
    # Not a kind of compression the built-ins name: its own family, so a plan may hold it together
    # with one quantizer (a plan holds at most one technique per family).
    family = "correction"
    # After every built-in quantizer (Stage.QUANTIZATION = 70) and after recovery training: it
    # corrects the final weights, and training would move the biases again.
    stage = Stage.QUANTIZATION + 5
    Config = BiasCorrectionConfig
    description = "Empirical bias correction after quantization: b += E[Wx] - E[W_q x] per channel, vs the teacher."
    cannot_follow = frozenset({"int8_ptq", "int8_dynamic"})  # packed int8 biases: see the module docstring
    # Alone it has no quantization error to correct: only sample it after a weight quantizer.
    must_follow = frozenset({"weight_only_quant", "kmeans_clustering"})
    requires = frozenset({"teacher", "calibration_data"})

    def suggest(self, space, task) -> BiasCorrectionConfig:
        # Nothing to search: the search decides only whether to use it.  Measured on tiny_mlp and
        # tiny_cnn at 2-4 bits, full-strength sequential correction beat strength 0.5 and the
        # one-pass variant on held-out mean error in every case, so trials spent on them are wasted.
        return BiasCorrectionConfig()

    def targets(self, model: nn.Module, teacher: nn.Module, ctx: TechniqueContext) -> list[_Target]:
        """Teacher layers, in execution order, that have a bias to correct in ``model``."""
        modules = dict(model.named_modules())
        teacher_layers = weight_layers(teacher)
        found = []
        called = first_calls(teacher, ctx.task.example_inputs(), teacher_layers)
        # In the order the forward pass first calls them (sequential correction depends on it);
        # layers never called go last, in module order.
        for name in sorted(teacher_layers, key=lambda layer: called.get(layer, math.inf)):
            if name not in modules:
                ctx.note(f"bias_correction: layer {name!r} is not in the compressed model; not corrected")
                continue
            owner = _bias_owner(model, name)
            if owner is None:
                ctx.note(f"bias_correction: {type(modules[name]).__name__} {name!r} has no float bias it can "
                         "write; not corrected")
                continue
            found.append(_Target(name, owner, -1 if isinstance(teacher_layers[name], nn.Linear) else 1))
        return found

    def apply(self, model: nn.Module, config: BiasCorrectionConfig, ctx: TechniqueContext) -> nn.Module:
        model.eval()
        teacher = ctx.task.teacher
        batches = _batches(ctx.task.calibration, config.samples)
        targets = self.targets(model, teacher, ctx)
        reference = channel_means(teacher, targets, batches)
        if not config.sequential:
            measured = channel_means(model, targets, batches)
        added, corrected, largest = {}, 0, (0.0, None)
        for target in targets:
            current = channel_means(model, [target], batches) if config.sequential else measured
            if current[target.name].shape != reference[target.name].shape:
                ctx.note(f"bias_correction: layer {target.name!r} has {current[target.name].numel()} output "
                         f"channels, the teacher's {reference[target.name].numel()}; not corrected")
                continue
            shift = (config.strength * (reference[target.name] - current[target.name])).to(torch.float32)
            owner = model.get_submodule(target.owner)
            if owner.bias is None:
                _add_zero_bias(owner, shift.numel())
                added[target.owner] = shift.numel()
            with torch.no_grad():
                owner.bias.add_(shift.to(owner.bias.device))
            corrected += 1
            peak = float(shift.abs().max())
            if largest[1] is None or peak > largest[0]:
                largest = (peak, target.name)
        if corrected:
            ctx.note(f"bias_correction: corrected {corrected} layer(s); largest channel shift "
                     f"{largest[0]:.3g} in {largest[1]!r}")
        if added:
            ctx.structure["added_bias"] = added
        return model

    def restore_structure(self, model, config: BiasCorrectionConfig, example_inputs, structure) -> nn.Module:
        for owner, channels in structure.get("added_bias", {}).items():
            _add_zero_bias(model.get_submodule(owner), int(channels))
        return model


def _device_of(module: nn.Module) -> torch.device:
    # Buffers count too: a layer of weight_only_quant holds no parameters at all.
    return next(itertools.chain(module.parameters(), module.buffers()), torch.zeros(0)).device


def _add_zero_bias(module: nn.Module, channels: int) -> None:
    """Give a bias-less layer a zero bias of the kind it would have had (``set_bias``: a buffer in
    weight_only_quant's layers, a parameter elsewhere)."""
    set_bias(module, torch.zeros(channels, dtype=torch.float32, device=_device_of(module)))


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(BiasCorrection)
