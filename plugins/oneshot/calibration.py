"""Layer-sequential calibration: input statistics of every weight site, gathered block by block.

GPTQ, SparseGPT and Wanda need, for each weight matrix ``W`` (``out x in``), statistics of the
inputs ``X`` that multiply it: the Hessian of the layer-wise squared error ``H = 2 X^T X / n``
(GPTQ, SparseGPT) or its diagonal, the squared input-feature norms (Wanda).  As in the GPTQ and
SparseGPT reference implementations (Frantar et al. 2022; Frantar & Alistarh 2023), the model is
processed *sequentially*: the calibration batches' inputs to the first repeated block are caught
once, then each block in turn gathers its sites' statistics with forward hooks, has its sites
compressed, and is run again so that the next block sees the outputs the *compressed* block
produces.  Peak memory is the model plus one block's calibration activations (its inputs and
outputs) plus the Hessians of one block's sites.

Blocks are the children of the ``nn.ModuleList`` holding the most weight sites
(``nn.TransformerEncoder.layers``, Hugging Face ``model.layers`` / ``transformer.h`` /
``encoder.layer``, a hand-written list of decoder layers).  Sites outside every block (embeddings,
an LM head, every layer of a model without repeated blocks such as LeNet) are *units of their
own*: each gets a whole-model pass with a hook on it, in the order the forward pass uses them, so
it too sees the earlier layers compressed; the pass stops once the site's input is caught (an LM
head's logits are never computed).

Where each site's input is caught (``core.sites`` kinds): a Linear, Conv (unfolded into its
``in x kh x kw`` patches) and Hugging Face Conv1D by a pre-hook on the layer;
``nn.MultiheadAttention``'s packed ``in_proj_weight`` by a pre-hook on the attention module (its
query; self-attention only: with distinct key/value inputs the k/v rows see other inputs); its
``out_proj`` (a Linear its parent reads, never calls) by recomputing the attention context with an
identity output projection.  Embedding tables (a lookup: no input activations) and RNN weights (the
hidden-state input is internal to the fused kernel) have no statistics: the technique falls back
and says so in a note.  PyTorch's fused TransformerEncoderLayer fast path skips submodule hooks,
so it is switched off while statistics are gathered.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from slimforge.core.errors import ConfigError
from slimforge.core.sites import SiteKind, WeightSite
from slimforge.plugins.common import site_order


@dataclass
class InputStatistics:
    """Running statistics of the inputs ``X`` (rows = samples x positions, columns = the site's
    ``in_features``) that multiply one site: ``hessian = 2 X^T X / rows`` (None when only the
    diagonal is gathered) and ``square_norm = sum over rows of x_j^2`` (Wanda's ||X_j||^2)."""

    in_features: int
    full: bool
    hessian: torch.Tensor | None = None
    square_norm: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).to(torch.float32)
        if self.square_norm is None:
            self.square_norm = torch.zeros(self.in_features, device=x.device)
            if self.full:
                self.hessian = torch.zeros(self.in_features, self.in_features, device=x.device)
        new = x.shape[0]
        self.square_norm += x.square().sum(dim=0)
        if self.full:
            # Running mean, as the reference implementations keep it: H = 2/n sum x x^T.
            self.hessian *= self.rows / (self.rows + new)
            scaled = x * (2.0 / (self.rows + new)) ** 0.5
            self.hessian += scaled.t() @ scaled
        self.rows += new


# The compressor a technique gives: called once per site, in forward order, with the site's input
# statistics (None where its inputs cannot be caught; ``why`` then says why, for the note).
Compressor = Callable[[WeightSite, "InputStatistics | None", str], None]


def calibration_inputs(task, samples: int, batch_size: int, seed: int, device) -> list[torch.Tensor]:
    """``samples`` model inputs drawn (seeded) from the task's calibration split, in batches."""
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"calibration_samples and calibration_batch_size: must be >= 1, got {samples}, {batch_size}")
    data = task.calibration
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples]
    loader = DataLoader(Subset(data, order.tolist()), batch_size=batch_size, shuffle=False)
    return [batch[0].to(device) for batch in loader]


