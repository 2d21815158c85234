"""Merge near-duplicate neurons and filters (data-free, function-preserving up to the merge error).

If output unit j of a Conv/Linear layer has a weight vector (bias included) ``w_j ~= c * w_i`` with
``c = w_i.w_j / |w_i|^2 > 0``, its pre-activation is ``c`` times unit i's.  Every op between the
layer and its consumer is positively homogeneous and channel-wise (ReLU, LeakyReLU, max/avg
pooling, dropout, identity, flatten), so ``output_j ~= c * output_i`` reaches the consumer, and
adding ``c * (consumer's input weights for j)`` to its weights for i lets j be removed.  Units are
merged when the cosine similarity of their vectors exceeds ``threshold``; a unit whose weights and
bias are all zero (pruned away earlier) outputs exactly zero and is removed without re-routing.

The chains are found with ``torch.fx``: Linear -> [elementwise]* -> Linear,
Conv -> [elementwise | pool]* -> Conv and Conv -> ... -> Flatten -> Linear, where each channel
feeds a block of H*W consumer inputs.  Anything else (branches, BatchNorm, residual adds, the
model's output layer) is noted and left alone.  The channels are then physically removed with
Torch-Pruning, which also shrinks the consumer's inputs (flatten blocks included); the kept
channel counts go into ``ctx.structure`` so ``restore_structure`` rebuilds the smaller shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.core.errors import ArtifactError, ConfigError, MissingDependencyError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext

THRESHOLD_RANGE = (0.90, 0.999)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# f(c x) = c f(x) for c > 0, channel by channel.
ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, F.dropout, F.dropout2d}
ELEMENTWISE_METHODS = {"relu"}
# Per-channel over spatial dimensions: only valid on a conv's (N, C, *spatial) output.
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}


@dataclass(frozen=True, kw_only=True)
class CosineMergeConfig:
    threshold: float = 0.95  # merge units whose (weight, bias) vectors have cosine similarity above this

    def __post_init__(self) -> None:
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ConfigError(f"cosine_merge.threshold: must be in (0, 1), got {self.threshold!r}")


@dataclass(frozen=True)
class Chain:
    producer: str  # layer whose output units are merged
    consumer: str  # the one layer that reads them
    block: int     # consumer inputs per producer unit (H*W after a Flatten, else 1)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise MissingDependencyError("torch-pruning", "cosine_merge") from None
    return torch_pruning


def _step_kind(node, previous, modules: dict[str, nn.Module]) -> str | None:
    """What ``node`` does to ``previous``'s output: elementwise / pool / flatten / layer, or None."""
    if node.op in ("call_function", "call_method"):
        others = list(node.args[1:]) + list(node.kwargs.values())
        if not node.args or node.args[0] is not previous or previous in others:
            return None
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, POOL_MODULES) and not getattr(module, "return_indices", False):
            return "pool"
        if type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
            return "flatten"
        return "layer" if type(module) in LAYERS else None
    if node.op == "call_function":
        if node.target in ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in POOL_FUNCTIONS and not node.kwargs.get("return_indices", False):
            return "pool"
        if node.target is torch.flatten and list(node.args[1:]) + list(node.kwargs.values()) in ([1], [1, -1]):
            return "flatten"
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target == "flatten" and list(node.args[1:]) + list(node.kwargs.values()) in ([1], [1, -1]):
            return "flatten"
    return None


def find_chains(model: nn.Module) -> tuple[list[Chain], dict[str, str]]:
    """Producer -> consumer chains the merge is exact for, in execution order, and the reasons
    the other Conv/Linear layers are skipped."""
    layers = {name: m for name, m in model.named_modules() if type(m) in LAYERS}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow etc.: nothing can be merged safely
        reason = f"the model is not traceable by torch.fx ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
        return [], dict.fromkeys(layers, reason)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chains, skipped = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        name, producer = node.target, layers[node.target]
        chain, reason = _follow(node, producer, modules, calls)
        if chain is None:
            skipped[name] = reason
        else:
            chains.append(Chain(name, *chain))
    skipped.update({name: "it is not called by the traced forward" for name in layers
                    if name not in skipped and name not in {c.producer for c in chains} and name not in calls})
    return chains, skipped


