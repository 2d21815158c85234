"""The public plugin API: everything a third-party technique package needs, in one place.

``from slimforge.plugins.api import ...`` is the only import a plugin should need.  The names in
``__all__`` keep their meaning and signatures within a major version of slimforge; every other
module (``plugins.common``, ``plugins.<family>.*``, ``core.*``) is internal and may change between
minor versions, even where a name there looks useful.

What is here, by the question a plugin author asks:

- *How do I declare a technique?*  ``Technique``, ``Family``, ``Stage`` (with ``stage_phase``: what
  each range of stages triggers), ``TechniqueContext`` (``ctx.task``, ``ctx.device``, ``ctx.note``,
  ``ctx.state``, ``ctx.structure``), ``hookimpl`` for ``slimforge_register_techniques``, the errors
  (``ConfigError`` in a config's ``__post_init__``).  The registry checks the rules when the class
  registers: see ``TechniqueRegistry.add``.
- *How is it searched?*  ``Suggester`` (``suggest_int`` / ``suggest_float`` / ``suggest_categorical``,
  names prefixed with the technique's name), ``FixedSuggester`` for tests,
  ``json_round_trip_problem`` (configs are stored as JSON).
- *Which weights may it act on?*  ``weight_sites`` (one ``WeightSite`` per weight tensor of any
  model: Linear, Conv, Hugging Face Conv1D, packed attention projections, Embedding, RNN gates,
  tied weights once), ``uncovered_parameters`` (what no site covers: note it, never skip silently),
  ``site_order`` (sites in the order the forward pass uses them), ``weight_layers`` /
  ``first_calls`` / ``replace_module`` for techniques that work on plain layers.
- *How does it store compact codes?*  The storage hook below: ``StoredWeight``, ``store_weight``,
  ``restore_stored_weights``, ``derived_of`` (the weight computing a site, if any), and the packing helpers ``pack_bits`` / ``unpack_bits`` /
  ``packed_size``.
- *Masks* (pruning, sparsity): ``MaskedTechnique``, ``apply_masks``, ``reapply_masks``,
  ``keep_top``, ``site_mask``.
- *Bias* (a technique that writes a layer's bias): ``BIAS_LAYERS``, ``set_bias``.
- *Does it work?*  The conformance kit: ``TechniqueConformance``, ``compress``, ``tiny_task``,
  ``TINY_ARCHITECTURES`` / ``SEQUENCE_ARCHITECTURES`` / ``ALL_ARCHITECTURES`` (needs pytest, and
  transformers for the Hugging Face architectures: ``pip install 'slimforge[plugin-dev]'``).

The storage hook
----------------
The artifact is the compressed model's ``state_dict`` written by slimforge's codec (no pickle;
zeros stored sparsely, every tensor entropy-coded), loaded back *strictly* into the task's
architecture after each plan step's ``restore_structure``.  A technique that stores a weight in its
own compact form (codes, scales, codebooks, factors) does not replace modules to make the shapes
fit; it *derives* the weight:

1. subclass ``StoredWeight``: register the tensors to store as buffers in ``__init__`` (uint8 codes
   packed with ``pack_bits``, float scales...), implement ``decode()`` (the weight in the site's
   stored layout, from those tensors), ``spec()`` (the JSON facts that fix the tensors' shapes,
   e.g. ``{"bits": 2}``) and the classmethod ``empty(site, spec, like)`` (the same object with
   zero tensors of those shapes);
2. in ``apply``: ``store_weight(model, site, weight, ctx)``.  The site's module keeps its class and
   its ``.weight`` (computed by ``weight``), its dense tensor leaves the state_dict, tied places
   share one ``weight`` (stored once), and ``ctx.structure["derived"]`` records the spec;
3. in ``restore_structure``: ``return restore_stored_weights(model, structure, self.name, MyWeight)``.

The artifact then holds exactly the buffers the technique registered, plus a header of a few
hundred bytes.  The built-in ``weight_only_quant`` (``QuantizedWeight``) and ``kmeans_clustering``
(its codebook weight) store every site they cannot replace as a plain layer through this same
mechanism (``derive_weight`` + ``ctx.structure["derived"]`` + ``restore_derived``); sparsity needs
no hook at all, since the codec stores a tensor's zeros sparsely by itself.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from slimforge.core.errors import ArtifactError, ConfigError, PluginError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import (DerivedWeight, SiteKind, WeightSite, derive_weight, derived_of, from_matrix,
                                  to_matrix, uncovered_parameters, weight_sites)
from slimforge.core.space import FixedSuggester, Suggester
from slimforge.core.technique import (Family, Stage, Technique, TechniqueContext, json_round_trip_problem,
                                      retrains_before_sharing, stage_phase)
from slimforge.core.testing import (ALL_ARCHITECTURES, SEQUENCE_ARCHITECTURES, TINY_ARCHITECTURES,
                                    TechniqueConformance, compress, tiny_task)
from slimforge.plugins.common import (MaskedTechnique, apply_masks, first_calls, keep_top, pack_bits, packed_size,
                                      reapply_masks, replace_module, restore_derived, site_mask, site_order,
                                      unpack_bits, weight_layers)
from slimforge.plugins.quantization.weight_only import WeightOnlyQuantized
from slimforge.plugins.sharing.kmeans import ClusteredLayer

__all__ = [
    # declaring a technique
    "Technique", "Family", "Stage", "stage_phase", "retrains_before_sharing", "TechniqueContext", "hookimpl",
    "ConfigError", "PluginError", "ArtifactError",
    # searching it
    "Suggester", "FixedSuggester", "json_round_trip_problem",
    # weight sites
    "WeightSite", "SiteKind", "weight_sites", "uncovered_parameters", "site_order", "to_matrix", "from_matrix",
    "weight_layers", "first_calls", "replace_module",
    # storage
    "StoredWeight", "store_weight", "restore_stored_weights", "derived_of", "pack_bits", "unpack_bits",
    "packed_size",
    # masks
    "MaskedTechnique", "apply_masks", "reapply_masks", "keep_top", "site_mask",
    # biases
    "BIAS_LAYERS", "set_bias",
    # conformance kit
    "TechniqueConformance", "compress", "tiny_task", "TINY_ARCHITECTURES", "SEQUENCE_ARCHITECTURES",
    "ALL_ARCHITECTURES",
]


# --- the storage hook ---------------------------------------------------------------------------

class StoredWeight(DerivedWeight, abc.ABC):
    """A weight computed from a technique's own stored tensors, rebuilt from a JSON spec at load.

    Subclasses register the tensors to store as buffers (or parameters, to train them), and
    implement ``decode``, ``spec`` and ``empty``.  ``decode`` runs once when the weight is built
    (call ``refresh()`` after filling the tensors) and once after the artifact loads; forward
    passes read the decoded weight from a non-persistent cache, so storing codes costs no latency.
    """

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
        device (``like`` is the site's empty placeholder); the artifact's tensors load into it."""

    def refresh(self) -> None:
        """Decode again; call after writing the stored tensors."""
        self.decoded = self.decode()

    def compute(self) -> torch.Tensor:
        return self.decoded if self.decoded is not None else self.decode()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()