def repeated_blocks(model: nn.Module, sites: dict[str, WeightSite]) -> tuple[str, list[nn.Module]] | None:
    """``(name, children)`` of the ``nn.ModuleList`` holding the most weight sites, or None."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        count = sum(site.module.startswith(f"{name}.") for site in sites.values())
        if count > best_count:
            best, best_count = (name, list(module)), count
    return best


def block_of(site: WeightSite, blocks: tuple[str, list[nn.Module]] | None) -> int | None:
    """Index of the block holding ``site`` (all its places inside one block), or None."""
    if blocks is None:
        return None
    prefix = f"{blocks[0]}."
    places = [site.name, *site.tied]
    if not all(place.startswith(prefix) for place in places):
        return None
    indices = {place[len(prefix):].split(".", 1)[0] for place in places}
    return int(indices.pop()) if len(indices) == 1 else None


@contextlib.contextmanager
def _hooks_visible():
    """Submodule hooks fire: the fused transformer fast path (which skips them) off, no autograd."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _malloc_trim():
    """glibc's ``malloc_trim(0)`` where the C library is glibc, else nothing."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# Hands the heap's free pages back to the system.  glibc raises its mmap threshold as large blocks
# are freed, after which the matrix-sized temporaries of each site stay resident once freed and
# fragment the heap: on the 12-layer memory benchmark its default allocator held ~900 MB after gptq
# for a 409 MB model.  Called after every site is compressed and after every block's output pass.
release_freed_memory = _malloc_trim()


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """A Hugging Face model's ``config.use_cache`` off while calibration runs it: a forward pass
    would otherwise build every layer's keys and values for the batch, which nothing reads."""
    config = getattr(model, "config", None)
    used = getattr(config, "use_cache", None)
    if used:
        config.use_cache = False
    try:
        yield
    finally:
        if used:
            config.use_cache = used


# --- where a site's inputs are caught --------------------------------------------------------------

def _unfold(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as rows of its ``in x kernel`` patches (the logical matrix's columns)."""
    if isinstance(conv, nn.Conv1d):
        x, kernel = x.unsqueeze(2), (1, *conv.kernel_size)
        stride, padding, dilation = (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
    else:
        kernel, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return patches.transpose(1, 2)


def _mha_arguments(args, kwargs):
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items()})
    return bound


def attention_context(mha: nn.MultiheadAttention, args, kwargs) -> torch.Tensor:
    """The input ``out_proj`` multiplies in this call of ``mha``: the attention output with an
    identity output projection (nn.MultiheadAttention reads ``out_proj.weight``, never calls it)."""
    call = _mha_arguments(args, kwargs)
    query, key, value = call["query"], call["key"], call["value"]
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    identity = torch.eye(mha.embed_dim, device=query.device, dtype=query.dtype)
    separate = not mha._qkv_same_embed_dim
    context, _ = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k,
        mha.bias_v, mha.add_zero_attn, 0.0, identity, None, training=False,
        key_padding_mask=call.get("key_padding_mask"), need_weights=False, attn_mask=call.get("attn_mask"),
        use_separate_proj_weight=separate, q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None, v_proj_weight=mha.v_proj_weight if separate else None,
        is_causal=bool(call.get("is_causal", False)))
    return context.transpose(0, 1) if mha.batch_first else context


def capture_point(model: nn.Module, site: WeightSite):
    """``(module, reader, why)``: the module whose call shows ``site``'s input and ``reader(module,
    args, kwargs) -> X`` (rows x in_features), or ``(None, None, why)`` where none does."""
    if site.kind in (SiteKind.EMBEDDING, SiteKind.RNN):
        what = "an embedding lookup has no input activations" if site.kind == SiteKind.EMBEDDING else \
            "an RNN's inputs at each step stay inside its fused kernel"
        return None, None, what
    owner = site.owner(model)
    if site.kind == SiteKind.ATTENTION_IN_PROJ:
        part = {"in_proj_weight": "query", "q_proj_weight": "query", "k_proj_weight": "key",
                "v_proj_weight": "value"}[site.param]

        def attention_input(_module, args, kwargs):
            call = _mha_arguments(args, kwargs)
            if site.param == "in_proj_weight" and not (call["query"] is call["key"] is call["value"]):
                return None  # cross-attention: the k/v rows multiply other inputs than q
            return call[part]
        return owner, attention_input, ""
    parent_name = site.module.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if site.module else None
    if isinstance(parent, nn.MultiheadAttention) and site.module.endswith("out_proj"):
        return parent, attention_context, ""
    if site.kind == SiteKind.CONV:
        if getattr(owner, "groups", 1) != 1 or isinstance(owner, nn.Conv3d):
            return None, None, "a grouped or 3-D convolution's patches are not gathered"
        return owner, lambda module, args, kwargs: _unfold(module, args[0]), ""
    return owner, lambda _module, args, kwargs: args[0], ""


# --- the sequential driver ------------------------------------------------------------------------

# A block's key/value cache argument, by the names transformers has used (5.x: ``cache``).
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _is_cache(value) -> bool:
    """A Hugging Face ``Cache`` object, whatever the argument holding it is called (checked by class
    name, so transformers need not be importable)."""
    return any(cls.__name__ == "Cache" and cls.__module__.startswith("transformers")
               for cls in type(value).__mro__)


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's call with no key/value cache (GPT-2 passes it by position): a cache kept between the block's runs
    (its statistics pass, then its output pass) would make the second attend to the first's keys
    -- those of the block before it was compressed -- and would grow by the block's keys and
    values for every calibration batch each run (on a 12-layer decoder, hundreds of MB)."""
    return (tuple(None if _is_cache(a) else a for a in args),
            {k: (None if k in _CACHE_ARGUMENTS or _is_cache(v) else False if k == "use_cache" else v)
             for k, v in kwargs.items()})


class _StopForward(Exception):
    """Raised by the hook that caught a block's inputs: the rest of the model need not run."""


