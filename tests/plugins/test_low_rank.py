"""low_rank: exact at full rank, Eckart-Young optimal when truncated, ranks and savings as stated,
artifacts that rebuild the same shapes."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.artifact import describe_artifact
from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.outputs import logits_of
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.sites import derive_weight, derived_of, weight_sites
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.common import replace_module
from slimforge.plugins.factorization.low_rank import (
    LowRank,
    LowRankWeight,
    factorize,
    form_for,
    matrix_of,
    rank_for_energy,
    svd_factors,
)
from slimforge.core.space import FixedSuggester, scoped

MLP = "slimforge.core.testing:tiny_mlp"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(24, 16), torch.randn(5, 24)),
    (nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 11, 11)),
    (nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=2, padding_mode="reflect"),
     torch.randn(2, 4, 9, 10)),
    (nn.Conv1d(5, 7, 3, padding=1, bias=False), torch.randn(2, 5, 12)),
])
def test_full_rank_factorization_reproduces_the_layer(layer, x):
    full = min(matrix_of(layer).shape)
    pair = factorize(layer, full)
    assert pair[0].bias is None and (pair[1].bias is None) == (layer.bias is None)
    if not isinstance(layer, nn.Linear):
        assert pair[1].kernel_size == (1,) * len(layer.kernel_size)
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(pair[0], attr) == getattr(layer, attr), attr
    with torch.no_grad():
        assert torch.allclose(pair(x), layer(x), atol=1e-5, rtol=1e-5)


def test_truncation_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    s = torch.linalg.svdvals(matrix_of(layer).double())
    pair = factorize(layer, 7)
    product = (pair[1].weight @ pair[0].weight).double()
    residual = (matrix_of(layer).double() - product).square().sum()
    assert torch.allclose(residual, s[7:].square().sum(), rtol=1e-4)
    # sqrt(S) split into both factors: their per-component norms agree.
    assert torch.allclose(pair[0].weight.norm(dim=1), pair[1].weight.norm(dim=0), rtol=1e-4)


def test_rank_for_energy_is_the_smallest_rank_reaching_the_fraction():
    s = torch.tensor([3.0, 2.0, 1.0])  # cumulative energy 9/14, 13/14, 14/14
    assert [rank_for_energy(s, e) for e in (0.1, 9 / 14, 0.65, 13 / 14 - 1e-9, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("values,field", [
    ({"energy": {"fc": 0.0}}, "energy"), ({"energy": {"fc": 1.5}}, "energy"),
    ({"rank_fraction": 0.5, "energy": {"fc": 0.9}}, "rank_fraction"), ({"default_energy": True}, "default_energy"),
])
def test_config_validation(values, field):
    with pytest.raises(ConfigError, match=rf"low_rank\.{field}"):
        LowRank.config_from_dict(values)


def test_suggest_energies_cover_every_layer_within_range():
    task = tiny_task(MLP)
    for seed in range(10):
        config = LowRank().suggest(scoped(FixedSuggester(seed=seed), "low_rank"), task)
        assert set(config.energy) == {"1", "3", "5"}
        assert all(0.5 <= e <= 0.99 for e in config.energy.values())


def test_rank_fraction_drops_the_parameter_count_exactly():
    task = tiny_task(MLP)  # Linear(144, 64), Linear(64, 32), Linear(32, 5)
    model, ctx = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=0)
    assert ctx.structure == {"ranks": {"1": 16, "3": 8, "5": 2}}
    expected = (16 * (144 + 64) + 64) + (8 * (64 + 32) + 32) + (2 * (32 + 5) + 5)
    assert n_params(model) == expected < n_params(task.teacher) == 144 * 64 + 64 + 64 * 32 + 32 + 32 * 5 + 5
    assert isinstance(model[1], nn.Sequential) and model[1][0].weight.shape == (16, 144)


def test_energy_ranks_are_recorded_and_unprofitable_layers_kept():
    task = tiny_task(MLP)
    config = LowRank.Config(energy={"1": 0.6, "3": 1.0, "nope": 0.9})
    model, ctx = compress(LowRank(), config, task, recovery_steps=0)
    expected_rank = rank_for_energy(torch.linalg.svdvals(matrix_of(task.teacher[1]).double()), 0.6)
    assert ctx.structure == {"ranks": {"1": expected_rank}}
    assert model[1][0].weight.shape == (expected_rank, 144)
    assert type(model[3]) is nn.Linear and type(model[5]) is nn.Linear  # "5" not configured: untouched
    assert sorted(ctx.notes) == sorted([
        "low_rank: layer 'nope' not found in the model; ignored",
        "low_rank: layer '3': rank 32 of 32 saves no parameters (3072 >= 2048); kept whole"])


def test_grouped_conv_is_noted_and_kept():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3))
    ctx = TechniqueContext(task=None)
    model = LowRank().apply(model, LowRank.Config(rank_fraction=0.25), ctx)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], nn.Sequential)
    assert ctx.notes == ["low_rank: layer '0' is a grouped conv (groups=2); kept whole"]
    assert ctx.structure == {"ranks": {"1": 2}}


@pytest.mark.parametrize("architecture", ["slimforge.core.testing:tiny_cnn", MLP])
def test_artifact_round_trip_is_bitwise_and_smaller(architecture, tmp_path):
    task = tiny_task(architecture)
    plugins = Plugins(load_entry_points=False)
    config = LowRank.Config(rank_fraction=0.3)
    model, ctx = compress(LowRank(), config, task, recovery_steps=2)
    assert ctx.structure["ranks"], "nothing was factorized: the test would prove nothing"
    plan = Plan(steps=(PlanStep("low_rank", LowRank.config_to_dict(config)),))
    size = save_model(model, tmp_path / "lr.slim", task=task, plan=plan, structure=[ctx.structure])
    dense = save_model(task.teacher, tmp_path / "dense.slim", task=task, plan=Plan(steps=()))
    loaded = load_model(tmp_path / "lr.slim", plugins.registry).model
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert size < dense


def test_restore_structure_needs_only_the_recorded_ranks():
    task = tiny_task(MLP)
    model, ctx = compress(LowRank(), LowRank.Config(energy={"1": 0.7, "3": 0.7}), task, recovery_steps=0)
    fresh = LowRank().restore_structure(copy.deepcopy(task.teacher), LowRank.Config(), None, ctx.structure)
    fresh.load_state_dict(model.state_dict(), strict=True)


# --- every weight kind: attention, FFN, HF Conv1D, Embedding (tied too), RNN --------------------

TRANSFORMER, GPT2, GRU = (f"slimforge.core.testing:{name}" for name in ("tiny_transformer", "tiny_gpt2", "tiny_gru"))
BERT, LLAMA = "slimforge.core.testing:tiny_bert", "slimforge.core.testing:tiny_llama"


def logits(model, x):
    with torch.inference_mode():
        return logits_of(model(x))


def round_trip(task, model, ctx, config, tmp_path):
    plan = Plan(steps=(PlanStep("low_rank", LowRank.config_to_dict(config)),))
    size = save_model(model, tmp_path / "lr.slim", task=task, plan=plan, structure=[ctx.structure])
    dense = save_model(task.teacher, tmp_path / "dense.slim", task=task, plan=Plan(steps=()))
    return size, dense, load_model(tmp_path / "lr.slim", Plugins(load_entry_points=False).registry).model


@pytest.mark.parametrize("architecture", [TRANSFORMER, BERT, GPT2, LLAMA, GRU])
def test_full_rank_keeps_every_sequence_model_s_outputs(architecture):
    """Every site at full rank, each in the form ``apply`` gives it: the model computes what the
    dense one did, up to float rounding (``apply`` itself refuses full rank: it saves nothing)."""
    task = tiny_task(architecture)
    model = copy.deepcopy(task.teacher)
    for site in weight_sites(model).values():
        svd = torch.linalg.svd(site.matrix(model).detach().double(), full_matrices=False)
        full = len(svd[1])
        if form_for(model, site) == "modules":
            replace_module(model, site.module, factorize(site.owner(model), full, svd))
        else:
            factors = LowRankWeight(site, full)
            left, right = svd_factors(None, full, svd)
            with torch.no_grad():
                factors.U.copy_(left)
                factors.V.copy_(right)
            derive_weight(model, site, factors)
    x = task.split("val")[:][0][:8]
    assert torch.allclose(logits(model, x), logits(task.teacher, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", [TRANSFORMER, BERT, GPT2, LLAMA, GRU])
def test_sequence_models_shrink_and_round_trip_bitwise(architecture, tmp_path):
    task = tiny_task(architecture)
    config = LowRank.Config(rank_fraction=0.25)
    model, ctx = compress(LowRank(), config, task, recovery_steps=2)
    size, dense, loaded = round_trip(task, model, ctx, config, tmp_path)
    x = task.split("val")[:][0][:16]
    assert torch.equal(logits(model, x), logits(loaded, x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert n_params(model) < 0.5 * n_params(task.teacher)
    assert size < 0.6 * dense, (size, dense)


def test_forms_per_site_on_the_torch_transformer():
    """Parents that read the weight (MultiheadAttention, the encoder layer's fast path) get the
    derived form; the classifier head, only called, is replaced by a pair of Linears."""
    task = tiny_task(TRANSFORMER)
    model, ctx = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=0)
    layer = model.encoder.layers[0]
    for owner, param in ((layer.self_attn, "in_proj_weight"), (layer.self_attn.out_proj, "weight"),
                         (layer.linear1, "weight"), (layer.linear2, "weight")):
        factors = owner.parametrizations[param][0]
        assert isinstance(factors, LowRankWeight)
        assert getattr(owner, param).shape == factors.site.shape  # still readable, as the parent needs
    assert layer.self_attn.parametrizations.in_proj_weight[0].U.shape == (96, 8)  # one packed q/k/v matrix
    assert isinstance(model.head, nn.Sequential) and isinstance(model.embed, nn.Sequential)
    assert ctx.structure["derived"]["encoder.layers.0.self_attn.in_proj_weight"] == 8
    assert ctx.structure["ranks"]["embed"] == 8 and ctx.structure["ranks"]["head"] == 2
    assert ctx.notes == ["low_rank: parameter 'pos' [1, 16, 32] is not a weight matrix of a known layer; kept dense"]
    # The inference fast path of nn.TransformerEncoderLayer reads every weight; it still runs.
    x = task.split("val")[:][0][:4]
    assert logits(model, x).shape == (4, 5)


def test_gpt2_projections_become_linear_pairs_and_the_tied_embedding_is_stored_once(tmp_path):
    task = tiny_task(GPT2)
    config = LowRank.Config(rank_fraction=0.25)
    model, ctx = compress(LowRank(), config, task, recovery_steps=2)
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, nn.Sequential) and attn.c_attn[0].weight.shape == (8, 32)
    assert attn.c_attn[1].weight.shape == (96, 8)  # the packed q/k/v output, one matrix
    assert isinstance(model.transformer.h[0].mlp.c_fc, nn.Sequential)
    # Tied input/output embedding: one set of factors serves both, and the artifact stores it once.
    wte, lm_head = model.transformer.wte, model.lm_head
    assert derived_of(model, weight_sites(model)["transformer.wte.weight"]) is lm_head.parametrizations.weight[0]
    assert torch.equal(wte.weight, lm_head.weight)
    assert ctx.structure["derived"] == {"transformer.wte.weight": 8}
    _, _, loaded = round_trip(task, model, ctx, config, tmp_path)
    rows = {row["name"]: row for row in describe_artifact(tmp_path / "lr.slim")["tensors"]}
    for factor in ("U", "V"):
        assert rows[f"lm_head.parametrizations.weight.0.{factor}"]["encoding"] == \
            f"alias of transformer.wte.parametrizations.weight.0.{factor}"
    assert loaded.lm_head.parametrizations.weight[0] is loaded.transformer.wte.parametrizations.weight[0]
    x = task.split("val")[:][0][:8]
    assert torch.equal(logits(model, x), logits(loaded, x))


def test_a_missing_stored_factor_is_reported_not_silently_kept():
    task = tiny_task(GPT2)
    model, ctx = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=0)
    state = model.state_dict()
    del state["transformer.wte.parametrizations.weight.0.U"]
    fresh = LowRank().restore_structure(task.architecture.call(), LowRank.Config(), None, ctx.structure)
    with pytest.raises(RuntimeError, match=r"transformer\.wte\.parametrizations\.weight\.0\.U"):
        fresh.load_state_dict(state, strict=True)


def test_llama_grouped_query_projections_and_untied_embeddings_are_module_pairs():
    task = tiny_task(LLAMA)
    model, ctx = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=0)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, nn.Sequential) and attn.k_proj[1].weight.shape == (16, 4)  # 2 kv heads x 8
    assert isinstance(attn.q_proj, nn.Sequential) and attn.q_proj[1].weight.shape == (32, 8)
    assert isinstance(model.model.embed_tokens, nn.Sequential) and isinstance(model.lm_head, nn.Sequential)
    assert model.model.embed_tokens[0].weight.shape == (64, 8) and model.model.embed_tokens[1].weight.shape == (32, 8)
    assert "derived" not in ctx.structure


def test_gru_weights_are_derived_and_trained(tmp_path):
    task = tiny_task(GRU)
    model, ctx = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=0)
    assert ctx.structure["derived"] == {"rnn.weight_ih_l0": 4, "rnn.weight_hh_l0": 8}
    factors = model.rnn.parametrizations.weight_hh_l0[0]
    assert factors.U.shape == (96, 8) and factors.V.shape == (8, 32)  # three gates, one matrix
    model.train()
    x, y = task.split("train")[:16]
    nn.functional.cross_entropy(model(x), y).backward()
    assert factors.U.grad is not None and factors.U.grad.abs().sum() > 0
    assert model.rnn.parametrizations.weight_hh_l0.original.numel() == 0  # the dense tensor is gone


def test_derived_weight_is_cached_outside_training_and_follows_factor_updates():
    task = tiny_task(GRU)
    model, _ = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=0)
    factors = model.rnn.parametrizations.weight_hh_l0[0]
    calls = []
    product = factors.product
    factors.product = lambda: calls.append(1) or product()
    x = task.split("val")[:][0][:4]
    model.eval()
    first = logits(model, x)
    logits(model, x)
    with torch.no_grad():
        model(x)
    assert len(calls) == 1  # computed once, then reused: eval latency is the dense model's
    with torch.no_grad():
        factors.U.mul_(0.5)  # an optimizer step or a load_state_dict writes in place
    assert not torch.equal(logits(model, x), first) and len(calls) == 2
    model.train()
    model(x)
    after_one = len(calls)
    model(x)
    assert after_one > 2 and len(calls) == 2 * after_one - 2  # training recomputes in every forward (gradients)
    model.eval()
    with torch.no_grad():
        assert factors(torch.empty(0)) is factors(torch.empty(0))


def test_embedding_pair_is_a_narrow_lookup_then_a_projection():
    torch.manual_seed(0)
    table = nn.Embedding(20, 12, padding_idx=3)
    pair = factorize(table, 12)
    assert isinstance(pair[0], nn.Embedding) and pair[0].weight.shape == (20, 12) and pair[0].padding_idx == 3
    assert isinstance(pair[1], nn.Linear) and pair[1].bias is None
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    with torch.no_grad():
        assert torch.allclose(pair(ids), table(ids), atol=1e-5)
        assert torch.equal(pair[0].weight[3], torch.zeros(12))  # the zero padding row stays exactly zero


def test_hf_conv1d_pair_matches_the_transposed_layer():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 10)  # nf=24 outputs, nx=10 inputs; weight stored (10, 24)
    with torch.no_grad():
        layer.bias.normal_()
    pair = factorize(layer, 10)
    x = torch.randn(3, 5, 10)
    with torch.no_grad():
        assert torch.allclose(pair(x), layer(x), atol=1e-5)
    assert pair[0].weight.shape == (10, 10) and pair[1].weight.shape == (24, 10)


def test_embedding_with_max_norm_and_derived_sites_are_noted():
    model = nn.Sequential(nn.Embedding(40, 16, max_norm=1.0), nn.Linear(16, 40))
    ctx = TechniqueContext(task=None)
    model = LowRank().apply(model, LowRank.Config(rank_fraction=0.25), ctx)
    assert type(model[0]) is nn.Embedding and isinstance(model[1], nn.Sequential)
    assert ctx.notes == [("low_rank: layer '0' is an Embedding with max_norm=1.0, which renormalises stored rows "
                          "the factors do not have; kept whole")]
    again = TechniqueContext(task=None)
    gru = LowRank().apply(nn.GRU(16, 32), LowRank.Config(rank_fraction=0.25), TechniqueContext(task=None))
    LowRank().apply(gru, LowRank.Config(rank_fraction=0.25), again)
    assert again.notes == ["low_rank: weight 'weight_ih_l0' already re-expressed by an earlier technique; kept whole",
                           "low_rank: weight 'weight_hh_l0' already re-expressed by an earlier technique; kept whole"]


def test_suggest_covers_every_site_kind():
    task = tiny_task(GPT2)
    config = LowRank().suggest(scoped(FixedSuggester(seed=0), "low_rank"), task)
    assert {"transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(config.energy)
    assert "lm_head" not in config.energy  # tied to wte: one site, one setting
    task = tiny_task(TRANSFORMER)
    config = LowRank().suggest(scoped(FixedSuggester(seed=0), "low_rank"), task)
    assert {"encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj", "embed"} <= set(config.energy)


def test_a_trained_gru_can_be_copied():
    """After a training forward an RNN holds U @ V products from the autograd graph; the trial
    deep-copies models (the size estimate before recovery, finishing stages), which must work."""
    task = tiny_task(GRU)
    model, _ = compress(LowRank(), LowRank.Config(rank_fraction=0.25), task, recovery_steps=1)
    model.train()
    x, y = task.split("train")[:8]
    nn.functional.cross_entropy(model(x), y).backward()
    copied = copy.deepcopy(model.eval())
    assert torch.equal(logits(copied, x), logits(model, x))
