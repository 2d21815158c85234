"""Attention heads as units of structured pruning: find them, score them, remove them whole.

A head is ``head_dim`` rows of the query projection (and of the key / value projections when every
query head has its own), the same ``head_dim`` input columns of the output projection, and the
bookkeeping of the module computing the attention.  The head structure comes from ``core.sites``
(``row_heads`` / ``col_heads``, packed q/k/v ``row_blocks``), never from layer classes, so the
layouts slimforge knows are all handled by one code path:

- ``nn.MultiheadAttention``: packed ``in_proj_weight`` (3 row blocks) + ``out_proj``;
- separate q / k / v projections + an output projection (Hugging Face BERT, Llama, most models);
- Hugging Face GPT-2: packed, transposed ``Conv1D`` ``c_attn`` + ``c_proj``.

Grouped-query attention (fewer key/value heads, each shared by a group of query heads) is pruned
the way Torch-Pruning prunes it: key/value heads are kept and every group loses the same number of
query heads, so groups stay equal and ``num_key_value_groups`` stays an integer.

Why not Torch-Pruning's own head pruning (``num_heads=`` / ``prune_num_heads=True``): its
``nn.MultiheadAttention`` pruner removes embedding channels (the hidden width), not heads, and
its head logic needs q / k / v as separate ``nn.Linear`` layers coupled through the traced
attention product, which leaves GPT-2's packed ``Conv1D`` and ``nn.MultiheadAttention`` out.
Scoring, selection and slicing follow its rule (a head's score is the sum of its elements'
scores over the coupled group; the lowest go).

After pruning the module's own bookkeeping is updated so its forward works unchanged:
``num_heads`` / ``num_attention_heads`` / ``all_head_size`` / ``split_size`` (GPT-2) /
``num_key_value_groups``; Llama's attention keeps its counts on the shared config, so the pruned
module gets its own ``num_heads`` / ``num_key_value_heads`` (``core.sites`` reads the module
first).  ``nn.MultiheadAttention`` cannot compute with an inner width other than its embedding
width, so a pruned one becomes ``HeadPrunedMultiheadAttention`` (same parameters, same call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.core.sites import SiteKind, WeightSite, to_matrix

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


@dataclass(frozen=True)
class AttentionUnit:
    """One attention computation whose heads are pruned together."""

    module: str  # the module holding the head counts (MultiheadAttention, BertSelfAttention, ...)
    heads: int
    kv_heads: int
    head_dim: int
    qkv: tuple[WeightSite, ...]  # (packed,) or (q, k, v)
    out: WeightSite

    @property
    def packed(self) -> bool:
        return len(self.qkv) == 1

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def groups(self) -> int:
        """Sets of query heads pruned alike: one per key/value head under GQA, else one."""
        return self.kv_heads if self.grouped else 1

    @property
    def group_size(self) -> int:
        return self.heads // self.groups


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def attention_units(model: nn.Module, sites: dict[str, WeightSite]) -> tuple[dict[str, AttentionUnit], list[str]]:
    """Attention units by module name, and one note per attention whose heads cannot be pruned."""
    units: dict[str, AttentionUnit] = {}
    problems: list[str] = []
    outs = {s.module: s for s in sites.values() if s.role == "attn_out"}
    by_role: dict[str, dict[str, WeightSite]] = {}
    for s in sites.values():
        if s.role in ("qkv", "q", "k", "v"):
            holder = s.module if s.kind == SiteKind.ATTENTION_IN_PROJ else _parent(s.module)
            by_role.setdefault(holder, {})[s.role] = s
    for holder, parts in by_role.items():
        qkv = (parts["qkv"],) if "qkv" in parts else tuple(parts.get(r) for r in ("q", "k", "v"))
        if any(p is None for p in qkv):
            problems.append(f"attention {holder!r}: only {sorted(parts)} found, its heads are left whole")
            continue
        out = _find_out(holder, outs)
        module = model.get_submodule(holder)
        if out is None:
            problems.append(f"attention {holder!r}: no output projection found, its heads are left whole")
            continue
        if isinstance(module, nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
            problems.append(f"attention {holder!r}: bias_k/bias_v/add_zero_attn are not supported, heads left whole")
            continue
        if not isinstance(module, nn.MultiheadAttention) and not any(hasattr(module, a) for a in HEAD_COUNT_ATTRS) \
                and not hasattr(getattr(module, "config", None), "num_attention_heads"):
            problems.append(f"attention {holder!r}: its head count is not an attribute slimforge can update, heads left whole")
            continue
        if qkv[0].kind == SiteKind.ATTENTION_IN_PROJ and qkv[0].param != "in_proj_weight":
            problems.append(f"attention {holder!r}: separate q/k/v_proj_weight (kdim/vdim != embed_dim) not supported, "
                            "heads left whole")
            continue
        heads = qkv[0].row_heads[0]
        kv_heads = qkv[0].row_heads[1] if len(qkv) == 1 else qkv[1].row_heads[0]
        q_rows = qkv[0].row_blocks[0] if len(qkv) == 1 else qkv[0].out_features
        if heads % kv_heads or q_rows % heads:
            problems.append(f"attention {holder!r}: {heads} query heads do not split into {kv_heads} key/value groups")
            continue
        units[holder] = AttentionUnit(holder, heads, kv_heads, q_rows // heads, qkv, out)
    return units, problems


def _find_out(holder: str, outs: dict[str, WeightSite]) -> WeightSite | None:
    """The output projection: a child of the attention module (out_proj, o_proj, c_proj), or for
    Hugging Face BERT-style layers one in a sibling (``attention.self`` -> ``attention.output.dense``)."""
    for module, site in outs.items():
        if _parent(module) == holder or (module == f"{holder}.out_proj"):
            return site
    parent = _parent(holder)
    for module, site in outs.items():
        if module.startswith(parent + ".") and _parent(_parent(module)) == parent:
            return site
    return None


# --- scoring --------------------------------------------------------------------------------------

def head_scores(model: nn.Module, unit: AttentionUnit, element_score) -> torch.Tensor:
    """Score of each query head: the sum of its elements' scores over the group pruned with it (its
    query rows, its output-projection columns, and its key/value rows when it owns them).
    ``element_score(stored_weight)`` returns a tensor of the stored weight's shape."""
    d, h = unit.head_dim, unit.heads
    total = torch.zeros(h, dtype=torch.float64)

    def rows(site: WeightSite, start: int, n_heads: int) -> torch.Tensor:
        matrix = to_matrix(element_score(site.tensor(model)), site).double()
        return matrix[start:start + n_heads * d].reshape(n_heads, -1).sum(dim=1)

    inner, kv_inner = h * d, unit.kv_heads * d
    if unit.packed:
        q, k, v = (unit.qkv[0], 0), (unit.qkv[0], inner), (unit.qkv[0], inner + kv_inner)
    else:
        q, k, v = ((s, 0) for s in unit.qkv)
    total += rows(*q, h)
    out = to_matrix(element_score(unit.out.tensor(model)), unit.out).double()
    total += out.t().reshape(h, -1).sum(dim=1)
    if not unit.grouped:
        total += rows(*k, h) + rows(*v, h)
    return total


