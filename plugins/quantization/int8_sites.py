"""int8 on every weight site: the module conversions the two torch.ao int8 techniques share.

torch.ao has int8 modules for ``nn.Linear`` (dynamic and static), ``nn.Embedding`` (8-bit weight
only), ``nn.GRU`` / ``nn.LSTM`` (dynamic) and convolutions (static).  The weight sites of
transformers reach them only after a change of form, made here in float32 and numerically
equivalent to the original:

- ``nn.MultiheadAttention`` reads ``out_proj.weight`` (and its packed ``in_proj_weight``) as
  tensors, so an int8 module cannot take the place of its projections.  ``convert_attention``
  swaps it for ``ProjectedMultiheadAttention``: the same computation with explicit ``q_proj`` /
  ``k_proj`` / ``v_proj`` / ``out_proj`` Linears that an int8 Linear can replace.  Its parents keep
  calling it the same way (``nn.TransformerEncoderLayer`` / ``DecoderLayer`` call
  ``self_attn(q, k, v, attn_mask=..., key_padding_mask=..., need_weights=False, is_causal=...)``);
  their fused fast paths, which read the float weights of every child, are switched off through
  the attributes they check (``in_proj_bias is None``; ``use_nested_tensor = False``).
- Hugging Face ``Conv1D`` (GPT-2) stores its weight transposed: ``convert_hf_conv1d`` makes it the
  ``nn.Linear`` it is.
- A tied embedding table and lm head (GPT-2) are one tensor: the head becomes an int8 Linear and
  the embedding an ``Int8TiedEmbedding`` that looks its rows up in the head's int8 weight, so the
  table is stored once, as int8, and the head's matmul runs on the int8 kernel.
- A dynamic int8 GRU/LSTM keeps its weights in TorchScript cell objects that a state_dict cannot
  hold without pickle; ``make_rnns_portable`` swaps them for ``PortableCellParams``, which store
  the int8 weights and float biases as tensors and re-pack them on load.

``convert_*`` run again in ``restore_structure`` on the fresh architecture, from the names
recorded in ``ctx.structure``, so an artifact rebuilds the same modules before its tensors load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding

from slimforge.core.sites import SiteKind, weight_sites
from slimforge.plugins.common import replace_module

# --- nn.MultiheadAttention -> explicit projections --------------------------------------------------


class ProjectedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (same arguments, masks, outputs) computed with four
    separate projection modules, so that each can be an int8 Linear.  Equal to the original in
    float32 up to rounding (``from_mha`` copies the weights)."""

    # nn.TransformerEncoderLayer and nn.TransformerEncoder take their fused fast paths, which read
    # the float weights of every child, only when in_proj_bias is a tensor; None keeps them off.
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, add_bias_kv: bool = False, add_zero_attn: bool = False,
                 dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ProjectedMultiheadAttention:
        new = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, dropout=mha.dropout,
                  batch_first=mha.batch_first)
        new.train(mha.training)
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.split(e)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None, None, None)
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        return new.to(mha.out_proj.weight.device)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        n, length, _ = query.shape
        if is_causal and attn_mask is None:
            # nn.MultiheadAttention insists on the mask with is_causal; build it rather than fail
            attn_mask = torch.full((length, key.shape[1]), float("-inf"), dtype=query.dtype,
                                   device=query.device).triu(1)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        h, d = self.num_heads, self.head_dim
        q = q.view(n, length, h, d).transpose(1, 2)
        k = k.view(n, -1, h, d).transpose(1, 2)
        v = v.view(n, -1, h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        s = k.shape[2]
        mask = None
        if attn_mask is not None:
            mask = attn_mask.view(1, 1, length, s) if attn_mask.dim() == 2 else attn_mask.view(n, h, length, s)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, s)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the explicit softmax, as nn.MultiheadAttention computes it when asked for weights
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p=dropout) @ v if dropout else weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def convert_attention(model: nn.Module, names=None) -> list[str]:
    """Swap ``nn.MultiheadAttention`` modules (all of them, or ``names``) for
    ``ProjectedMultiheadAttention``; return the names swapped."""
    if names is None:
        names = [name for name, m in model.named_modules() if type(m) is nn.MultiheadAttention]
    for name in names:
        replace_module(model, name, ProjectedMultiheadAttention.from_mha(model.get_submodule(name)))
    if names:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                # its nested-tensor fast path reads every layer's float weights
                m.use_nested_tensor = False
    return list(names)


# --- Hugging Face Conv1D -> nn.Linear --------------------------------------------------------------


