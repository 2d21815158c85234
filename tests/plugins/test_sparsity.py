"""random_sparsity and nm_sparsity: exact mask counts and patterns, kept through recovery."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_cnn, tiny_task
from slimforge.plugins.common import weight_layers
from slimforge.plugins.factorization.low_rank import LowRank
from slimforge.plugins.pruning.magnitude import DENSITY_RANGE
from slimforge.plugins.sparsity.nm_sparsity import NMSparsity, nm_mask
from slimforge.plugins.sparsity.random_sparsity import RandomSparsity
from slimforge.core.space import FixedSuggester, scoped

MLP = "slimforge.core.testing:tiny_mlp"  # reduction dims 144, 64, 32: multiples of 4, 8 and 16


@pytest.fixture(scope="module")
def mlp_task():
    return tiny_task(MLP)


@pytest.fixture(scope="module")
def cnn_task():
    return tiny_task()


def group_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzero count of every group of m along the flattened reduction dim (K divisible by m)."""
    return (weight.reshape(weight.shape[0], -1, m) != 0).sum(dim=-1)


def weights(model):
    return {name: layer.weight.detach().clone() for name, layer in weight_layers(model).items()}


# --- nm_sparsity -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{"n": 4, "m": 4}, {"n": 0, "m": 4}, {"n": 2, "m": 6}, {"n": 2.0, "m": 4},
                                    {"n": True, "m": 4}])
def test_nm_config_rejects_invalid_patterns(values):
    with pytest.raises(ConfigError, match=r"nm_sparsity\.[nm]"):
        NMSparsity.config_from_dict(values)


def test_nm_suggest_draws_only_the_searched_patterns(mlp_task):
    drawn = {(c.n, c.m) for c in (NMSparsity().suggest(scoped(FixedSuggester(seed=s), "nm_sparsity"), mlp_task)
                                  for s in range(30))}
    assert drawn == {(1, 4), (2, 4), (2, 8), (4, 8)}


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (2, 8), (4, 8), (3, 16)])
def test_nm_mask_keeps_exactly_the_n_largest_of_every_group(n, m):
    weight = torch.randn(6, 2 * m, 3, 1, generator=torch.Generator().manual_seed(0))  # K = 6m, a conv shape
    mask = nm_mask(weight, n, m)
    groups = weight.abs().reshape(6, -1, m)
    kept = mask.reshape(6, -1, m)
    assert (kept.sum(-1) == n).all()
    smallest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = groups.masked_fill(kept, -1.0).amax(-1)
    assert (smallest_kept > largest_dropped).all()


def test_nm_mask_pads_a_short_last_group_logically():
    weight = torch.arange(1.0, 10.0).view(1, 9)  # groups of 4: [1..4], [5..8], [9]
    assert nm_mask(weight, 2, 4).tolist() == [[False, False, True, True, False, False, True, True, True]]
    assert nm_mask(-weight, 3, 4).sum() == 3 + 3 + 1


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (5, 16)])
def test_nm_pattern_holds_after_apply_and_after_recovery_steps(mlp_task, n, m):
    technique, config = NMSparsity(), NMSparsity.Config(n=n, m=m)
    applied, ctx = compress(technique, config, mlp_task, recovery_steps=0)
    assert not ctx.notes
    for name, w in weights(applied).items():
        assert (group_nonzeros(w, m) == n).all(), f"{name} after apply"
    recovered, _ = compress(technique, config, mlp_task, recovery_steps=2)
    before, after = weights(applied), weights(recovered)
    for name, w in after.items():
        assert (group_nonzeros(w, m) == n).all(), f"{name} after recovery"
        assert torch.equal(w != 0, before[name] != 0), f"{name}: the pattern moved during recovery"
        assert not torch.equal(w, before[name]), f"{name}: recovery did not train (vacuous check)"


def test_nm_conv_groups_run_along_flattened_in_channels_times_kernel(cnn_task):
    model, ctx = compress(NMSparsity(), NMSparsity.Config(n=2, m=4), cnn_task, recovery_steps=2)
    conv2 = model[3].weight  # (16, 8, 3, 3): K = 72
    assert (group_nonzeros(conv2, 4) == 2).all()
    # conv1 is (8, 1, 3, 3): K = 9 = 4 + 4 + 1, so each filter keeps 2 + 2 + 1 weights.
    assert ((model[0].weight != 0).reshape(8, -1).sum(1) == 5).all()
    assert ctx.notes == ["nm_sparsity: layer '0': reduction dim 9 is not a multiple of 4; "
                         "its last group per row (1 weights) is padded logically"]


