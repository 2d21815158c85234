"""weight_only_quant and kmeans_clustering on every weight site kind (core.sites): attention's packed
in_proj_weight and out_proj, Hugging Face Conv1D (transposed), Embedding rows, tied input/output
embeddings stored once, RNN weights; plain called Conv/Linear keep their replacement modules."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimforge.core.artifact import describe_artifact
from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.outputs import logits_of
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.recovery import AppliedStep, TeacherOutputs, recover
from slimforge.core.sites import derived_of, weight_sites
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import tiny_task
from slimforge.plugins.common import replaceable_layer, site_order
from slimforge.plugins.quantization.weight_only import (QuantizedWeight, WeightOnlyQuant, WeightOnlyQuantConfig,
                                                        WeightOnlyQuantized, quantize_rows)
from slimforge.plugins.sharing.kmeans import ClusteredLayer, ClusteredWeight, KMeansClustering, KMeansConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ARCH = "slimforge.core.testing:"


def _apply(technique, config, architecture):
    task = tiny_task(ARCH + architecture)
    ctx = TechniqueContext(task=task)
    return task, technique.apply(copy.deepcopy(task.teacher), config, ctx), ctx


def _round_trip(task, model, ctx, technique, config, path):
    plan = Plan(steps=(PlanStep(technique.name, technique.config_to_dict(config)),), seed=0)
    save_model(model, path, task=task, plan=plan, structure=[ctx.structure])
    loaded = load_model(path, Plugins(load_entry_points=False).registry).model
    x = task.split("val")[:][0][:8]
    with torch.inference_mode():
        assert torch.equal(logits_of(model(x)), logits_of(loaded(x)))
    return loaded


def _uniform_row_weight(out: int, cols: int, seed: int) -> torch.Tensor:
    """Each row's values on an exact 4-bit symmetric grid with step 1/8 (max |w| = 7/8 per row)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(-7, 8, (out, cols), generator=g).float()
    levels[:, 0] = 7  # pin the row maximum so the scale is known
    return levels / 8


# --- which form a site takes ----------------------------------------------------------------------

def test_plain_called_layers_are_replaced_and_everything_else_derived():
    model = tiny_task(ARCH + "tiny_transformer").teacher
    sites = weight_sites(model)
    replaceable = {name for name, site in sites.items() if replaceable_layer(model, site)}
    # The head is called by a user module; linear1/2 and out_proj sit in torch layers that read them.
    assert replaceable == {"head.weight"}
    gpt2 = tiny_task(ARCH + "tiny_gpt2").teacher
    gpt2_sites = weight_sites(gpt2)
    assert not any(replaceable_layer(gpt2, s) for s in gpt2_sites.values())  # Conv1D, Embedding, tied


def test_site_order_follows_the_forward_and_places_out_proj_with_its_attention():
    model = tiny_task(ARCH + "tiny_transformer").teacher
    order = site_order(model, (torch.zeros(1, 16, dtype=torch.long),))
    assert order[0] == "embed.weight" and order[-1] == "head.weight"
    layer0 = [n for n in order if n.startswith("encoder.layers.0.")]
    assert layer0.index("encoder.layers.0.self_attn.in_proj_weight") < layer0.index("encoder.layers.0.linear1.weight")
    assert all(n.startswith("encoder.layers.1.") for n in order[len(layer0) + 1:-1])


# --- weight_only_quant ------------------------------------------------------------------------------

def test_transposed_conv1d_scales_follow_logical_output_channels():
    from transformers.pytorch_utils import Conv1D

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(6, 4)  # stored (in=4, out=6)

        def forward(self, x):
            return self.proj(x)

    model = Holder()
    logical = _uniform_row_weight(6, 4, seed=1) * torch.arange(1, 7).float()[:, None]  # row r scaled by r + 1
    with torch.no_grad():
        model.proj.weight.copy_(logical.t())
    site = weight_sites(model)["proj.weight"]
    weight = QuantizedWeight.from_matrix(site, site.matrix(model), 4, True, "minmax")
    # One scale per output channel (logical row), not per stored row: 6 of them, each (r + 1) / 8.
    assert torch.equal(weight.scale, torch.arange(1, 7).float() / 8)
    assert torch.equal(weight.dequantize(), logical.t())  # on the grid: exact, in the stored layout


