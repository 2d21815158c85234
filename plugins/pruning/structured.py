"""Structured pruning: remove whole output channels / neurons / attention heads, so the network gets
smaller and faster.

What it acts on (``core.sites``):

- CNNs and MLPs: every Conv/Linear except the output layer (the last one registered, as in
  parameter_distillation) keeps ``round(C * (1 - channel_sparsity))`` of its ``C`` output channels
  (at least one).  Torch-Pruning's ``BasePruner`` couples each channel with the input slices of
  the layers that consume it (through pooling, flatten, batch norm, residual adds) and scores it
  on the whole group; the counts are handed to it per layer (``pruning_ratio_dict``): its own
  ``int(C * (1 - ratio))`` truncates float noise (C=20, ratio 0.8 keeps 3, not 4) and silently
  skips a layer whose count would reach zero.
- Transformers (a model with attention sites or Hugging Face ``Conv1D``), the standard structured
  units, with the same ``channel_sparsity``:
  - **attention heads**, removed whole (``plugins.pruning.heads``): ``round(H * (1 - s))`` of a
    layer's ``H`` query heads kept, with their key/value rows and output-projection columns, in
    ``nn.MultiheadAttention``, separate q/k/v (BERT, Llama) and GPT-2's packed transposed
    ``c_attn``.  Grouped-query attention keeps every key/value head (each is shared by a group of
    query heads) and every group keeps the same number of query heads, as Torch-Pruning does;
  - **FFN channels** (intermediate width: BERT ``intermediate.dense``, GPT-2 ``mlp.c_fc``, Llama
    ``gate_proj`` + ``up_proj`` coupled through the gate, ``linear1``) and other hidden layers
    whose group stays among plain layers (a pooler), through Torch-Pruning's dependency graph
    traced on the logits (``core.outputs.logits_of``; Hugging Face models without their KV cache)
    with a pruner for transformers' ``Conv1D``.
  The **hidden width** is kept: a group that reaches an embedding, a LayerNorm / RMSNorm, a bare
  parameter or an attention projection is the residual stream, and resizing it would touch every
  norm and the embeddings; embeddings and position embeddings are never resized, and a bare learned
  position tensor (``uncovered_parameters``) is kept out of the graph.  Each is a note.
- RNN (GRU/LSTM) hidden units are not pruned, with a note: Torch-Pruning 1.6.1 has no GRU/RNN
  pruner and its LSTM pruner is single-layer and slices ``weight_hh`` along the wrong dimension.

Criteria (searched): ``magnitude``, L1 norm of the channel's / head's weights
(``tp.importance.MagnitudeImportance(p=1)``); ``taylor``, sum of mean_b |w * g_b|
(``tp.importance.TaylorImportance``); ``fisher``, sum of w^2 * E[g^2], OBD with the empirical Fisher
diagonal (``tp.importance.HessianImportance``).  Heads and transformer groups sum the same element
scores over their group (``_group_importance``), since Torch-Pruning's importances skip ``Conv1D``.
The gradients are the ones unstructured pruning uses (``plugins.pruning.importance.gradient_statistics``:
``batches`` seeded training batches of 64), written into ``.grad`` before ``pruner.step()`` and
cleared after: mean_b |g_b| for taylor (so Torch-Pruning's |w * grad| is the per-batch-averaged
Taylor score), mean_b g_b^2 for fisher.  We accumulate the squared gradients ourselves rather than
through ``HessianImportance.accumulate_grad``: in torch-pruning 1.6.1 that method tests ``name in``
a dict keyed by parameter, so every call overwrites the sum and only the last gradient counts.

``ctx.structure`` records the layer shapes (``plugins.common.layer_shapes``, HF ``Conv1D``
included) and, when heads were removed, ``heads``: ``{attention module: [query heads, key/value
heads]}``.  ``restore_structure`` rebuilds the heads first (slicing the attention projections
and updating the module's head counts), then the shapes (``resize_layers``).  Artifacts written
before head pruning existed record shapes only and still load.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from slimforge.core.errors import ConfigError, MissingDependencyError, PluginError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.core.outputs import logits_of
from slimforge.core.sites import SiteKind, is_hf_conv1d, uncovered_parameters, weight_sites
from slimforge.plugins.common import RESIZABLE, layer_shapes, resize_layers
from slimforge.plugins.pruning.heads import attention_units, choose_heads, head_scores, prune_heads
from slimforge.plugins.pruning.importance import (CRITERIA, DEFAULT_BATCHES, fisher_score, gradient_statistics,
                                                  taylor_score)

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


def restore_pruned(model: nn.Module, structure: dict) -> nn.Module:
    """Rebuild what ``prune_channels`` left: head counts first (they slice the attention
    projections), then every recorded layer shape.  Artifacts before head pruning record shapes only."""
    restore_heads(model, structure.get("heads", {}))
    return resize_layers(model, structure["shapes"])


def kept_channels(channels: int, channel_sparsity: float) -> int:
    """Channels a layer of ``channels`` outputs keeps: round(C * (1 - s)), half up, at least 1."""
    return max(1, int(channels * (1.0 - channel_sparsity) + 0.5))


def _gradient_stats(model: nn.Module, config: StructuredPruningConfig, ctx: TechniqueContext):
    if config.criterion == "magnitude":
        return None
    return gradient_statistics(model, ctx.task.split("train"), batches=config.batches, seed=ctx.seed)


def _importance(tp, model: nn.Module, config: StructuredPruningConfig, stats):
    if config.criterion == "magnitude":
        return tp.importance.MagnitudeImportance(p=1)
    source = stats.mean_abs if config.criterion == "taylor" else stats.mean_square
    for name, p in model.named_parameters():
        p.grad = source[name].to(p.dtype)
    return tp.importance.TaylorImportance() if config.criterion == "taylor" else tp.importance.HessianImportance()


def _element_score(model: nn.Module, config: StructuredPruningConfig, stats):
    """Per-element score of a stored weight, the one Torch-Pruning's importance sums over a group:
    |w| (its ``MagnitudeImportance(p=1)``), |w| * mean|g| or w^2 * mean g^2."""
    names = {id(p): n for n, p in model.named_parameters()}

    def score(weight: torch.Tensor) -> torch.Tensor:
        if config.criterion == "magnitude":
            return weight.detach().abs().float()
        grads = stats.mean_abs if config.criterion == "taylor" else stats.mean_square
        grad = grads[names[id(weight)]]
        return taylor_score(weight, grad) if config.criterion == "taylor" else fisher_score(weight, grad)
    return score


def _group_importance(graph, group, element_score) -> torch.Tensor | None:
    """Channel scores of a Torch-Pruning group: each member layer's element scores summed over the
    channel's rows (outputs) or columns (inputs), accumulated at the root's channel index, as
    ``tp.importance.GroupMagnitudeImportance(group_reduction="sum")`` does, but for every layer kind
    a site can be (Torch-Pruning's importances skip transformers' Conv1D)."""
    total = None
    for i, (dep, idxs) in enumerate(group):
        layer, root_idxs = dep.layer, group[i].root_idxs
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not is_hf_conv1d(layer):
            continue
        if any(r is None for r in root_idxs):
            continue
        weight = layer.weight
        scores = element_score(weight)
        matrix = scores.t() if is_hf_conv1d(layer) else scores.reshape(scores.shape[0], -1)
        if graph.is_out_channel_pruning_fn(dep.pruning_fn):
            local = matrix[idxs].sum(dim=1)
        elif graph.is_in_channel_pruning_fn(dep.pruning_fn):
            local = matrix.t()[idxs].sum(dim=1)
        else:
            continue
        if total is None:
            total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        total.scatter_add_(0, torch.tensor(root_idxs, dtype=torch.long), local.double().cpu())
    return total


def _forward(model: nn.Module, example: tuple) -> torch.Tensor:
    """What Torch-Pruning traces: the logits of a forward pass.  Hugging Face models run without
    their key/value cache, whose concatenations are not channels of the model."""
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        try:
            return logits_of(model(*example, use_cache=False))
        except TypeError:  # a model with that config field whose forward takes no use_cache
            pass
    return logits_of(model(*example))


class _HFConv1DPruner:
    """Torch-Pruning pruner for transformers' Conv1D (GPT-2): ``y = x @ W + b`` with W stored
    (in, out), so output channels are columns.  Built lazily: torch_pruning is imported on use."""

    @staticmethod
    def make(tp):
        class HFConv1DPruner(tp.pruner.function.BasePruningFunc):
            def prune_out_channels(self, layer, idxs):
                keep = sorted(set(range(layer.nf)) - set(idxs))
                layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
                layer.nf = len(keep)
                return layer

            def prune_in_channels(self, layer, idxs):
                keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
                layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
                return layer

            def get_out_channels(self, layer):
                return layer.nf

            def get_in_channels(self, layer):
                return layer.weight.shape[0]

        return HFConv1DPruner()


def _is_op(module) -> bool:
    """A Torch-Pruning graph node that is an operation (add, reshape, concat, ...), not a layer."""
    return type(module).__module__.startswith("torch_pruning")


def _check_resizable(before: dict, model: nn.Module) -> None:
    """Every tensor Torch-Pruning resized must belong to a layer ``resize_layers`` can rebuild."""
    modules = dict(model.named_modules())
    for key, tensor in model.state_dict().items():
        if key in before and tuple(tensor.shape) != before[key]:
            owner = modules[key.rpartition(".")[0]]
            if type(owner) not in RESIZABLE and not is_hf_conv1d(owner):
                raise PluginError(f"structured_pruning: Torch-Pruning resized {key!r} of a "
                                  f"{type(owner).__name__}, which the artifact cannot rebuild")


def prune_channels(model: nn.Module, config: StructuredPruningConfig, ctx: TechniqueContext,
                   owner: str = "structured_pruning") -> nn.Module:
    """Remove channels and attention heads as ``config`` says and record the new structure in
    ``ctx.structure``.  Shared with parameter distillation, which builds its student the same way."""
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError("torch-pruning", "structured pruning") from exc
    sites = weight_sites(model)
    units, problems = attention_units(model, sites)
    attention = {id(s.owner(model)) for s in sites.values() if s.role in ATTENTION_ROLES}
    attention |= {id(model.get_submodule(s.module)) for s in sites.values() if s.kind == SiteKind.ATTENTION_IN_PROJ}
    layers = _layers(model, sites)
    _note_left_alone(model, sites, ctx, owner)
    for problem in problems:
        ctx.note(f"{owner}: {problem}")
    if not layers:
        ctx.note(f"{owner}: no Conv/Linear layer to prune; model left unchanged")
    elif config.channel_sparsity > 0:
        output_name, output = list(layers.items())[-1]
        ctx.note(f"{owner}: {output_name!r} keeps all outputs (the model's output layer)")
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        candidates = {n: m for n, m in layers.items() if m is not output and id(m) not in attention}
        hidden: dict[str, str] = {}
        stats = _gradient_stats(model, config, ctx)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Torch-Pruning warns about unwrapped params it skips
                device = next(model.parameters()).device
                example = tuple(x.to(device) for x in ctx.task.example_inputs())
                if attention or any(is_hf_conv1d(m) for m in layers.values()):
                    hidden = _prune_transformer_channels(tp, model, sites, candidates, example, attention, config, stats)
                else:
                    _prune_with_base_pruner(tp, model, candidates, output, example, config, stats)
        finally:
            for p in model.parameters():
                p.grad = None
        if hidden:
            kinds = sorted({kind for why in hidden.values() for kind in why})
            ctx.note(f"{owner}: outputs of {', '.join(map(repr, hidden))} kept whole: they are the hidden width, "
                     f"shared with {', '.join(kinds)} (attention heads and FFN channels are pruned instead)")
        _check_resizable(before, model)
        for name, layer in layers.items():
            channels = before[f"{name}.weight"][1 if is_hf_conv1d(layer) else 0]
            unpruned = _out_channels(layer) == channels > kept_channels(channels, config.channel_sparsity)
            if name in candidates and name not in hidden and unpruned:
                ctx.note(f"{owner}: Torch-Pruning left {name!r} whole "
                         "(its channels could not be removed with their dependencies)")
        kept_heads = _prune_attention(model, units, config, _element_score(model, config, stats), ctx, owner)
        if kept_heads:
            ctx.structure["heads"] = kept_heads
    ctx.structure["shapes"] = layer_shapes(model)
    return model


ATTENTION_ROLES = frozenset({"qkv", "q", "k", "v", "attn_out"})


def _layers(model: nn.Module, sites: dict) -> dict[str, nn.Module]:
    """Conv / Linear / HF Conv1D layers in module order, including a layer whose weight is tied to
    another site (GPT-2's lm head holds the token embedding): it is still the output layer."""
    kinds = (SiteKind.LINEAR, SiteKind.CONV, SiteKind.HF_CONV1D)
    wanted = {s.module for s in sites.values() if s.kind in kinds and s.param == "weight"}
    wanted |= {t.rpartition(".")[0] for s in sites.values() for t in s.tied if t.endswith(".weight")}
    return {name: m for name, m in model.named_modules()
            if name in wanted and (isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_hf_conv1d(m))}


def _prune_with_base_pruner(tp, model, candidates, output, example, config, stats) -> None:
    """CNNs and MLPs: Torch-Pruning's BasePruner, one local ratio per layer."""
    ratios = {}
    for layer in candidates.values():
        channels = layer.weight.shape[0]
        kept = kept_channels(channels, config.channel_sparsity)
        # Torch-Pruning keeps int(C * (1 - ratio)): aim half a channel above ``kept``.
        ratios[layer] = max(0.0, 1.0 - (kept + 0.5) / channels)
    importance = _importance(tp, model, config, stats)
    pruner = tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=0.0, pruning_ratio_dict=ratios,
                                  ignored_layers=[output], forward_fn=_forward)
    pruner.step()


