"""Weight sites: the one answer to "which weight matrices may a technique act on?".

A technique sees **sites**, not layer classes.  A site is one weight tensor of a model, described by
where it lives (module + parameter name), its *logical* layout (``out x in``: Hugging Face
``Conv1D``'s transposed storage is undone, a convolution's kernel is flattened into the input
side), the structure of its rows and columns (the packed q/k/v blocks of
``nn.MultiheadAttention.in_proj_weight`` or GPT-2's ``c_attn``, attention heads, RNN gates) and
the other places that hold the very same tensor (tied input/output embeddings), so that it is
compressed and stored once.

Kinds found (``SiteKind``): ``nn.Linear``; ``nn.Conv1d/2d/3d``; Hugging Face
``transformers.pytorch_utils.Conv1D`` (GPT-2); ``nn.MultiheadAttention``'s packed
``in_proj_weight`` (or its separate ``q/k/v_proj_weight``; its ``out_proj`` is a Linear site);
``nn.Embedding``; ``nn.RNN/GRU/LSTM``'s ``weight_ih_l*`` / ``weight_hh_l*`` (/ ``weight_hr_l*``).
Any other parameter of two or more dimensions (a learned position tensor on a custom module, say)
is *uncovered*: ``uncovered_parameters`` names it so that a technique can say in the trial record
that it was left dense, never skip it silently.

Changing how a site is stored: ``derive_weight`` registers a torch parametrization that computes the
stored weight from the technique's own tensors (codes and scales, centroids, low-rank factors).
``module.weight`` stays readable, so parents that read it directly (``nn.MultiheadAttention``
reads ``out_proj.weight``; RNNs re-read their flat weights each forward) keep working, and the
original dense tensor leaves the state_dict (it becomes an empty placeholder), so the artifact
holds only what the technique stores.  Replacing a module instead is only safe where no parent
reads its attributes.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize


class SiteKind:
    LINEAR = "linear"
    CONV = "conv"
    HF_CONV1D = "hf_conv1d"  # transformers' Conv1D: y = x @ W + b with W stored (in, out)
    ATTENTION_IN_PROJ = "attention_in_proj"  # nn.MultiheadAttention's own projection weights
    EMBEDDING = "embedding"
    RNN = "rnn"

    ALL = (LINEAR, CONV, HF_CONV1D, ATTENTION_IN_PROJ, EMBEDDING, RNN)


@dataclass(frozen=True)
class WeightSite:
    """One weight tensor a technique may act on.

    ``row_blocks`` are the sizes of sub-matrices packed along the output rows, in order (``(E, E, E)``
    for a packed q/k/v projection, ``(H,) * 4`` for an LSTM's gates); empty when the rows are one
    block.  ``row_heads`` is how many attention heads each row block splits into (k/v blocks of a
    grouped-query layer have fewer heads than q); ``col_heads`` how many heads the input columns
    come from (an attention output projection).  Heads are the units structural techniques keep
    whole.  ``role`` says what the weight does where slimforge can tell (``qkv``, ``q``, ``k``,
    ``v``, ``attn_out``, ``embedding``, ``position_embedding``, ``lm_head``, ``rnn_ih``, ``rnn_hh``);
    empty otherwise.  ``tied`` lists the other ``module.param`` names holding the same tensor.
    """

    module: str
    param: str
    kind: str
    shape: tuple[int, ...]  # as stored
    transposed: bool = False  # stored (in, out); the logical matrix is its transpose
    row_blocks: tuple[int, ...] = ()
    row_heads: tuple[int, ...] = ()  # per row block; () = no head structure
    col_heads: int = 0  # 0 = no head structure on the input side
    role: str = ""
    tied: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``module.param``, the key techniques use for per-site settings, masks and notes."""
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def setting_key(self) -> str:
        """The key a per-site setting (bits, density, rank) is stored under in a technique's config:
        the module name for a module's ``weight`` (the key plans used before sites existed, so old
        plans and artifacts still resolve), ``module.param`` for the others (``in_proj_weight``,
        ``weight_hh_l0``).  ``plugins.common.setting_for`` also finds a setting made for an ancestor."""
        return self.module if self.param == "weight" and self.module else self.name

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the logical matrix (a convolution's ``in / groups * prod(kernel)``)."""
        if self.transposed:
            return self.shape[0]
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    # --- reading and writing the logical matrix -------------------------------------------------
    def owner(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.module) if self.module else model

    def tensor(self, model: nn.Module) -> torch.Tensor:
        """The stored tensor (derived, when a technique re-expressed it)."""
        return getattr(self.owner(model), self.param)

    def matrix(self, model: nn.Module) -> torch.Tensor:
        """The logical ``out x in`` matrix: a view of the stored tensor where one exists."""
        return to_matrix(self.tensor(model), self)

    def set_matrix(self, model: nn.Module, matrix: torch.Tensor) -> None:
        """Write a logical ``out x in`` matrix into the stored tensor in place (no grad)."""
        stored = self.tensor(model)
        with torch.no_grad():
            stored.copy_(from_matrix(matrix, self).to(stored.dtype))

    def is_derived(self, model: nn.Module) -> bool:
        """True once a technique re-expressed this site (``derive_weight``)."""
        return parametrize.is_parametrized(self.owner(model), self.param)


def to_matrix(stored: torch.Tensor, site: WeightSite) -> torch.Tensor:
    """A tensor in ``site``'s stored layout as its logical ``out x in`` matrix."""
    return stored.t() if site.transposed else stored.reshape(stored.shape[0], -1)


def from_matrix(matrix: torch.Tensor, site: WeightSite) -> torch.Tensor:
    """Inverse of ``to_matrix``: a logical ``out x in`` matrix in ``site``'s stored layout."""
    return matrix.t() if site.transposed else matrix.reshape(site.shape)


# --- discovery -------------------------------------------------------------------------------------

_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?$")
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# Attention modules of Hugging Face (and most hand-written) transformers, recognised by the names
# of their projections rather than their classes, so that a new model family with the usual names
# is understood without code here.
_SEPARATE_QKV = (("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "key", "value", None))
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2's projections: ``x @ W + b``, W
    stored (in, out)), recognised without importing transformers."""
    # The class before parametrization: a derived Conv1D's class is torch's generated subclass.
    cls = parametrize.type_before_parametrizations(module)
    return cls.__name__ == "Conv1D" and hasattr(module, "nf") and cls.__module__.startswith("transformers")


def _kind_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return SiteKind.LINEAR
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return SiteKind.CONV
    if isinstance(module, nn.Embedding):
        return SiteKind.EMBEDDING
    if is_hf_conv1d(module):
        return SiteKind.HF_CONV1D
    return None


def _attribute(module: nn.Module, names) -> int | None:
    config = getattr(module, "config", None)
    for holder in (module, config):
        for name in names:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _annotations(model: nn.Module) -> dict[str, dict]:
    """Role and head structure for weights whose parent attention module says what they are."""
    notes: dict[str, dict] = {}
    modules = dict(model.named_modules())
    for prefix, module in modules.items():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, nn.MultiheadAttention):
            heads, embed = module.num_heads, module.embed_dim
            if module.in_proj_weight is not None:
                notes[f"{dot}in_proj_weight"] = dict(role="qkv", row_blocks=(embed, embed, embed), row_heads=(heads,) * 3)
            else:
                for part in ("q", "k", "v"):
                    notes[f"{dot}{part}_proj_weight"] = dict(role=part, row_heads=(heads,))
            notes[f"{dot}out_proj.weight"] = dict(role="attn_out", col_heads=heads)
            continue
        heads = _attribute(module, _HEAD_ATTRS)
        if heads is None:
            continue
        kv_heads = _attribute(module, _KV_HEAD_ATTRS) or heads
        children = dict(module.named_children())
        for q, k, v, out in _SEPARATE_QKV:
            if all(name in children for name in (q, k, v)):
                for name, role, n in ((q, "q", heads), (k, "k", kv_heads), (v, "v", kv_heads)):
                    notes[f"{dot}{name}.weight"] = dict(role=role, row_heads=(n,))
                if out and out in children:
                    notes[f"{dot}{out}.weight"] = dict(role="attn_out", col_heads=heads)
                elif out is None and prefix:
                    # BERT-style: ``attention.self`` holds q/k/v, its sibling ``attention.output.dense``
                    # projects the heads back.
                    sibling = f"{prefix.rpartition('.')[0]}.output.dense".lstrip(".")
                    if isinstance(modules.get(sibling), nn.Linear):
                        notes[f"{sibling}.weight"] = dict(role="attn_out", col_heads=heads)
        if "c_attn" in children and is_hf_conv1d(children["c_attn"]):  # GPT-2: packed q/k/v, transposed
            embed = children["c_attn"].nf // 3
            notes[f"{dot}c_attn.weight"] = dict(role="qkv", row_blocks=(embed, embed, embed), row_heads=(heads,) * 3)
            if "c_proj" in children:
                notes[f"{dot}c_proj.weight"] = dict(role="attn_out", col_heads=heads)
    return notes


def weight_sites(model: nn.Module) -> dict[str, WeightSite]:
    """Every weight site of ``model`` by name (``module.param``), in module order.

    A tensor held in several places (tied embeddings) is one site, under the name where it is met
    first; the others are in its ``tied``.  Sites a technique already re-expressed are included
    (``is_derived``), so a technique can note that it leaves them alone."""
    notes = _annotations(model)
    sites: dict[str, WeightSite] = {}
    first_holder: dict[int, str] = {}  # id of the tensor -> site name
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param, kind, extra in _module_weights(module):
            name = f"{module_name}.{param}" if module_name else param
            tensor = getattr(module, param)
            key = _identity(module, param, tensor)
            if key in first_holder:
                owner = first_holder[key]
                if owner != name and name not in sites[owner].tied:
                    sites[owner] = replace(sites[owner], tied=(*sites[owner].tied, name))
                continue
            first_holder[key] = name
            fields = {**extra, **notes.get(name, {})}
            if kind == SiteKind.EMBEDDING and not fields.get("role"):
                fields["role"] = "position_embedding" if "position" in module_name.split(".")[-1] or module_name.endswith("wpe") else "embedding"
            sites[name] = WeightSite(module=module_name, param=param, kind=kind, shape=tuple(tensor.shape),
                                     transposed=kind == SiteKind.HF_CONV1D, **fields)
    for name, site in list(sites.items()):
        if site.kind == SiteKind.LINEAR and any(site.shape == sites[t].shape for t in site.tied if t in sites):
            sites[name] = replace(site, role=site.role or "lm_head")
    return sites


def _module_weights(module: nn.Module):
    """(param name, kind, extra fields) of the weights ``module`` itself holds."""
    kind = _kind_of(module)
    if kind is not None:
        if getattr(module, "weight", None) is not None:
            yield "weight", kind, {}
        return
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight",) if module.in_proj_weight is not None or parametrize.is_parametrized(module, "in_proj_weight") \
            else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        for name in names:
            yield name, SiteKind.ATTENTION_IN_PROJ, {}
        return
    if isinstance(module, nn.RNNBase):
        gates = _RNN_GATES.get(module.mode if module.mode in _RNN_GATES else type(module).__name__, 1)
        for name in module._flat_weights_names:
            match = _RNN_WEIGHT.match(name)
            if match:
                hidden = module.proj_size if match.group(1) == "hr" else module.hidden_size
                blocks = () if match.group(1) == "hr" or gates == 1 else (hidden,) * gates
                yield name, SiteKind.RNN, {"row_blocks": blocks, "role": f"rnn_{match.group(1)}"}


def _identity(module: nn.Module, param: str, tensor: torch.Tensor) -> int:
    """What two places holding the same weight share: the tensor, or for a derived weight the
    ``DerivedWeight`` computing it (each place has its own parametrization list around it)."""
    if parametrize.is_parametrized(module, param):
        return id(module.parametrizations[param][0])
    return id(tensor)


def uncovered_parameters(model: nn.Module, sites: dict[str, WeightSite] | None = None) -> dict[str, tuple[int, ...]]:
    """Parameters of two or more dimensions that no site covers (left dense by every built-in
    technique), by name with their shapes: for notes in the trial record."""
    sites = weight_sites(model) if sites is None else sites
    covered = set(sites) | {t for s in sites.values() for t in s.tied}
    uncovered = {}
    for name, p in model.named_parameters():
        if ".parametrizations." in f".{name}" or p.dim() < 2:  # a root module's own are "parametrizations.*"
            continue
        if name not in covered:
            uncovered[name] = tuple(p.shape)
    return uncovered


# --- re-expressing a site -------------------------------------------------------------------------

class DerivedWeight(nn.Module, abc.ABC):
    """Base of a parametrization that *computes* a site's stored tensor from the technique's own
    tensors, registered with ``derive_weight``.  Subclasses keep their tensors as buffers or
    parameters (those are what the artifact stores) and implement ``compute()`` returning the
    weight in the site's stored layout.  The dense original is dropped: ``right_inverse`` leaves an
    empty placeholder in the state_dict."""

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(0)

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - torch passes it
        return self.compute()

    @abc.abstractmethod
    def compute(self) -> torch.Tensor:
        """The weight in the site's stored layout, from the technique's own tensors."""


def derive_weight(model: nn.Module, site: WeightSite, derived: DerivedWeight) -> None:
    """Make ``site`` (and every place tied to it) computed by ``derived``; the dense tensor leaves
    the model.  One ``derived`` module serves all tied places, so its tensors are stored once."""
    for name in (site.name, *site.tied):
        module_name, _, param = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        parametrize.register_parametrization(owner, param, derived, unsafe=True)
        owner.parametrizations[param].original.requires_grad_(False)  # the empty placeholder


def derived_of(model: nn.Module, site: WeightSite) -> DerivedWeight | None:
    """The ``DerivedWeight`` computing ``site``, or None for a plain parameter."""
    owner = site.owner(model)
    if not parametrize.is_parametrized(owner, site.param):
        return None
    return next((p for p in owner.parametrizations[site.param] if isinstance(p, DerivedWeight)), None)