@pytest.mark.parametrize("dequantize_once", [True, False])
def test_attention_packed_in_proj_and_out_proj_are_quantized(tmp_path, dequantize_once):
    config = WeightOnlyQuantConfig(default_bits=4, keep_ends_8bit=False, dequantize_once=dequantize_once)
    task, model, ctx = _apply(WeightOnlyQuant(), config, "tiny_transformer")
    attention = model.encoder.layers[0].self_attn
    for owner, param in ((attention, "in_proj_weight"), (attention.out_proj, "weight")):
        derived = owner.parametrizations[param][0]
        assert isinstance(derived, QuantizedWeight) and derived.bits == 4
        assert (derived.weight_cache is not None) == dequantize_once
        assert torch.equal(getattr(owner, param), derived.dequantize())
    # Packed q/k/v: one scale per row of the (3E, E) matrix, so q, k and v rows never share one.
    assert attention.parametrizations.in_proj_weight[0].scale.shape == (96,)
    assert list(ctx.structure["layers"]) == ["head"] and ctx.structure["layers"]["head"]["bits"] == 4  # the only replaced layer
    assert "encoder.layers.0.self_attn.in_proj_weight" in ctx.structure["derived"]
    assert isinstance(model.head, WeightOnlyQuantized)
    loaded = _round_trip(task, model, ctx, WeightOnlyQuant(), config, tmp_path / "t.slim")
    cache = loaded.encoder.layers[0].self_attn.parametrizations.in_proj_weight[0].weight_cache
    assert (cache is not None) == dequantize_once  # rebuilt at load, never stored
    keys = describe_artifact(tmp_path / "t.slim")["tensors"]
    assert not any("weight_cache" in row["name"] for row in keys)


def test_embedding_rows_each_get_a_scale():
    config = WeightOnlyQuantConfig(default_bits=4, keep_ends_8bit=False)
    _, model, _ = _apply(WeightOnlyQuant(), config, "tiny_gru")
    derived = model.embed.parametrizations.weight[0]
    assert derived.scale.shape == (model.embed.num_embeddings,)  # per token, the Embedding's out rows
    table = tiny_task(ARCH + "tiny_gru").teacher.embed.weight
    _, scale, _ = quantize_rows(table, 4, True)
    assert torch.equal(derived.scale, scale)


def test_tied_embeddings_are_quantized_once_and_stored_once(tmp_path):
    config = WeightOnlyQuantConfig(default_bits=4)
    task, model, ctx = _apply(WeightOnlyQuant(), config, "tiny_gpt2")
    wte, head = model.transformer.wte, model.lm_head
    assert wte.parametrizations.weight[0] is head.parametrizations.weight[0]
    assert torch.equal(wte.weight, head.weight)
    assert "transformer.wte" in ctx.structure["derived"] and "lm_head" not in ctx.structure["derived"]
    loaded = _round_trip(task, model, ctx, WeightOnlyQuant(), config, tmp_path / "g.slim")
    assert loaded.transformer.wte.parametrizations.weight[0] is loaded.lm_head.parametrizations.weight[0]
    rows = {r["name"]: r for r in describe_artifact(tmp_path / "g.slim")["tensors"]}
    codes = "transformer.wte.parametrizations.weight.0.relative_codes"
    assert rows[codes]["stored_bytes"] > 0
    assert rows["lm_head.parametrizations.weight.0.relative_codes"]["encoding"] == f"alias of {codes}"


def test_rnn_weights_are_quantized_and_the_rnn_still_runs():
    config = WeightOnlyQuantConfig(default_bits=8, keep_ends_8bit=False)
    task, model, _ = _apply(WeightOnlyQuant(), config, "tiny_gru")
    for name in ("weight_ih_l0", "weight_hh_l0"):
        assert parametrize.is_parametrized(model.rnn, name)
    x = task.split("val")[:][0][:8]
    with torch.no_grad():
        # 8 bits per gate row: close to the float model, and it did run through the derived weights.
        assert torch.allclose(model(x), task.teacher(x), atol=0.05)


# --- kmeans_clustering ------------------------------------------------------------------------------