def _prune_transformer_channels(tp, model, sites, candidates, example, attention, config, stats) -> dict[str, set]:
    """Transformers: prune the output channels of every layer whose Torch-Pruning group holds only
    layers the artifact rebuilds (FFN intermediate channels: BERT ``intermediate.dense``, GPT-2
    ``mlp.c_fc``, Llama ``gate_proj`` + ``up_proj``, a pooler); a group that reaches an embedding, a
    norm, a bare parameter or an attention projection is the hidden width and is left whole.
    Returns those layers with what their group reaches.

    Through Torch-Pruning's dependency graph directly (``get_pruning_group`` + ``group.prune()``):
    its BasePruner cannot give transformers' Conv1D a ratio (``ops.type2class`` maps a customized
    layer type to an element-wise op) and its importances skip Conv1D."""
    conv1d = {type(m) for m in candidates.values() if is_hf_conv1d(m)} | {
        type(s.owner(model)) for s in sites.values() if s.kind == SiteKind.HF_CONV1D}
    bare = set(uncovered_parameters(model, sites))
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, forward_fn=_forward,
        customized_pruners={cls: _HFConv1DPruner.make(tp) for cls in conv1d} or None,
        # A learned position tensor (a bare Parameter) is never resized: it stays out of the graph.
        ignored_params=[p for n, p in model.named_parameters() if n in bare])
    names = {m: n for n, m in model.named_modules()}
    # A parameter node (an RMSNorm's weight, which Torch-Pruning sees as unwrapped) by its module's class.
    params = {id(p): type(model.get_submodule(n.rpartition(".")[0])).__name__ if "." in n else n
              for n, p in model.named_parameters()}
    element_score = _element_score(model, config, stats)
    hidden: dict[str, set] = {}
    for name, layer in candidates.items():
        pruner = graph.get_pruner_of_module(layer)
        channels = pruner.get_out_channels(layer)
        group = graph.get_pruning_group(layer, pruner.prune_out_channels, list(range(channels)))
        reaches = _non_rebuildable(tp, group, layer, names, params, attention)
        if reaches:
            hidden[name] = reaches
            continue
        if channels < (_out_channels_at_start(name, sites) or channels):
            continue  # already pruned with an earlier layer of its group (Llama's gate_proj / up_proj)
        kept = kept_channels(channels, config.channel_sparsity)
        scores = _group_importance(graph, group, element_score)
        dropped = sorted(int(i) for i in torch.argsort(scores, stable=True)[:channels - kept])
        if dropped:
            graph.get_pruning_group(layer, pruner.prune_out_channels, dropped).prune()
    return hidden