def choose_heads(scores: torch.Tensor, unit: AttentionUnit, kept_per_group: int) -> list[int]:
    """The query heads kept: the ``kept_per_group`` best of each key/value group (all heads are one
    group without GQA), in their original order; ties keep the earlier head."""
    per_group = unit.group_size
    kept = []
    for g in range(unit.groups):
        group = scores[g * per_group:(g + 1) * per_group]
        order = torch.argsort(-group, stable=True)[:kept_per_group]
        kept.extend(sorted(int(i) + g * per_group for i in order))
    return kept


# --- surgery ---------------------------------------------------------------------------------------

def _rows(head_ids, head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * head_dim + j for h in head_ids for j in range(head_dim)], dtype=torch.long)


def _keep(param: nn.Parameter | None, index: torch.Tensor, dim: int):
    if param is None:
        return None
    return nn.Parameter(param.detach().index_select(dim, index.to(param.device)).contiguous(),
                        requires_grad=param.requires_grad)


def _keep_out_rows(model: nn.Module, site: WeightSite, index: torch.Tensor) -> None:
    """Keep the logical rows ``index`` of a projection (its outputs) and of its bias."""
    module = site.owner(model)
    if site.kind == SiteKind.ATTENTION_IN_PROJ:
        module.in_proj_weight = _keep(module.in_proj_weight, index, 0)
        module.in_proj_bias = _keep(module.in_proj_bias, index, 0)
        return
    module.weight = _keep(module.weight, index, 1 if site.transposed else 0)
    module.bias = _keep(module.bias, index, 0)
    if site.transposed:
        module.nf = len(index)
    elif isinstance(module, nn.Linear):
        module.out_features = len(index)


