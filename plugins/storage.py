"""The storage hook: how a technique stores a weight in its own compact form (codes, scales,
codebooks, factors) in the artifact and gets it back at load.  Public through
``slimforge.plugins.api``, which documents it; the built-in code-storing techniques
(``weight_only_quant``, ``kmeans_clustering``) use it as a third-party plugin does.

A site's ``StoredWeight`` takes one of two places, both recorded in ``ctx.structure`` by
``store_weight`` and rebuilt by ``restore_stored_weights``:

- *derived* (the default, any site): a torch parametrization on the site's module, which keeps its
  class and a readable ``.weight``; the artifact holds the weight's tensors under
  ``<module>.parametrizations.<param>.0.*`` and an empty placeholder (``ctx.structure["derived"]``);
- *layer* (a ``StoredLayer``, only where ``plugins.common.replaceable_layer`` allows: a plain
  Linear / Conv1d / Conv2d that its parent only calls): the stored weight *is* the module, computing
  ``op(x, weight, bias)`` itself (``ctx.structure["layers"]``).  What that buys is measured on
  LeNet-5 at 4 bits (``benchmarks/storage_bytes.py --places``, in benchmarks/README.md): no
  parametrization dispatch on every forward (batch-1 latency 483 us against 552 us with all five
  layers derived, 1 thread; the float model takes 473 us) and ~18 header bytes per layer (202,345
  against 202,437 bytes), since the state_dict keys are the short ``<module>.<tensor>`` and there
  is no placeholder entry.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.core.errors import ArtifactError, PluginError
from slimforge.core.sites import DerivedWeight, SiteKind, WeightSite, derive_weight, weight_sites
from slimforge.core.technique import TechniqueContext
from slimforge.plugins.common import WEIGHT_LAYERS, replace_module, replaceable_layer


class StoredWeight(DerivedWeight, abc.ABC):
    """A weight computed from a technique's own stored tensors, rebuilt from a JSON spec at load.

    Subclasses register the tensors to store as buffers (or parameters, to train them), and
    implement ``decode``, ``spec`` and ``empty``.  ``decode`` runs once when the weight is built
    (call ``refresh()`` after filling the tensors) and once after the artifact loads; forward
    passes read the decoded weight from a non-persistent cache, so storing codes costs no latency.
    A weight whose tensors train (a k-means codebook) overrides ``compute`` to decode while
    gradients are on."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("decoded", None, persistent=False)

    @abc.abstractmethod
    def decode(self) -> torch.Tensor:
        """The weight in the site's *stored* layout (``site.shape``), from the stored tensors."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable facts that fix the stored tensors' shapes and meaning (bits, block
        size...).  Recorded in the artifact header; ``empty`` gets it back."""

    @classmethod
    @abc.abstractmethod
    def empty(cls, site: WeightSite, spec: dict[str, Any], like: torch.Tensor) -> StoredWeight:
        """An instance for ``site`` with zero tensors of the shapes ``spec`` fixes, on ``like``'s
        device (``like`` is the site's current tensor); the artifact's tensors load into it."""

    def refresh(self) -> None:
        """Decode again; call after writing the stored tensors."""
        self.decoded = self.decode()

    def compute(self) -> torch.Tensor:
        return self.decoded if self.decoded is not None else self.decode()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()


_FUNCTIONAL = {"Linear": F.linear, "Conv1d": F.conv1d, "Conv2d": F.conv2d}


