"""max_entropy_sparsity: the mask is exact in count, maximal in histogram entropy, and held through
recovery like the other masks."""

import copy
import itertools
import math

import pytest
import torch

from slimforge.core.errors import ConfigError
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.common import keep_top, weight_layers
from slimforge.plugins.sparsity.max_entropy_sparsity import (MaxEntropySparsity, MaxEntropySparsityConfig,
                                                             histogram_entropy, kept_count, max_entropy_mask,
                                                             value_bins, water_fill)
from slimforge.plugins.sparsity.random_sparsity import random_mask

BINS = 32


def kept_entropy(weight, mask, bins=BINS):
    return histogram_entropy(weight[mask], float(weight.min()), float(weight.max()), bins)


def trained_like(shape, seed=0):
    """Heavy-tailed, zero-peaked values, as trained weights are."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(2)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(64, 144), (10, 7), (1, 33)])
def test_mask_keeps_exactly_the_density(shape, density):
    weight = trained_like(shape)
    mask = max_entropy_mask(weight, density)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    # the same count keep_top (random_sparsity, magnitude_pruning) keeps at sparsity 1 - density
    assert int(mask.sum()) == kept_count(weight.numel(), density) == int(keep_top(weight.abs(), 1 - density).sum())


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_kept_values_have_higher_entropy_than_magnitude_and_random_masks(density):
    weight = trained_like((128, 200), seed=1)
    ours = kept_entropy(weight, max_entropy_mask(weight, density))
    magnitude = kept_entropy(weight, keep_top(weight.abs(), 1 - density))
    random = kept_entropy(weight, random_mask(weight.shape, 1 - density, seed=0))
    assert ours > magnitude + 0.1 and ours > random + 0.1, (ours, magnitude, random)


def test_the_tails_are_kept_whole():
    weight = trained_like((64, 64), seed=2)
    mask = max_entropy_mask(weight, 0.1)
    bins = value_bins(weight.flatten(), BINS).view_as(weight)
    assert mask[bins == 0].all() and mask[bins == BINS - 1].all()  # the extreme bins are sparse


def test_water_fill_is_the_entropy_maximum_among_all_integer_allocations():
    counts = torch.tensor([1, 5, 9, 2, 0, 4])
    allocations = list(itertools.product(*(range(n + 1) for n in counts.tolist())))

    def entropy(c, keep):
        return -sum(x / keep * math.log(x / keep) for x in c if x)

    for keep in range(1, int(counts.sum()) + 1):
        allocation = water_fill(counts, keep, torch.arange(6.0))
        assert int(allocation.sum()) == keep and bool((allocation <= counts).all())
        best = max(entropy(c, keep) for c in allocations if sum(c) == keep)
        assert entropy(allocation.tolist(), keep) == pytest.approx(best)


def test_within_a_bin_the_largest_magnitudes_are_kept():
    weight = torch.tensor([[0.0, 0.01, 0.02, 0.03, 1.0]])  # two bins: [0, 0.5) holds four, [0.5, 1] one
    mask = max_entropy_mask(weight, 0.4, bins=2)
    assert mask.tolist() == [[False, False, False, True, True]]


def test_constant_weight_and_bad_density():
    assert int(max_entropy_mask(torch.ones(4, 5), 0.5).sum()) == 10
    with pytest.raises(ValueError, match="density"):
        max_entropy_mask(torch.ones(3), 1.5)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"max_entropy_sparsity\.sparsity\['fc1'\]: must be in \[0, 1\)"):
        MaxEntropySparsityConfig(sparsity={"fc1": 1.0})
    with pytest.raises(ConfigError, match=r"max_entropy_sparsity\.bins: must be an integer in 2\.\.4096"):
        MaxEntropySparsityConfig(bins=1)


def test_apply_masks_every_layer_and_recovery_holds_them():
    task = tiny_task()
    config = MaxEntropySparsityConfig(default_sparsity=0.8, sparsity={"0": 0.5})
    model, ctx = compress(MaxEntropySparsity(), config, task)
    teacher_layers = weight_layers(task.teacher)
    for name, layer in weight_layers(model).items():
        density = 0.5 if name == "0" else 0.2
        assert int((layer.weight != 0).sum()) == kept_count(layer.weight.numel(), density)
        expected = max_entropy_mask(teacher_layers[name].weight.reshape(layer.weight.shape[0], -1), density)
        assert torch.equal(ctx.state["masks"][f"{name}.weight"].reshape(expected.shape), expected)


def test_a_missing_layer_is_a_note():
    task = tiny_task()
    ctx = TechniqueContext(task=task)
    MaxEntropySparsity().apply(copy.deepcopy(task.teacher), MaxEntropySparsityConfig(sparsity={"nope": 0.5}), ctx)
    assert ctx.notes == ["max_entropy_sparsity: layer 'nope' not found in the model; ignored"]