def _out_channels_at_start(name: str, sites: dict) -> int | None:
    site = sites.get(f"{name}.weight")  # None: a layer holding a weight tied to an earlier site
    return site.out_features if site is not None else None


def _non_rebuildable(tp, group, layer, names: dict, params: dict, attention: set) -> set[str]:
    """What a group reaches that ``resize_layers`` does not rebuild (empty: the group is prunable)."""
    reaches = set()
    for dep, _ in group:
        target = dep.target.module
        if dep.target.type == tp.ops.OPTYPE.PARAMETER:
            reaches.add(f"{params.get(id(target), 'bare parameter')} layers")
        elif _is_op(target) or target is layer:
            continue
        elif id(target) in attention:
            reaches.add("the attention projections")
        elif not (type(target) in RESIZABLE or is_hf_conv1d(target)):
            reaches.add(f"{type(target).__name__} layers")
    return reaches


def _out_channels(layer: nn.Module) -> int:
    return layer.nf if is_hf_conv1d(layer) else layer.weight.shape[0]


def _prune_attention(model, units, config, element_score, ctx, owner) -> dict[str, list[int]]:
    """Remove whole heads from every attention unit; returns {module: [heads, kv_heads]} kept."""
    kept_counts, grouped = {}, {}
    for name, unit in units.items():
        kept_per_group = kept_channels(unit.group_size, config.channel_sparsity)
        if unit.grouped:
            grouped.setdefault((unit.kv_heads, unit.group_size, kept_per_group), []).append(name)
        if kept_per_group == unit.group_size:
            continue
        kept = choose_heads(head_scores(model, unit, element_score), unit, kept_per_group)
        prune_heads(model, unit, kept)
        kept_counts[name] = [len(kept), unit.kv_heads if unit.grouped else len(kept)]
    for (kv_heads, size, kept), names in grouped.items():
        ctx.note(f"{owner}: grouped-query attention {', '.join(map(repr, names))}: the {kv_heads} key/value heads are "
                 f"kept (each is shared by {size} query heads); each group keeps {kept} of its {size} query heads")
    return kept_counts