def test_nm_2_4_artifact_round_trip_and_is_smaller(mlp_task, tmp_path):
    plugins = Plugins(load_entry_points=False)
    model, ctx = compress(NMSparsity(), NMSparsity.Config(n=2, m=4), mlp_task, recovery_steps=2)
    plan = Plan(steps=(PlanStep("nm_sparsity", {"n": 2, "m": 4}),))
    dense = save_model(mlp_task.teacher, tmp_path / "dense.slim", task=mlp_task, plan=Plan(steps=()))
    size = save_model(model, tmp_path / "nm.slim", task=mlp_task, plan=plan, structure=[ctx.structure])
    loaded = load_model(tmp_path / "nm.slim", plugins.registry).model
    for name, w in weights(loaded).items():
        assert (group_nonzeros(w, 4) == 2).all(), name
    x = mlp_task.split("val")[:][0][:32]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    # Half the weights are zero; the file must show it (measured about 0.62 of dense).
    assert size < 0.7 * dense


def test_masked_weights_are_positive_zeros(mlp_task):
    # -0.0 would be stored as a nonzero by the bit-exact codec (about 20% of a 2:4 file).
    model, _ = compress(NMSparsity(), NMSparsity.Config(n=2, m=4), mlp_task, recovery_steps=0)
    for w in weights(model).values():
        zeros = w[w == 0]
        assert not torch.signbit(zeros).any()


# --- random_sparsity ---------------------------------------------------------------------------

def test_random_config_rejects_out_of_range():
    with pytest.raises(ConfigError, match=r"random_sparsity\.sparsity\['fc'\]"):
        RandomSparsity.config_from_dict({"sparsity": {"fc": 1.0}})


def test_random_suggest_samples_density_like_magnitude_pruning(cnn_task):
    space = FixedSuggester(seed=3)
    config = RandomSparsity().suggest(scoped(space, "random_sparsity"), cnn_task)
    assert set(config.sparsity) == set(weight_layers(cnn_task.teacher))
    assert all(name.startswith("random_sparsity.density.") for name in space.asked)
    assert all(1 - DENSITY_RANGE[1] <= s <= 1 - DENSITY_RANGE[0] for s in config.sparsity.values())


def test_random_masks_are_exact_seeded_and_kept_through_recovery(mlp_task):
    technique = RandomSparsity()
    config = RandomSparsity.Config(sparsity={"1": 0.9, "3": 0.5}, default_sparsity=0.25)
    applied, ctx = compress(technique, config, mlp_task, recovery_steps=0, seed=7)
    expected_zeros = {"1": round(0.9 * 144 * 64), "3": 0.5 * 64 * 32, "5": round(0.25 * 32 * 5)}
    for name, w in weights(applied).items():
        assert int((w == 0).sum()) == expected_zeros[name], name
    again, _ = compress(technique, config, mlp_task, recovery_steps=0, seed=7)
    other, _ = compress(technique, config, mlp_task, recovery_steps=0, seed=8)
    recovered, _ = compress(technique, config, mlp_task, recovery_steps=2, seed=7)
    for name, w in weights(applied).items():
        assert torch.equal(weights(again)[name] != 0, w != 0), f"{name}: same seed, different mask"
        assert not torch.equal(weights(other)[name] != 0, w != 0), f"{name}: seed ignored"
        assert torch.equal(weights(recovered)[name] != 0, w != 0), f"{name}: mask lost in recovery"


def test_random_mask_ignores_magnitude_and_differs_per_layer():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    ctx = TechniqueContext(task=None, seed=0)
    before = weights(model)
    RandomSparsity().apply(model, RandomSparsity.Config(default_sparsity=0.5), ctx)
    kept = {name: w != 0 for name, w in weights(model).items()}
    assert not torch.equal(kept["0"], kept["1"]), "layer index must enter the seed"
    # A magnitude mask would keep exactly the top half; a random one keeps about half of it.
    top_half = before["0"].abs() >= before["0"].abs().flatten().median()
    overlap = (kept["0"] & top_half).sum() / kept["0"].sum()
    assert 0.4 < overlap < 0.6


def test_random_sparsity_reaches_layers_low_rank_split(mlp_task):
    model = copy.deepcopy(mlp_task.teacher)
    lr_ctx = TechniqueContext(task=mlp_task)
    model = LowRank().apply(model, LowRank.Config(rank_fraction=0.25), lr_ctx)
    ctx = TechniqueContext(task=mlp_task)
    RandomSparsity().apply(model, RandomSparsity.Config(sparsity={"1": 0.5, "missing": 0.5}), ctx)
    layers = weight_layers(model)
    assert {"1.0", "1.1"} <= set(layers)
    for name in ("1.0", "1.1"):
        assert int((layers[name].weight == 0).sum()) == layers[name].weight.numel() // 2, name
    assert ctx.notes == ["random_sparsity: layer 'missing' not found in the model; ignored"]


def test_random_sparsity_cannot_follow_magnitude_pruning():
    registry = Plugins(load_entry_points=False).registry
    assert RandomSparsity.conflicts_with(type(registry.get("magnitude_pruning")))
    assert not RandomSparsity.conflicts_with(LowRank)


def test_tiny_cnn_layers_are_what_the_tests_assume():
    assert list(weight_layers(tiny_cnn())) == ["0", "3", "6", "8"]