def _keep_in_cols(model: nn.Module, site: WeightSite, index: torch.Tensor) -> None:
    module = site.owner(model)
    module.weight = _keep(module.weight, index, 0 if site.transposed else 1)
    if isinstance(module, nn.Linear):
        module.in_features = len(index)


def prune_heads(model: nn.Module, unit: AttentionUnit, kept_heads: list[int]) -> None:
    """Keep only the query heads ``kept_heads`` (sorted) of ``unit``, with their key/value heads
    (all of them under grouped-query attention, where each is shared), and update the module's
    bookkeeping.  ``restore`` calls it with the first heads: the values come from the artifact."""
    d, per_group = unit.head_dim, unit.group_size
    kept_kv = sorted({h // per_group for h in kept_heads}) if unit.grouped else list(kept_heads)
    if unit.grouped and len(kept_kv) != unit.kv_heads:
        raise ValueError(f"{unit.module}: grouped-query pruning keeps every key/value head")
    q_rows, kv_rows = _rows(kept_heads, d), _rows(kept_kv, d)
    if unit.packed:
        inner, kv_inner = unit.heads * d, unit.kv_heads * d
        _keep_out_rows(model, unit.qkv[0], torch.cat([q_rows, kv_rows + inner, kv_rows + inner + kv_inner]))
    else:
        q, k, v = unit.qkv
        _keep_out_rows(model, q, q_rows)
        if not unit.grouped:
            _keep_out_rows(model, k, kv_rows)
            _keep_out_rows(model, v, kv_rows)
    _keep_in_cols(model, unit.out, q_rows)
    set_head_counts(model.get_submodule(unit.module), len(kept_heads), len(kept_kv), d)


def set_head_counts(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Tell an attention module how many heads it now computes."""
    if isinstance(module, nn.MultiheadAttention):
        module.__class__ = HeadPrunedMultiheadAttention
        module.num_heads, module.head_dim, module.embed_dim = heads, head_dim, heads * head_dim
        # Inner width != input width: also what keeps TransformerEncoderLayer off its fused fast
        # path, which assumes they are equal.
        module._qkv_same_embed_dim = False
        return
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in KV_HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, kv_heads)
    if not any(isinstance(getattr(module, a, None), int) for a in HEAD_COUNT_ATTRS):
        # Llama-style: the counts live on the config all layers share; this layer gets its own.
        module.num_heads = heads
        module.num_key_value_heads = kv_heads
    if isinstance(getattr(module, "all_head_size", None), int):  # BERT
        module.all_head_size = heads * head_dim
    if isinstance(getattr(module, "split_size", None), int):  # GPT-2 splits c_attn's output by it
        module.split_size = heads * head_dim
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = heads // kv_heads


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after head pruning: ``num_heads * head_dim`` (``embed_dim`` here)
    is narrower than the query's width, which torch's own forward cannot compute.  Same parameters
    (``in_proj_weight`` rows q|k|v, ``out_proj``), same call signature and mask conventions
    (boolean masks: True = not attended); self- and cross-attention with equal key/value widths."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        heads, d = self.num_heads, self.head_dim
        inner = heads * d
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = b.split(inner) if b is not None else (None, None, None)
        q, k, v = (F.linear(x, wi, bi).view(n, x.shape[1], heads, d).transpose(1, 2)
                   for x, wi, bi in zip((query, key, value), w.split(inner), (bq, bk, bv), strict=True))
        mask = _additive_mask(attn_mask, key_padding_mask, n, heads, length, key.shape[1], q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * d ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(length, key.shape[1], dtype=torch.bool,
                                                       device=q.device).triu(1), float("-inf"))
            probs = scores.softmax(dim=-1)
            attended = F.dropout(probs, dropout, self.training) @ v
            weights = probs.mean(dim=1) if average_attn_weights else probs
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                      is_causal=is_causal and mask is None)
        out = self.out_proj(attended.transpose(1, 2).reshape(n, length, inner))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(attn_mask, key_padding_mask, n, heads, length, source, dtype):
    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total = None
    if attn_mask is not None:
        total = additive(attn_mask)
        total = total.view(n, heads, length, source) if total.dim() == 3 else total.view(1, 1, length, source)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(n, 1, 1, source)
        total = pad if total is None else total + pad
    return total