def restore_heads(model: nn.Module, kept_counts: dict[str, list[int]]) -> nn.Module:
    """Give a fresh model the head counts ``prune_channels`` left (the values load afterwards)."""
    units, _ = attention_units(model, weight_sites(model))
    for name, (heads, kv_heads) in kept_counts.items():
        unit = units[name]
        per_group = heads // unit.groups
        kept = [g * unit.group_size + i for g in range(unit.groups) for i in range(per_group)]
        prune_heads(model, unit, kept)
    return model


def _note_left_alone(model: nn.Module, sites: dict, ctx: TechniqueContext, owner: str) -> None:
    """Say which weights structured pruning never resizes, and why."""
    embeddings = [s.name for s in sites.values() if s.kind == SiteKind.EMBEDDING]
    if embeddings:
        ctx.note(f"{owner}: embedding tables {', '.join(map(repr, embeddings))} keep their width (the hidden width; "
                 "position embeddings are never resized)")
    for name, shape in uncovered_parameters(model, sites).items():
        ctx.note(f"{owner}: {name!r} {list(shape)} is a bare parameter (e.g. learned positions); left whole and kept "
                 "out of Torch-Pruning's graph")
    rnns = sorted({s.module for s in sites.values() if s.kind == SiteKind.RNN})
    for name in rnns:
        ctx.note(f"{owner}: RNN hidden units of {name!r} not pruned structurally: Torch-Pruning 1.6.1 has no GRU/RNN "
                 "pruner and its LSTM pruner handles one layer and slices weight_hh along the wrong dimension; the "
                 "gates couple row blocks of weight_ih/weight_hh with the columns of weight_hh")


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
        return restore_pruned(model, structure)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(StructuredPruning)
