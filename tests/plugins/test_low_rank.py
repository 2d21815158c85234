"""low_rank: exact at full rank, Eckart-Young optimal when truncated, ranks and savings as stated,
artifacts that rebuild the same shapes."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.factorization.low_rank import LowRank, factorize, matrix_of, rank_for_energy
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