def store_weight(model: nn.Module, site: WeightSite, weight: StoredWeight, ctx: TechniqueContext) -> None:
    """Make ``site`` computed by ``weight`` (its dense tensor leaves the artifact; tied places share
    ``weight``) and record ``weight.spec()`` for ``restore_stored_weights``."""
    if site.is_derived(model):
        raise PluginError(f"{site.name!r} is already computed by an earlier step's tensors; check "
                          "site.is_derived(model) and note the site instead")
    spec = weight.spec()
    derive_weight(model, site, weight)
    if weight.decoded is None:
        weight.refresh()
    ctx.structure.setdefault("derived", {})[site.setting_key] = spec


def restore_stored_weights(model: nn.Module, structure: dict[str, Any], technique: str,
                           weight_class: type[StoredWeight]) -> nn.Module:
    """In ``restore_structure``: re-register an empty ``weight_class`` on every site ``apply``
    stored (``structure["derived"]``), so the artifact's tensors load into them.  A recorded site
    the rebuilt model lacks is an ``ArtifactError`` naming the technique."""
    restore_derived(model, structure.get("derived", {}), technique, "stored weight",
                    lambda site, spec, tensor: weight_class.empty(site, spec, tensor))
    return model


# --- biases -------------------------------------------------------------------------------------

# Modules that compute ``op(x, W) + bias`` per output channel with a float ``bias`` a technique may
# write: torch's layers and the replacement modules of weight_only_quant and kmeans_clustering.
BIAS_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, WeightOnlyQuantized, ClusteredLayer)


def set_bias(module: nn.Module, bias: torch.Tensor) -> None:
    """Give a ``BIAS_LAYERS`` module ``bias`` in the form it keeps one: a buffer where the module
    stores its bias as one (a weight-only quantized layer: nothing in it trains), else a
    Parameter.  The artifact records the tensor either way; a technique that adds a bias where
    there was none records that in ``ctx.structure`` so ``restore_structure`` adds it again."""
    if "bias" in module._buffers:  # registered as a buffer, possibly None
        module._buffers["bias"] = bias
    else:
        module.bias = nn.Parameter(bias)