class StoredLayer(StoredWeight):
    """A ``StoredWeight`` that also replaces the plain Linear / Conv1d / Conv2d whose weight it
    stores: its forward is the layer's op on ``compute()`` (see the module docstring for what this
    buys over the derived place).  A subclass mixes this in first (``class MyLayer(StoredLayer,
    MyWeight)``); ``host`` copies the layer's bias and convolution settings into it.  The bias is a
    Parameter when ``trainable_bias`` (recovery training moves it), else a buffer."""

    trainable_bias = False

    def host(self, layer: nn.Module) -> StoredLayer:
        kind = type(layer)
        if kind not in WEIGHT_LAYERS:
            raise PluginError(f"a stored layer replaces a plain {', '.join(k.__name__ for k in WEIGHT_LAYERS)}, "
                              f"not a {kind.__name__}")
        self.kind = kind.__name__
        bias = None if layer.bias is None else layer.bias.detach().clone()
        if self.trainable_bias:
            self.register_parameter("bias", None if bias is None else nn.Parameter(bias))
        else:
            self.register_buffer("bias", None if bias is None else bias.to(torch.float32))
        if kind is not nn.Linear:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.groups, self.padding_mode = layer.groups, layer.padding_mode
            self._reversed_padding_repeated_twice = list(layer._reversed_padding_repeated_twice)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = _FUNCTIONAL[self.kind]
        if self.kind == "Linear":
            return op(x, self.compute(), self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return op(x, self.compute(), self.bias, self.stride, padding, self.dilation, self.groups)


def layer_site(layer: nn.Module) -> WeightSite:
    """The site of a lone plain layer's ``weight`` (to build a ``StoredLayer`` outside a model)."""
    kind = SiteKind.LINEAR if isinstance(layer, nn.Linear) else SiteKind.CONV
    return WeightSite(module="", param="weight", kind=kind, shape=tuple(layer.weight.shape))


def store_weight(model: nn.Module, site: WeightSite, weight: StoredWeight, ctx: TechniqueContext) -> None:
    """Make ``site`` computed by ``weight`` and record ``weight.spec()`` for
    ``restore_stored_weights``.  A ``StoredLayer`` replaces the site's module (allowed only where
    ``replaceable_layer(model, site)``); any other weight is derived: its dense tensor leaves the
    artifact and tied places share ``weight``."""
    if site.is_derived(model):
        raise PluginError(f"{site.name!r} is already computed by an earlier step's tensors; check "
                          "site.is_derived(model) and note the site instead")
    spec = weight.spec()
    if isinstance(weight, StoredLayer):
        if not replaceable_layer(model, site, padding_modes=None):
            raise PluginError(f"{site.name!r} is not a plain called layer a StoredLayer may replace; check "
                              "replaceable_layer(model, site) and store a plain StoredWeight there")
        replace_module(model, site.module, weight.host(site.owner(model)))
        place = "layers"
    else:
        derive_weight(model, site, weight)
        place = "derived"
    if weight.decoded is None:
        weight.refresh()
    ctx.structure.setdefault(place, {})[site.setting_key] = spec


def restore_stored_weights(model: nn.Module, structure: dict[str, Any], technique: str,
                           weight_class: type[StoredWeight],
                           layer_class: type[StoredLayer] | None = None) -> nn.Module:
    """In ``restore_structure``: put an empty ``weight_class`` on every site ``apply`` derived
    (``structure["derived"]``) and an empty ``layer_class`` in place of every layer it replaced
    (``structure["layers"]``), so the artifact's tensors load into them.  A recorded site the
    rebuilt model lacks is an ``ArtifactError`` naming the technique."""
    layers = structure.get("layers") or {}
    if layers and layer_class is None:
        raise ArtifactError(f"{technique}: the artifact records replaced layers ({', '.join(layers)}) but "
                            "restore_stored_weights got no layer_class")
    derived = structure.get("derived") or {}
    if not (layers or derived):
        return model
    sites = {site.setting_key: site for site in weight_sites(model).values()}
    for records, what in ((derived, "stored weight"), (layers, "stored layer")):
        for name, spec in records.items():
            site = sites.get(name)
            if site is None or (records is layers and type(site.owner(model)) not in WEIGHT_LAYERS):
                raise ArtifactError(f"{technique}: {what} {name!r} is not a "
                                    f"{'plain Conv/Linear layer' if records is layers else 'weight site'} "
                                    "of the rebuilt model")
            if records is layers:
                layer = layer_class.empty(site, spec, site.tensor(model)).host(site.owner(model))
                replace_module(model, site.module, layer)
            else:
                derive_weight(model, site, weight_class.empty(site, spec, site.tensor(model)))
    return model