def _follow(node, producer: nn.Module, modules, calls) -> tuple[tuple[str, int] | None, str]:
    if calls[node.target] > 1:
        return None, "it is called more than once"
    if isinstance(producer, nn.Conv1d | nn.Conv2d) and producer.groups != 1:
        return None, "grouped convolution"
    is_conv, flattened, current = not isinstance(producer, nn.Linear), False, node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None, f"its output reaches {len(users)} nodes, not one consumer"
        user = users[0]
        if user.op == "output":
            return None, "its output is the model's output"
        kind = _step_kind(user, current, modules)
        if kind == "elementwise":
            pass
        elif kind == "pool" and is_conv and not flattened:
            pass
        elif kind == "flatten" and is_conv and not flattened:
            flattened = True
        elif kind == "layer":
            consumer = modules[user.target]
            if calls[user.target] > 1:
                return None, f"its consumer {user.target!r} is called more than once"
            out = producer.out_features if not is_conv else producer.out_channels
            if isinstance(consumer, nn.Linear) and (flattened or not is_conv):
                if consumer.in_features % out == 0 and (flattened or consumer.in_features == out):
                    return (user.target, consumer.in_features // out), ""
            elif (is_conv and not flattened and type(consumer) is type(producer)
                  and consumer.groups == 1 and consumer.in_channels == out):
                return (user.target, 1), ""
            return None, (f"its consumer {user.target!r} ({type(consumer).__name__}) does not read its units "
                          "channel by channel")
        else:
            what = user.target if user.op != "call_module" else type(modules[user.target]).__name__
            return None, f"{what} between it and its consumer is not a channel-wise positively homogeneous op"
        current = user


def plan_merges(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float):
    """Greedy, in unit order: each unit joins the most similar earlier kept unit above
    ``threshold`` (as ``(j, i, c)``), else is kept.  All-zero units are dropped (``c = 0``)."""
    vectors = weight.detach().flatten(1).to(torch.float64)
    if bias is not None:
        vectors = torch.cat([vectors, bias.detach().to(torch.float64)[:, None]], dim=1)
    norms = vectors.norm(dim=1)
    unit = vectors / norms.clamp(min=torch.finfo(torch.float64).tiny)[:, None]
    cosine = unit @ unit.T
    kept, merges, dead = [], [], []
    for j in range(vectors.shape[0]):
        if norms[j] == 0:
            dead.append(j)
            continue
        if kept:
            best = int(torch.argmax(cosine[j, kept]))
            if cosine[j, kept[best]] > threshold:
                i = kept[best]
                merges.append((j, i, float(vectors[i] @ vectors[j] / norms[i] ** 2)))
                continue
        kept.append(j)
    if not kept:  # an all-zero layer keeps one unit, so the module still exists
        kept.append(dead.pop(0))
    return kept, merges, dead


def _prune_group(model: nn.Module, producer: nn.Module, removed: list[int], example_inputs):
    tp = _torch_pruning()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    prune = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
    return graph.get_pruning_group(producer, prune, idxs=removed)


def _touched(group) -> set[nn.Module]:
    """The modules with parameters a Torch-Pruning group changes."""
    targets = (item.dep.target.module for item in group.items)
    return {m for m in targets if isinstance(m, nn.Module) and next(m.parameters(recurse=False), None) is not None}


class CosineMerge(Technique):
    name = "cosine_merge"
    family = Family.SHARING
    stage = Stage.SHARING
    Config = CosineMergeConfig
    needs_recovery = True
    description = "Merge near-duplicate neurons/filters (cosine > threshold) into one, re-routing consumer weights."

    def suggest(self, space, task) -> CosineMergeConfig:
        return CosineMergeConfig(threshold=space.suggest_float("threshold", *THRESHOLD_RANGE))

    def apply(self, model: nn.Module, config: CosineMergeConfig, ctx: TechniqueContext) -> nn.Module:
        model.eval()
        chains, skipped = find_chains(model)
        for name, reason in skipped.items():
            ctx.note(f"cosine_merge: {name!r} skipped: {reason}")
        device = next(model.parameters()).device
        example_inputs = tuple(t.to(device) for t in ctx.task.example_inputs())
        kept_counts = {}
        for chain in chains:
            producer, consumer = model.get_submodule(chain.producer), model.get_submodule(chain.consumer)
            kept, merges, dead = plan_merges(producer.weight, producer.bias, config.threshold)
            removed = sorted([j for j, _, _ in merges] + dead)
            if not removed:
                continue
            group = _prune_group(model, producer, removed, example_inputs)
            if _touched(group) != {producer, consumer}:
                others = sorted(n for n, m in model.named_modules() if m in _touched(group) - {producer, consumer})
                ctx.note(f"cosine_merge: {chain.producer!r} skipped: removing its units also changes {others}")
                continue
            with torch.no_grad():
                inputs = consumer.weight.view(consumer.weight.shape[0], -1, chain.block, *consumer.weight.shape[2:])
                for j, i, c in merges:
                    inputs[:, i] += c * inputs[:, j]
            group.prune()
            kept_counts[chain.producer] = len(kept)
        ctx.structure["kept"] = kept_counts
        return model

    def restore_structure(self, model, config: CosineMergeConfig, example_inputs, structure) -> nn.Module:
        for name, kept in structure.get("kept", {}).items():
            try:
                producer = model.get_submodule(name)
            except AttributeError:
                raise ArtifactError(f"cosine_merge: merged layer {name!r} is not in the rebuilt model") from None
            units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
            _prune_group(model, producer, list(range(int(kept), units)), example_inputs).prune()
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(CosineMerge)