def linear_from_hf_conv1d(conv: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (``y = x @ W + b``, W stored in x out) as the ``nn.Linear`` it is."""
    weight = conv.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear.train(conv.training)


def convert_hf_conv1d(model: nn.Module, names=None) -> list[str]:
    if names is None:
        names = [s.module for s in weight_sites(model).values() if s.kind == SiteKind.HF_CONV1D]
    for name in names:
        replace_module(model, name, linear_from_hf_conv1d(model.get_submodule(name)))
    return list(names)


# --- tied embedding + lm head: one int8 table ----------------------------------------------------


class Int8TiedEmbedding(nn.Module):
    """An embedding whose table is the int8 weight of the quantized Linear it was tied to (an lm
    head): rows are looked up and dequantized with their own scales.  It holds no tensor of its
    own (the head's packed params are the only copy in the state_dict)."""

    def __init__(self, head: nn.Module, head_name: str, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.head_name = head_name
        self._head = (head,)  # a tuple: not a child module, so the head is not a second time in the state_dict

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self._head[0].weight()  # quantized Linears unpack their int8 weight on request
        rows = weight.int_repr()[ids].to(torch.float32)
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale = weight.q_per_channel_scales().to(torch.float32)[ids].unsqueeze(-1)
            zero = weight.q_per_channel_zero_points().to(torch.float32)[ids].unsqueeze(-1)
        else:
            scale, zero = float(weight.q_scale()), float(weight.q_zero_point())
        return (rows - zero) * scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows of {self.head_name}"


def tied_heads(model: nn.Module) -> dict[str, str]:
    """Embedding module -> the Linear module (lm head) that holds the same table, for the ties
    that ``Int8TiedEmbedding`` can serve: one Embedding tied to one or more same-shape Linears
    with plain (unparametrized) weights.  Only the first head serves the lookup; the others (rare)
    are still separate Linears."""
    ties = {}
    modules = dict(model.named_modules())
    for site in weight_sites(model).values():
        if site.kind != SiteKind.EMBEDDING or not site.tied or site.is_derived(model):
            continue
        heads = [t.rpartition(".")[0] for t in site.tied]
        if all(type(modules.get(h)) is nn.Linear and t.endswith(".weight") for h, t in zip(heads, site.tied, strict=True)) \
                and modules[site.module].max_norm is None:
            ties[site.module] = heads[0]
    return ties


def bind_tied_embeddings(model: nn.Module, ties: dict[str, str]) -> None:
    """Replace each tied Embedding by an ``Int8TiedEmbedding`` reading its (now quantized) head."""
    for embedding_name, head_name in ties.items():
        old = model.get_submodule(embedding_name)
        head = model.get_submodule(head_name)
        replace_module(model, embedding_name, Int8TiedEmbedding(head, head_name, old.num_embeddings,
                                                                 old.embedding_dim, old.padding_idx))


def tied_note(prefix: str, model: nn.Module, embedding_name: str, head_name: str, tied_to: str = "") -> str:
    """What storing a tied table once as int8 costs against the alternatives, in artifact bytes:
    the head's int8 weight with its scales as the codec writes it, one more 8-bit table (torch.ao's
    Embedding: a float32 scale and zero point per row), or the float32 table kept tied."""
    from slimforge.core.artifact import encode_tensors

    embedding = model.get_submodule(embedding_name)
    rows, cols = embedding.num_embeddings, embedding.embedding_dim
    once = len(encode_tensors({"weight": model.get_submodule(head_name).weight()}, {}))
    return (f"{prefix}: {embedding_name}.weight is tied to {tied_to or head_name}.weight: the table is stored once, as the "
            f"int8 weight of {head_name} (~{once} B; a second 8-bit copy for the lookup would add "
            f"{rows * cols + 8 * rows} B, the float32 table kept tied is {4 * rows * cols} B); {head_name} runs on "
            f"the int8 kernel and {embedding_name} looks up and dequantizes its rows")


# --- nn.Embedding -> 8-bit weight-only ------------------------------------------------------------


def quantizable_embeddings(model: nn.Module, tied: dict[str, str]) -> tuple[list[str], list[str]]:
    """(untied ``nn.Embedding`` modules torch.ao's 8-bit Embedding can replace, notes for the
    others).  ``max_norm`` renormalises rows in place on lookup, which an int8 table cannot."""
    names, notes = [], []
    for site in weight_sites(model).values():
        if site.kind != SiteKind.EMBEDDING or site.module in tied:
            continue
        module = site.owner(model)
        if site.is_derived(model):
            notes.append(f"{site.name} stays as an earlier step re-expressed it (not a plain table to quantize)")
        elif type(module) is not nn.Embedding:
            notes.append(f"{site.name} stays float32: {type(module).__name__} is not a plain nn.Embedding")
        elif module.max_norm is not None:
            notes.append(f"{site.name} stays float32: max_norm renormalises rows on lookup")
        elif site.tied:
            notes.append(f"{site.name} stays float32: tied to {', '.join(site.tied)}, which no int8 module can share")
        else:
            names.append(site.module)
    return names, notes


class Int8Embedding(QuantizedEmbedding):
    """torch.ao's quantized Embedding, fed contiguous indices: its kernel refuses strided ones,
    and Hugging Face passes sliced / expanded position and token-type ids."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return super().forward(indices.contiguous())


def quantize_embeddings(model: nn.Module, names) -> None:
    """torch.ao's quantized Embedding: quint8 rows with a float scale and zero point per row."""
    from torch.ao.quantization import float_qparams_weight_only_qconfig

    for name in names:
        float_module = model.get_submodule(name)
        float_module.qconfig = float_qparams_weight_only_qconfig
        quantized = Int8Embedding.from_float(float_module)
        quantized.__class__ = Int8Embedding  # from_float builds the torch.ao class itself; same state
        replace_module(model, name, quantized)


# --- dynamic int8 GRU / LSTM that a state_dict can hold --------------------------------------------


def quantizable_rnns(model: nn.Module) -> tuple[list[str], list[str]]:
    """(GRU/LSTM modules torch.ao's dynamic int8 RNNs can replace, notes for the other RNNs)."""
    names, notes = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.RNNBase):
            continue
        if type(m) not in (nn.GRU, nn.LSTM):
            notes.append(f"{name} ({type(m).__name__}) stays float32: torch.ao has int8 kernels for GRU and LSTM only")
        elif not m.bias:
            notes.append(f"{name} stays float32: torch.ao's int8 {type(m).__name__} needs biases (bias=False)")
        elif getattr(m, "proj_size", 0):
            notes.append(f"{name} stays float32: torch.ao's int8 LSTM has no projection (proj_size)")
        else:
            names.append(name)
    return names, notes


class PortableCellParams(nn.Module):
    """One layer/direction of a dynamic int8 GRU/LSTM.  torch.ao keeps it as a TorchScript
    ``CellParamsBase`` object in the state_dict; this stores what that object packs instead --
    the int8 weights (qtensors) and float biases -- and packs them again on load, so the artifact
    codec holds them as tensors and no pickle is needed."""

    _PARTS = ("weight_ih", "bias_ih", "weight_hh", "bias_hh")

    def __init__(self, param):
        super().__init__()
        self.param = param  # read by the GRU/LSTM forward

    def _parts(self) -> tuple[dict[str, torch.Tensor], bool]:
        _, _, _, longs, packed = self.param.__getstate__()[0]
        (w_ih, b_ih), (w_hh, b_hh) = (p.__getstate__()[0] for p in packed)
        return {"weight_ih": w_ih, "bias_ih": b_ih, "weight_hh": w_hh, "bias_hh": b_hh}, bool(longs[0])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        parts, reduce_range = self._parts()
        for key, tensor in parts.items():
            destination[prefix + key] = tensor
        destination[prefix + "reduce_range"] = reduce_range

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + k for k in (*self._PARTS, "reduce_range")]
        absent = [k for k in keys if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        w_ih, b_ih, w_hh, b_hh, reduce_range = (state_dict[k] for k in keys)
        packed_ih = torch.ops.quantized.linear_prepack(w_ih, b_ih)
        packed_hh = torch.ops.quantized.linear_prepack(w_hh, b_hh)
        self.param = torch.ops.quantized.make_quantized_cell_params_dynamic(packed_ih, packed_hh, b_ih, b_hh,
                                                                            bool(reduce_range))


def make_rnns_portable(model: nn.Module) -> None:
    from torch.ao.nn.quantized.dynamic import GRU, LSTM

    for m in model.modules():
        if type(m) in (GRU, LSTM):
            m._all_weight_values = nn.ModuleList(PortableCellParams(p.param) for p in m._all_weight_values)


def quantize_rnns(model: nn.Module, names, qconfig) -> None:
    """Dynamic int8 GRU/LSTM (torch.ao): int8 weights, activations quantized per step."""
    from torch.ao.nn.quantized.dynamic import GRU, LSTM

    for name in names:
        float_module = model.get_submodule(name)
        float_module.qconfig = qconfig
        cls = GRU if type(float_module) is nn.GRU else LSTM
        replace_module(model, name, cls.from_float(float_module))
    make_rnns_portable(model)


# --- what stays float -------------------------------------------------------------------------------


def float_site_notes(prefix: str, model: nn.Module, skip_kinds=()) -> list[str]:
    """One note per weight still held in float32 after quantization: the weight sites no int8
    module took (by kind) and the >= 2-D parameters no site covers (a learned position tensor)."""
    from slimforge.core.sites import uncovered_parameters

    sites = weight_sites(model)
    notes = []
    by_kind: dict[str, list[str]] = {}
    for site in sites.values():
        if site.kind not in skip_kinds:
            by_kind.setdefault(site.kind, []).append(site.name)
    for kind, names in by_kind.items():
        notes.append(f"{prefix}: {len(names)} {kind} weight(s) stay float32 (no int8 module took them): {', '.join(names)}")
    for name, shape in uncovered_parameters(model, sites).items():
        notes.append(f"{prefix}: {name} ({'x'.join(map(str, shape))}) stays float32: a plain parameter, "
                     f"not a layer an int8 module can replace")
    return notes
