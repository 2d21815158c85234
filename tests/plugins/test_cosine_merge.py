"""cosine_merge: scaled duplicates merge with the function unchanged, parameters drop, the
smaller structure survives an artifact round trip bitwise, unsupported chains are left alone."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import TINY_ARCHITECTURES, tiny_task
from slimforge.plugins.sharing.cosine_merge import CosineMerge, CosineMergeConfig, find_chains, plan_merges

MERGE = CosineMerge()


def _duplicate(layer: nn.Module, src: int, dst: int, scale: float) -> None:
    with torch.no_grad():
        layer.weight[dst] = scale * layer.weight[src]
        layer.bias[dst] = scale * layer.bias[src]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def cnn_with_duplicates():
    """tiny_cnn with a scaled copy in each hidden layer: conv0 (-> ReLU -> MaxPool -> conv3),
    conv3 (-> ReLU -> Flatten, 9 fc inputs per channel) and fc6 (-> ReLU -> fc8)."""
    task = tiny_task(TINY_ARCHITECTURES[0])
    model = copy.deepcopy(task.teacher)
    _duplicate(model[0], 1, 7, 0.3)
    _duplicate(model[3], 2, 5, 2.5)
    _duplicate(model[6], 0, 4, 1.7)
    return task, model


def test_scaled_duplicates_merge_and_the_function_is_unchanged(cnn_with_duplicates):
    task, model = cnn_with_duplicates
    x = task.split("val")[:][0]
    with torch.no_grad():
        expected = model(x)
    ctx = TechniqueContext(task=task)
    merged = MERGE.apply(copy.deepcopy(model), CosineMergeConfig(threshold=0.999), ctx)
    assert ctx.structure == {"kept": {"0": 7, "3": 15, "6": 31}}
    assert (merged[0].out_channels, merged[3].in_channels, merged[3].out_channels) == (7, 7, 15)
    assert (merged[6].in_features, merged[6].out_features, merged[8].in_features) == (15 * 9, 31, 31)
    # conv0 80 -> 70, conv3 1168 -> 960, fc6 4640 -> 4216, fc8 165 -> 160 parameters
    assert _params(model) - _params(merged) == 10 + 208 + 424 + 5
    with torch.no_grad():
        assert torch.allclose(merged(x), expected, rtol=1e-6, atol=1e-6)
    assert ctx.notes == ["cosine_merge: '8' skipped: its output is the model's output"]


def test_artifact_round_trip_rebuilds_the_smaller_shapes(cnn_with_duplicates, tmp_path):
    task, model = cnn_with_duplicates
    ctx = TechniqueContext(task=task)
    config = CosineMergeConfig(threshold=0.999)
    merged = MERGE.apply(model, config, ctx)
    plan = Plan(steps=(PlanStep(MERGE.name, MERGE.config_to_dict(config)),))
    save_model(merged, tmp_path / "m.slim", task=task, plan=plan, structure=[ctx.structure])
    loaded = load_model(tmp_path / "m.slim", Plugins(load_entry_points=False).registry).model
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in merged.state_dict().items()}
    x = task.split("val")[:][0][:32]
    with torch.inference_mode():
        assert torch.equal(loaded(x), merged(x))


def test_mlp_chain_and_opposite_or_dead_units():
    task = tiny_task(TINY_ARCHITECTURES[1])
    model = copy.deepcopy(task.teacher)
    _duplicate(model[1], 3, 10, 0.8)
    _duplicate(model[1], 4, 11, -1.0)  # cosine -1: ReLU is not odd, so this must not merge
    with torch.no_grad():
        model[3].weight[9].zero_()
        model[3].bias[9] = 0.0  # a dead unit outputs exactly zero: removed, nothing re-routed
    x = task.split("val")[:][0]
    with torch.no_grad():
        expected = model(x)
    ctx = TechniqueContext(task=task)
    merged = MERGE.apply(copy.deepcopy(model), CosineMergeConfig(threshold=0.99), ctx)
    assert ctx.structure == {"kept": {"1": 63, "3": 31}}
    with torch.no_grad():
        assert torch.allclose(merged(x), expected, rtol=1e-6, atol=1e-6)


def test_plan_merges_is_greedy_in_unit_order():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.01], [0.0, 0.0], [0.01, 3.0], [1.0, 1.0]])
    kept, merges, dead = plan_merges(weight, None, threshold=0.99)
    assert kept == [0, 1, 5] and dead == [3]
    assert [(j, i) for j, i, _ in merges] == [(2, 0), (4, 1)]
    assert merges[0][2] == pytest.approx(2.0) and merges[1][2] == pytest.approx(3.0)


class _BranchyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.conv3 = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = self.conv2(self.bn(self.conv1(x)))
        return self.fc(torch.flatten(self.conv3(torch.relu(y) + y), 1))


def test_unsupported_chains_are_noted_and_left_alone():
    chains, skipped = find_chains(_BranchyNet())
    assert [c.producer for c in chains] == ["conv3"] and chains[0].block == 36
    assert set(skipped) == {"conv1", "conv2", "fc"}
    assert "BatchNorm2d" in skipped["conv1"] and "2 nodes" in skipped["conv2"]


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, "0.9"])
def test_config_rejects_out_of_range_threshold(threshold):
    with pytest.raises(ConfigError, match="cosine_merge.threshold"):
        CosineMergeConfig(threshold=threshold)


def test_a_relu_encoder_layer_ffn_merges_and_round_trips(tmp_path):
    task = tiny_task("slimforge.core.testing:tiny_transformer")
    model = copy.deepcopy(task.teacher)
    layer = model.encoder.layers[0]
    _duplicate(layer.linear1, 3, 10, 1.8)  # a scaled copy of hidden neuron 3
    x = task.split("val")[:][0][:16]
    with torch.no_grad():
        expected = model(x)
    ctx = TechniqueContext(task=task)
    config = CosineMergeConfig(threshold=0.999)
    merged = MERGE.apply(copy.deepcopy(model), config, ctx)
    assert ctx.structure == {"kept": {}, "ffn": {"encoder.layers.0": 63}}
    assert merged.encoder.layers[0].linear1.out_features == merged.encoder.layers[0].linear2.in_features == 63
    with torch.no_grad():
        assert torch.allclose(merged(x), expected, rtol=1e-5, atol=1e-5)  # ReLU(c z) = c ReLU(z), c > 0
    assert any("in_proj_weight' skipped: attention projection" in n for n in ctx.notes)
    plan = Plan(steps=(PlanStep(MERGE.name, MERGE.config_to_dict(config)),), seed=0)
    path = tmp_path / "ffn.slim"
    save_model(merged, path, task=task, plan=plan, structure=[ctx.structure])
    loaded = load_model(path, Plugins(load_entry_points=False).registry).model
    with torch.inference_mode():
        assert torch.equal(loaded(x), merged(x))


def test_a_gelu_encoder_layer_ffn_is_noted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True))
    from slimforge.plugins.sharing.cosine_merge import encoder_ffns

    mergeable, reasons = encoder_ffns(model)
    assert mergeable == [] and "GELU(c x) != c GELU(x)" in reasons["0.linear1"]
