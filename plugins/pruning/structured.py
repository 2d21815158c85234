"""Structured pruning: remove whole output channels / neurons, so the network gets smaller and faster.

Every Conv/Linear except the output layer (the last one registered, as in parameter_distillation)
keeps ``round(C * (1 - channel_sparsity))`` of its ``C`` output channels (at least one), chosen by
a searched criterion:

- ``magnitude``: L1 norm of the channel's weights (``tp.importance.MagnitudeImportance(p=1)``);
- ``taylor``: sum over the channel of mean_b |w * g_b| (``tp.importance.TaylorImportance``);
- ``fisher``: sum of w^2 * E[g^2] over the channel, OBD with the empirical Fisher diagonal
  (``tp.importance.HessianImportance``).

Torch-Pruning's dependency graph couples each channel with the input slices of the layers that
consume it (through pooling, flatten, batch norm, residual adds) and scores the channel on the
whole group.  The gradients for ``taylor`` / ``fisher`` are the ones unstructured pruning uses
(``plugins.pruning.importance.gradient_statistics``: ``batches`` seeded training batches of 64),
written into ``.grad`` before ``pruner.step()`` and cleared after: mean_b |g_b| for taylor (so
Torch-Pruning's |w * grad| is the per-batch-averaged Taylor score), mean_b g_b^2 for fisher.
We accumulate the squared gradients ourselves rather than through
``HessianImportance.accumulate_grad``: in torch-pruning 1.6.1 that method tests ``name in`` a
dict keyed by parameter, so every call overwrites the sum and only the last gradient counts.

The channel counts kept are computed here and handed to Torch-Pruning per layer
(``pruning_ratio_dict``): its own ``int(C * (1 - ratio))`` truncates float noise (C=20, ratio
0.8 keeps 3, not 4) and silently skips a layer whose count would reach zero.  The resulting layer
shapes go into ``ctx.structure`` and ``restore_structure`` rebuilds them with
``plugins.common.resize_layers``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from slimforge.core.errors import ConfigError, MissingDependencyError, PluginError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import RESIZABLE, layer_shapes, resize_layers, weight_layers
from slimforge.plugins.pruning.importance import CRITERIA, DEFAULT_BATCHES, gradient_statistics

# One ratio for the whole network keeps the space to two parameters; below 0.1 the saving is not
# worth a trial, above 0.8 a LeNet-sized layer is down to a handful of channels.
CHANNEL_SPARSITY_RANGE = (0.1, 0.8)
CHANNEL_SPARSITY_STEP = 0.05


@dataclass(frozen=True, kw_only=True)
class StructuredPruningConfig:
    channel_sparsity: float = 0.5  # fraction of each prunable layer's output channels removed
    criterion: str = "magnitude"  # magnitude | taylor | fisher
    batches: int = DEFAULT_BATCHES  # training batches of 64 the taylor / fisher gradients average

    def __post_init__(self) -> None:
        value = self.channel_sparsity
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"structured_pruning.channel_sparsity: must be in [0, 1), got {value!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"structured_pruning.criterion: must be one of {', '.join(CRITERIA)}, "
                              f"got {self.criterion!r}")
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ConfigError(f"structured_pruning.batches: must be an integer >= 1, got {self.batches!r}")


def kept_channels(channels: int, channel_sparsity: float) -> int:
    """Channels a layer of ``channels`` outputs keeps: round(C * (1 - s)), half up, at least 1."""
    return max(1, int(channels * (1.0 - channel_sparsity) + 0.5))


def _importance(tp, model: nn.Module, config: StructuredPruningConfig, ctx: TechniqueContext):
    if config.criterion == "magnitude":
        return tp.importance.MagnitudeImportance(p=1)
    stats = gradient_statistics(model, ctx.task.split("train"), batches=config.batches, seed=ctx.seed)
    source = stats.mean_abs if config.criterion == "taylor" else stats.mean_square
    for name, p in model.named_parameters():
        p.grad = source[name].to(p.dtype)
    return tp.importance.TaylorImportance() if config.criterion == "taylor" else tp.importance.HessianImportance()


def _check_resizable(before: dict, model: nn.Module) -> None:
    """Every tensor Torch-Pruning resized must belong to a layer ``resize_layers`` can rebuild."""
    modules = dict(model.named_modules())
    for key, tensor in model.state_dict().items():
        if key in before and tuple(tensor.shape) != before[key]:
            owner = modules[key.rpartition(".")[0]]
            if type(owner) not in RESIZABLE:
                raise PluginError(f"structured_pruning: Torch-Pruning resized {key!r} of a "
                                  f"{type(owner).__name__}, which the artifact cannot rebuild")


def prune_channels(model: nn.Module, config: StructuredPruningConfig, ctx: TechniqueContext,
                   owner: str = "structured_pruning") -> nn.Module:
    """Remove channels as ``config`` says and record the new shapes in ``ctx.structure``.
    Shared with parameter distillation, which builds its student the same way."""
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError("torch-pruning", "structured pruning") from exc
    layers = weight_layers(model)
    if not layers:
        ctx.note(f"{owner}: no Conv/Linear layer to prune; model left unchanged")
    elif config.channel_sparsity > 0:
        output_name, output = list(layers.items())[-1]
        ctx.note(f"{owner}: {output_name!r} keeps all outputs (the model's output layer)")
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ratios = {}
        for name, layer in layers.items():
            if layer is not output:
                channels = layer.weight.shape[0]
                kept = kept_channels(channels, config.channel_sparsity)
                # Torch-Pruning keeps int(C * (1 - ratio)): aim half a channel above ``kept``.
                ratios[layer] = max(0.0, 1.0 - (kept + 0.5) / channels)
        try:
            importance = _importance(tp, model, config, ctx)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Torch-Pruning warns about unwrapped params it skips
                device = next(model.parameters()).device
                example = tuple(x.to(device) for x in ctx.task.example_inputs())
                pruner = tp.pruner.BasePruner(model, example, importance=importance,
                                              pruning_ratio=0.0, pruning_ratio_dict=ratios,
                                              ignored_layers=[output])
                pruner.step()
        finally:
            for p in model.parameters():
                p.grad = None
        _check_resizable(before, model)
        for name, layer in weight_layers(model).items():
            channels = before[f"{name}.weight"][0]
            unpruned = layer.weight.shape[0] == channels > kept_channels(channels, config.channel_sparsity)
            if layer is not output and unpruned:
                ctx.note(f"{owner}: Torch-Pruning left {name!r} whole "
                         "(its channels could not be removed with their dependencies)")
    ctx.structure["shapes"] = layer_shapes(model)
    return model


class StructuredPruning(Technique):
    name = "structured_pruning"
    family = Family.PRUNING
    stage = Stage.PRUNING
    Config = StructuredPruningConfig
    needs_recovery = True
    # taylor / fisher score channels on training batches (and removing channels is not worth it
    # without the recovery training that brings the accuracy back).
    requires = frozenset({"training_data"})
    description = ("Removes whole channels/neurons (Torch-Pruning), criterion magnitude/taylor/fisher and "
                   "channel sparsity searched: smaller and faster.")
    # Earlier stages (student init) leave plain Conv/Linear layers, which Torch-Pruning handles;
    # techniques that replace those modules (low_rank, sharing, quantization) all come later.
    cannot_follow = frozenset()

    def suggest(self, space, task) -> StructuredPruningConfig:
        return StructuredPruningConfig(
            criterion=space.suggest_categorical("criterion", list(CRITERIA)),
            channel_sparsity=round(space.suggest_float("channel_sparsity", *CHANNEL_SPARSITY_RANGE,
                                                       step=CHANNEL_SPARSITY_STEP), 3))

    def apply(self, model: nn.Module, config: StructuredPruningConfig, ctx: TechniqueContext) -> nn.Module:
        return prune_channels(model, config, ctx, owner=self.name)

    def restore_structure(self, model, config, example_inputs, structure) -> nn.Module:
        return resize_layers(model, structure["shapes"])


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(StructuredPruning)