def test_derived_centroids_are_fine_tuned_and_codes_never_change():
    task = tiny_task(ARCH + "tiny_gpt2")
    ctx = TechniqueContext(task=task)
    config = KMeansConfig(fc_bits=4)
    model = KMeansClustering().apply(copy.deepcopy(task.teacher), config, ctx)
    tied = model.transformer.wte.parametrizations.weight[0]
    assert isinstance(tied, ClusteredWeight) and tied is model.lm_head.parametrizations.weight[0]
    c_attn = model.transformer.h[0].attn.c_attn.parametrizations.weight[0]
    books = {id(c_attn): c_attn.codebook.detach().clone(), id(tied): tied.codebook.detach().clone()}
    codes = {id(c_attn): c_attn.codes.clone(), id(tied): tied.codes.clone()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert id(c_attn.codebook) in trainable and id(tied.codebook) in trainable
    subset = torch.utils.data.Subset(task.split("train"), range(64))
    recover(model, [AppliedStep(KMeansClustering(), config, ctx)], subset, Recovery(epochs=1, lr=1e-2),
            seed=0, batch_size=32, teacher_outputs=TeacherOutputs(task.teacher, subset))
    for derived in (c_attn, tied):
        assert not torch.equal(derived.codebook.detach(), books[id(derived)])  # gradients reached the centroids
        assert torch.equal(derived.codes, codes[id(derived)])
    model.eval()
    with torch.no_grad():  # inference caches the decoded weight until the codebook moves
        first = model.transformer.h[0].attn.c_attn.weight
        assert model.transformer.h[0].attn.c_attn.weight is first
        c_attn.codebook.data.add_(1.0)
        assert model.transformer.h[0].attn.c_attn.weight is not first


def test_clustered_conv1d_codes_cover_the_logical_matrix(tmp_path):
    config = KMeansConfig(fc_bits=3)
    task, model, ctx = _apply(KMeansClustering(), config, "tiny_gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    derived = derived_of(model, weight_sites(model)["transformer.h.0.mlp.c_fc.weight"])
    assert derived.codes_shape == (c_fc.nf, c_fc.weight.shape[0])  # out x in, the transpose undone
    assert c_fc.weight.shape == tiny_task(ARCH + "tiny_gpt2").teacher.transformer.h[0].mlp.c_fc.weight.shape
    assert len(torch.unique(c_fc.weight)) <= 8
    _round_trip(task, model, ctx, KMeansClustering(), config, tmp_path / "k.slim")


def test_attention_and_rnn_sites_are_clustered():
    for architecture, owner_param in (("tiny_transformer", ("encoder.layers.0.self_attn", "in_proj_weight")),
                                      ("tiny_transformer", ("encoder.layers.0.self_attn.out_proj", "weight")),
                                      ("tiny_gru", ("rnn", "weight_hh_l0"))):
        config = KMeansConfig(fc_bits=4)
        _, model, _ = _apply(KMeansClustering(), config, architecture)
        owner = model.get_submodule(owner_param[0])
        assert isinstance(owner.parametrizations[owner_param[1]][0], ClusteredWeight)
        assert len(torch.unique(getattr(owner, owner_param[1]))) <= 16
    assert isinstance(model.head, ClusteredLayer)  # the GRU's head: a plain called Linear


def test_old_structures_still_restore_the_replacement_modules():
    # A structure as kmeans_clustering recorded it before weight sites: "layers" only.
    task = tiny_task(ARCH + "tiny_mlp")
    model = KMeansClustering().restore_structure(copy.deepcopy(task.teacher), KMeansConfig(), task.example_inputs(),
                                                 {"layers": {"1": {"bits": 5, "zero_code": False}}})
    assert isinstance(model.get_submodule("1"), ClusteredLayer) and model.get_submodule("1").storage == "packed"


def test_a_site_an_earlier_step_derived_is_noted_and_left_alone():
    config = WeightOnlyQuantConfig(default_bits=4)
    task, model, _ = _apply(WeightOnlyQuant(), config, "tiny_gpt2")
    ctx = TechniqueContext(task=task)
    again = KMeansClustering().apply(model, KMeansConfig(), ctx)
    assert isinstance(again.transformer.wte.parametrizations.weight[0], QuantizedWeight)
    assert any("'transformer.wte.weight' is already computed by an earlier step" in n for n in ctx.notes)


@pytest.mark.parametrize("technique, config", [(WeightOnlyQuant(), WeightOnlyQuantConfig(default_bits=4)),
                                               (KMeansClustering(), KMeansConfig())])
def test_a_reader_that_ignores_derived_sites_refuses_the_file(tmp_path, technique, config):
    # An older slimforge knows only the replacement modules and ignores ``derived``: the strict load
    # then fails on the parametrized keys instead of running with random dense weights.
    from slimforge.core.errors import ArtifactError

    task, model, ctx = _apply(technique, config, "tiny_bert")
    del ctx.structure["derived"]
    plan = Plan(steps=(PlanStep(technique.name, technique.config_to_dict(config)),), seed=0)
    save_model(model, tmp_path / "b.slim", task=task, plan=plan, structure=[ctx.structure])
    with pytest.raises(ArtifactError, match="tensors do not fit the rebuilt model"):
        load_model(tmp_path / "b.slim", Plugins(load_entry_points=False).registry)
