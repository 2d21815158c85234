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

Weight sites of sequence models (``core.sites``), and which of them can merge:

- The feed-forward block of a torch ``nn.TransformerEncoderLayer`` with a ReLU activation
  (``linear1 -> ReLU -> dropout -> linear2``, the torch default): its hidden neurons merge like a
  Linear -> ReLU -> Linear chain (torch.fx treats the layer as one opaque call, so the block is
  recognised by the layer's class); the kept width goes into ``ctx.structure["ffn"]``.  With GELU
  it is noted: GELU is not positively homogeneous, so ``GELU(c x) != c GELU(x)`` and the merged
  neuron would not be re-routed exactly.
- Attention projections (packed ``in_proj_weight`` / ``c_attn``, q/k/v, and the output projection):
  noted.  Their rows are head dimensions; merging one would give that head fewer dimensions than
  the others, and every attention implementation needs heads of one size, which is why heads stay
  whole (removing whole heads is structured pruning's job).
- Embedding tables: noted.  A row is looked up by token id, not summed by a consumer, so no
  consumer weight can absorb a merged row (sharing rows is what k-means does).
- RNN weights: noted.  Hidden units feed back through ``weight_hh`` and sigmoid/tanh gates, which
  are not positively homogeneous, so a merged unit cannot be re-routed.
- Hugging Face Linear / Conv1D layers outside attention (BERT, GPT-2, Llama FFNs): merged where
  torch.fx traces the model; the HF models torch.fx cannot trace are noted with the tracer's error,
  since nothing else says which ops sit between a layer and its consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.core.errors import ArtifactError, ConfigError, MissingDependencyError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import SiteKind, weight_sites
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


_ATTENTION_ROLES = {"qkv", "q", "k", "v", "attn_out"}


_HEADS_WHOLE = ("attention projection: its rows are head dimensions, and heads must stay whole "
                "(merging one row would leave that head smaller than the others)")


def attention_layers(model: nn.Module) -> set[str]:
    """Module names of the attention projections among the model's weight sites."""
    return {site.module for site in weight_sites(model).values()
            if site.role in _ATTENTION_ROLES or site.kind == SiteKind.ATTENTION_IN_PROJ}


def site_reasons(model: nn.Module, handled: set[str], untraceable: str | None) -> dict[str, str]:
    """Why each weight site outside ``handled`` (module names fx or the FFN rule looked at) cannot be
    merged, by module.param name (see the module docstring); ``untraceable`` is torch.fx's reason
    when it could not trace the model."""
    reasons = {}
    for name, site in weight_sites(model).items():
        if site.module in handled:
            continue
        if site.role in _ATTENTION_ROLES or site.kind == SiteKind.ATTENTION_IN_PROJ:
            reasons[name] = _HEADS_WHOLE
        elif site.kind == SiteKind.EMBEDDING:
            reasons[name] = "Embedding rows are looked up by token id; no consumer weight can absorb a merged row"
        elif site.kind == SiteKind.RNN:
            reasons[name] = ("recurrent units feed back through weight_hh and sigmoid/tanh gates, which are not "
                             "positively homogeneous: a merged unit cannot be re-routed")
        elif site.kind == SiteKind.HF_CONV1D:
            reasons[name] = untraceable or "Hugging Face Conv1D: only Linear/Conv chains are followed"
    return reasons


def encoder_ffns(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """``nn.TransformerEncoderLayer`` modules whose feed-forward block can merge (ReLU, plain Linears),
    and the reasons the others cannot."""
    mergeable, reasons = [], {}
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        activation = layer.activation
        relu = activation in (F.relu, torch.relu) or isinstance(activation, nn.ReLU)
        plain = type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear
        if relu and plain:
            mergeable.append(name)
        else:
            why = ("its activation is not ReLU, so a merged neuron's output is not c times the kept one's "
                   "(GELU(c x) != c GELU(x))" if not relu else "its linear1/linear2 are not plain Linears any more")
            reasons[f"{name}.linear1"] = reasons[f"{name}.linear2"] = f"feed-forward block of {name!r}: {why}"
    return mergeable, reasons


def _shrink_ffn(layer: nn.TransformerEncoderLayer, hidden: int) -> tuple[nn.Linear, nn.Linear]:
    """Fresh ``linear1`` / ``linear2`` with ``hidden`` neurons in place of the layer's."""
    old1, old2 = layer.linear1, layer.linear2
    kw = {"device": old1.weight.device, "dtype": old1.weight.dtype}
    new1 = nn.Linear(old1.in_features, hidden, bias=old1.bias is not None, **kw)
    new2 = nn.Linear(hidden, old2.out_features, bias=old2.bias is not None, **kw)
    layer.linear1, layer.linear2 = new1, new2
    return new1, new2


def merge_ffn(layer: nn.TransformerEncoderLayer, threshold: float) -> int | None:
    """Merge ``layer``'s near-duplicate hidden neurons (``plan_merges``) into the kept ones, re-routing
    ``linear2``'s columns; the new hidden width, or None when nothing merged."""
    old1, old2 = layer.linear1, layer.linear2
    kept, merges, dead = plan_merges(old1.weight, old1.bias, threshold)
    if not merges and not dead:
        return None
    with torch.no_grad():
        columns = old2.weight.detach().clone()
        for j, i, c in merges:
            columns[:, i] += c * columns[:, j]
        index = torch.tensor(kept, device=old1.weight.device)
        new1, new2 = _shrink_ffn(layer, len(kept))
        new1.weight.copy_(old1.weight[index])
        if old1.bias is not None:
            new1.bias.copy_(old1.bias[index])
        new2.weight.copy_(columns[:, index])
        if old2.bias is not None:
            new2.bias.copy_(old2.bias)
    return len(kept)


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
        ffns, ffn_reasons = encoder_ffns(model)
        ffn_linears = {f"{name}.{child}" for name in ffns for child in ("linear1", "linear2")} | set(ffn_reasons)
        chains, skipped = find_chains(model)
        untraceable = next((r for r in skipped.values() if r.startswith("the model is not traceable")), None)
        # An encoder layer is one opaque call to torch.fx ("not called"); its FFN is handled below.
        # An attention projection never merges, whatever fx found: its reason is the heads'.
        attention = attention_layers(model)
        skipped = {name: _HEADS_WHOLE if name in attention else reason for name, reason in skipped.items()
                   if name not in ffn_linears}
        skipped.update({c.producer: _HEADS_WHOLE for c in chains if c.producer in attention})
        chains = [c for c in chains if c.producer not in attention and c.consumer not in attention]
        for name, reason in skipped.items():
            ctx.note(f"cosine_merge: {name!r} skipped: {reason}")
        handled = set(skipped) | ffn_linears | {c.producer for c in chains}
        for name, reason in {**ffn_reasons, **site_reasons(model, handled, untraceable)}.items():
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
        hidden = {name: width for name in ffns if (width := merge_ffn(model.get_submodule(name), config.threshold))}
        if hidden:  # absent when no FFN merged, so a CNN's header is the one written before
            ctx.structure["ffn"] = hidden
        candidates = len(chains) + len(ffns)
        if candidates and not kept_counts and not hidden:  # why a mergeable model did not shrink
            ctx.note(f"cosine_merge: no units above cosine {config.threshold:.3f} (or all-zero) in the "
                     f"{candidates} mergeable layer(s); nothing merged")
        return model

    def restore_structure(self, model, config: CosineMergeConfig, example_inputs, structure) -> nn.Module:
        for name, kept in structure.get("kept", {}).items():
            try:
                producer = model.get_submodule(name)
            except AttributeError:
                raise ArtifactError(f"cosine_merge: merged layer {name!r} is not in the rebuilt model") from None
            units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
            _prune_group(model, producer, list(range(int(kept), units)), example_inputs).prune()
        for name, hidden in structure.get("ffn", {}).items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                layer = None
            if not isinstance(layer, nn.TransformerEncoderLayer):
                raise ArtifactError(f"cosine_merge: merged feed-forward block {name!r} is not an "
                                    "nn.TransformerEncoderLayer of the rebuilt model")
            _shrink_ffn(layer, int(hidden))
        return model


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(CosineMerge)
