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
  ``restore_stored_weights``, ``StoredLayer`` / ``replaceable_layer`` (the optional layer place),
  ``derived_of`` (the weight computing a site, if any), and the packing helpers ``pack_bits`` /
  ``unpack_bits`` / ``packed_size``.
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
fit; it stores a ``StoredWeight``:

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
hundred bytes.  Optionally, where ``replaceable_layer(model, site)`` (a plain Linear / Conv1d /
Conv2d its parent only calls), a ``StoredLayer`` subclass of the same weight (``class MyLayer(
StoredLayer, MyWeight)``) replaces the module instead and runs the layer's op itself:
``store_weight`` records it under ``ctx.structure["layers"]``, and ``restore_stored_weights(...,
MyWeight, MyLayer)`` rebuilds both.  It saves the parametrization's Python dispatch on every
forward (LeNet-5 at 4 bits, batch 1: 483 against 552 us) and ~18 header bytes per layer
(``plugins.storage``).

Which built-ins use it: ``weight_only_quant`` (``QuantizedWeight`` / its layer form
``WeightOnlyQuantized``) and ``kmeans_clustering`` (``ClusteredWeight`` / ``ClusteredLayer``) store
every site through it.  The others do not need it: ``int8_dynamic``, ``int8_sites`` and
``int8_ptq`` swap in torch.ao's quantized modules, whose int8 GEMM/conv kernels are what make them
fast; their qint8 tensors go to the codec as quantized tensors, and a ``StoredWeight`` would have to
decode to a float weight and lose those kernels.  ``low_rank``'s module form is two smaller plain
layers (a smaller, faster model that needs no decoding); its derived form (``LowRankWeight``, for
sites a parent reads) is a parametrization of trainable factors by the same mechanism, recorded
under ``derived``.  ``cosine_merge`` and structured pruning leave smaller plain layers (sizes in
``ctx.structure``).  Unstructured pruning and the sparsifiers zero weights in place: the codec
stores a tensor's zeros sparsely by itself (bitmask or relative indices), so masks need no hook.
"""

from __future__ import annotations


import torch
from torch import nn

from slimforge.core.errors import ArtifactError, ConfigError, PluginError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.sites import SiteKind, WeightSite, derived_of, from_matrix, to_matrix, uncovered_parameters, weight_sites
from slimforge.core.space import FixedSuggester, Suggester
from slimforge.core.technique import (Family, Stage, Technique, TechniqueContext, json_round_trip_problem,
                                      retrains_before_sharing, stage_phase)
from slimforge.core.testing import (ALL_ARCHITECTURES, SEQUENCE_ARCHITECTURES, TINY_ARCHITECTURES,
                                    TechniqueConformance, compress, tiny_task)
from slimforge.plugins.common import (MaskedTechnique, apply_masks, first_calls, keep_top, pack_bits, packed_size,
                                      reapply_masks, replace_module, replaceable_layer, site_mask, site_order,
                                      unpack_bits, weight_layers)
from slimforge.plugins.storage import StoredLayer, StoredWeight, restore_stored_weights, store_weight

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
    "packed_size", "StoredLayer", "replaceable_layer",
    # masks
    "MaskedTechnique", "apply_masks", "reapply_masks", "keep_top", "site_mask",
    # biases
    "BIAS_LAYERS", "set_bias",
    # conformance kit
    "TechniqueConformance", "compress", "tiny_task", "TINY_ARCHITECTURES", "SEQUENCE_ARCHITECTURES",
    "ALL_ARCHITECTURES",
]


# --- biases -------------------------------------------------------------------------------------

# Modules that compute ``op(x, W) + bias`` per output channel with a float ``bias`` a technique may
# write: torch's layers and every ``StoredLayer`` (weight_only_quant's and kmeans_clustering's
# layer forms among them).
BIAS_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, StoredLayer)


def set_bias(module: nn.Module, bias: torch.Tensor) -> None:
    """Give a ``BIAS_LAYERS`` module ``bias`` in the form it keeps one: a buffer where the module
    stores its bias as one (a weight-only quantized layer: nothing in it trains), else a
    Parameter.  The artifact records the tensor either way; a technique that adds a bias where
    there was none records that in ``ctx.structure`` so ``restore_structure`` adds it again."""
    if "bias" in module._buffers:  # registered as a buffer, possibly None
        module._buffers["bias"] = bias
    else:
        module.bias = nn.Parameter(bias)