def _gather(model: nn.Module, sites: list[WeightSite], full: bool, module: nn.Module, calls: list,
            stop_after: bool = False):
    """Statistics of ``sites`` over the calls ``module(*args, **kwargs)`` for ``(args, kwargs)`` in
    ``calls``; ``{name: stats | None}`` and ``{name: why}`` for the sites with none.  With
    ``stop_after`` (one site) each call ends once the site's input is caught: what comes after it
    (an LM head's logits over the vocabulary, the largest activation of a language model) is never
    computed."""
    stats, why, handles = {}, {}, []
    for site in sites:
        point, reader, reason = capture_point(model, site)
        if point is None:
            why[site.name] = reason
            continue
        stats[site.name] = InputStatistics(site.in_features, full)

        def hook(mod, args, kwargs, _reader=reader, _stats=stats[site.name]):
            x = _reader(mod, args, kwargs)
            if x is not None:
                _stats.add(x)
                if stop_after:
                    raise _StopForward
        handles.append(point.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with _hooks_visible(), _no_kv_cache(model):
            for args, kwargs in calls:
                with contextlib.suppress(_StopForward):
                    module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, value in list(stats.items()):
        if value.rows == 0:
            stats[name] = None
            why[name] = "its module is never called with its input in a forward pass (e.g. cross-attention)"
    return stats, why


def gather_statistics(model: nn.Module, sites: list[WeightSite], inputs: list[torch.Tensor],
                      full_hessian: bool = True) -> tuple[dict, dict]:
    """Statistics of ``sites``' inputs over one whole-model pass of the calibration ``inputs``, for a
    technique that does not change the model's function while it gathers (AWQ's scaling):
    ``({name: InputStatistics | None}, {name: why there are none})``."""
    return _gather(model, sites, full_hessian, model, [((x,), {}) for x in inputs])


def compress_sequentially(model: nn.Module, sites: dict[str, WeightSite], inputs: list[torch.Tensor],
                          compress: Compressor, *, full_hessian: bool = True) -> None:
    """Call ``compress(site, statistics, why)`` for every one of ``sites`` (by name), block by
    block in forward order, each with the statistics of the inputs the already-compressed model
    gives it (see the module docstring).  ``inputs`` are the calibration batches."""
    model.eval()
    blocks = repeated_blocks(model, sites)
    order = [name for name in site_order(model, (inputs[0][:1],), sites) if name in sites]
    units: list[tuple[str, object]] = []  # ("block", index) or ("site", name), in forward order
    for name in order:
        index = block_of(sites[name], blocks)
        unit = ("block", index) if index is not None else ("site", name)
        if unit not in units:
            units.append(unit)
    block_inputs: list | None = None  # (args, kwargs) per batch for the next block, when known
    previous_block = None
    for kind, key in units:
        if kind == "site":
            site = sites[key]
            point, _, reason = capture_point(model, site)
            stats, why = (_gather(model, [site], full_hessian, model, [((x,), {}) for x in inputs], stop_after=True)
                          if point is not None else ({}, {site.name: reason}))  # nothing to catch: no forward pass
            compress(site, stats.get(site.name), why.get(site.name, ""))
            block_inputs = None  # a compressed site outside the blocks changes what the next block sees
            release_freed_memory()
            continue
        block = blocks[1][key]
        if block_inputs is None or previous_block != key - 1:
            block_inputs = _catch_block_inputs(model, block, inputs)
        in_block = [sites[name] for name in order if block_of(sites[name], blocks) == key]
        stats, why = _gather(model, in_block, full_hessian, block, block_inputs)
        for site in in_block:
            compress(site, stats.get(site.name), why.get(site.name, ""))
            stats.pop(site.name, None)  # free each Hessian once used
            release_freed_memory()
        with _hooks_visible():
            block_inputs = [_with_hidden(args, kwargs, _first(block(*args, **kwargs))) for args, kwargs in block_inputs]
        previous_block = key
        release_freed_memory()


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's call with its hidden-state input (the first argument, or ``hidden_states=``)
    replaced by ``hidden``: the previous block's output becomes the next block's input."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(output):
    """A block's hidden states: Hugging Face layers return a tuple (hidden, attentions...)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _catch_block_inputs(model: nn.Module, block: nn.Module, inputs: list[torch.Tensor]) -> list:
    """The ``(args, kwargs)`` ``block`` is called with for each calibration batch (the model runs
    only up to it)."""
    caught = []

    def catch(_module, args, kwargs):
        caught.append(_without_cache(args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with _hooks_visible(), _no_kv_cache(model):
            for x in inputs:
                with contextlib.suppress(_StopForward):
                    model(x)
    finally:
        handle.remove()
    return caught
