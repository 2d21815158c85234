"""The storage hook's two places (``plugins.storage``, public through ``plugins.api``): where a
``StoredLayer`` may replace a module, and what a restore needs, each refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimforge.core.errors import ArtifactError, PluginError
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import tiny_task
from slimforge.plugins.api import BIAS_LAYERS, StoredLayer, restore_stored_weights, store_weight, weight_sites
from slimforge.plugins.quantization.weight_only import QuantizedWeight, WeightOnlyQuantized


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x)[0])


def _quantized(site, model, form):
    return form.from_matrix(site, site.matrix(model), 4, True, "minmax")


def test_a_stored_layer_refuses_a_module_its_parent_reads():
    model, ctx = Attention(), TechniqueContext(task=tiny_task())
    site = weight_sites(model)["attention.out_proj.weight"]  # nn.MultiheadAttention reads out_proj.weight
    with pytest.raises(PluginError) as info:
        store_weight(model, site, _quantized(site, model, WeightOnlyQuantized), ctx)
    assert "not a plain called layer a StoredLayer may replace" in str(info.value) and "\n" not in str(info.value)
    store_weight(model, site, _quantized(site, model, QuantizedWeight), ctx)  # the derived place is fine
    assert list(ctx.structure) == ["derived"]


def test_both_places_are_recorded_and_rebuilt_and_the_layer_place_takes_a_bias():
    model, ctx = Attention(), TechniqueContext(task=tiny_task())
    sites = weight_sites(model)
    store_weight(model, sites["head.weight"], _quantized(sites["head.weight"], model, WeightOnlyQuantized), ctx)
    out_proj = sites["attention.out_proj.weight"]
    store_weight(model, out_proj, _quantized(out_proj, model, QuantizedWeight), ctx)
    assert isinstance(model.head, StoredLayer) and isinstance(model.head, BIAS_LAYERS)
    assert set(ctx.structure["layers"]) == {"head"} and set(ctx.structure["derived"]) == {"attention.out_proj"}
    facts = {"symmetric": True, "dequantize_once": True}
    records = {place: {k: {**facts, **spec} for k, spec in specs.items()} for place, specs in ctx.structure.items()}
    rebuilt = restore_stored_weights(Attention(), records, "weight_only_quant", QuantizedWeight, WeightOnlyQuantized)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_a_restore_of_replaced_layers_needs_the_layer_class_and_a_plain_layer():
    spec = {"bits": 4, "storage": "packed", "symmetric": True, "dequantize_once": True}
    with pytest.raises(ArtifactError, match="records replaced layers \\(head\\) but restore_stored_weights got no "
                                            "layer_class"):
        restore_stored_weights(Attention(), {"layers": {"head": spec}}, "weight_only_quant", QuantizedWeight)
    with pytest.raises(ArtifactError, match="stored layer 'attention.out_proj' is not a plain Conv/Linear layer"):
        restore_stored_weights(Attention(), {"layers": {"attention.out_proj": spec}}, "weight_only_quant",
                               QuantizedWeight, WeightOnlyQuantized)


def test_a_weight_only_artifact_of_derived_sites_only_loads(tmp_path):
    # Sites stored through the public hook alone (no replaced layer, so no "layers" record) are not
    # mistaken for the first weight_only_quant artifacts, which recorded nothing.
    from slimforge.core.compressed import load_model, save_model
    from slimforge.core.manager import Plugins
    from slimforge.core.plan import Plan, PlanStep

    task = tiny_task()
    model, ctx = task.teacher_factory().eval(), TechniqueContext(task=task)
    model.load_state_dict(task.teacher.state_dict())
    for site in weight_sites(model).values():
        store_weight(model, site, _quantized(site, model, QuantizedWeight), ctx)
    assert list(ctx.structure) == ["derived"]
    plan = Plan(steps=(PlanStep("weight_only_quant", {"default_bits": 4}),), seed=0)
    save_model(model, tmp_path / "d.slim", task=task, plan=plan, structure=[ctx.structure])
    loaded = load_model(tmp_path / "d.slim", Plugins(load_entry_points=False).registry, task=task).model
    x = task.split("val")[:][0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
