"""weight_only_quant: bits in the file, error ordering, exact zeros, ends kept wide, bitwise round trip."""

import copy
import math

import pytest
import torch
from torch import nn

from slimforge.core.artifact import describe_artifact
from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.common import pack_bits, unpack_bits, unpack_codes
from slimforge.plugins.quantization.weight_only import (
    WeightOnlyQuant,
    WeightOnlyQuantConfig,
    WeightOnlyQuantized,
    execution_order,
)
from slimforge.search.space import FixedSuggester, scoped

TINY_CNN_LAYERS = ("0", "3", "6", "8")  # conv, conv, linear, linear in execution order


def _fixed_weight(shape=(32, 200), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _linear_with(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _save(model, ctx, config, task, path, steps=()):
    plan = Plan(steps=(*steps, PlanStep("weight_only_quant", WeightOnlyQuant.config_to_dict(config))))
    structures = [*([{}] * len(steps)), ctx.structure]
    return save_model(model, path, task=task, plan=plan, structure=structures)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_file_holds_bits_over_8_bytes_per_weight(tmp_path, bits):
    task = tiny_task()
    config = WeightOnlyQuantConfig(bits=dict.fromkeys(TINY_CNN_LAYERS, bits), keep_ends_8bit=False)
    model, ctx = compress(WeightOnlyQuant(), config, task)
    assert ctx.structure["bits"] == dict.fromkeys(TINY_CNN_LAYERS, bits)
    _save(model, ctx, config, task, tmp_path / "m.slim")
    rows = {row["name"]: row for row in describe_artifact(tmp_path / "m.slim")["tensors"]}
    teacher = dict(task.teacher.named_modules())
    for name in TINY_CNN_LAYERS:
        weight = teacher[name].weight
        assert f"{name}.weight" not in rows, "no float copy of a quantized weight in the file"
        assert {k for k in rows if k.startswith(f"{name}.")} == {f"{name}.codes", f"{name}.scale", f"{name}.bias"}
        codes = rows[f"{name}.codes"]
        assert codes["dtype"] == "uint8" and codes["shape"] == [math.ceil(weight.numel() * bits / 8)]
        assert codes["arrays"][0]["raw_bytes"] == math.ceil(weight.numel() * bits / 8)
        # bfloat16-exact scales: the codec stores 2 bytes per output channel, losslessly
        assert rows[f"{name}.scale"]["arrays"][0]["raw_bytes"] == 2 * weight.shape[0]


def test_reconstruction_error_orders_by_bits():
    weight = _fixed_weight()
    for symmetric in (True, False):
        errors = {}
        for bits in (2, 4, 8):
            for method in ("minmax", "mse"):
                layer = WeightOnlyQuantized.from_layer(_linear_with(weight), bits, symmetric, method)
                errors[bits, method] = float(((layer.dequantize() - weight) ** 2).mean() / (weight ** 2).mean())
            # the clip search only ever picks a ratio that lowers a channel's error (1.0 is a candidate)
            assert errors[bits, "mse"] <= errors[bits, "minmax"]
        assert errors[2, "mse"] > errors[4, "mse"] > errors[8, "mse"], errors
        assert errors[8, "mse"] < 1e-4 and errors[4, "mse"] < 2e-2 and errors[2, "mse"] < 0.2, errors


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pruned_zeros_stay_exactly_zero(bits, symmetric):
    weight = _fixed_weight()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    weight = weight * mask
    weight[3] = 0.0  # a fully pruned channel
    layer = WeightOnlyQuantized.from_layer(_linear_with(weight), bits, symmetric, "mse")
    restored = layer.dequantize()
    assert torch.equal(restored[~mask], torch.zeros_like(restored[~mask]))
    assert torch.equal(restored[3], torch.zeros(weight.shape[1]))
    if symmetric:  # one shared zero code in every channel
        codes = unpack_codes(layer.codes, bits, weight.numel()).view(weight.shape)
        assert bool((codes[~mask] == 1 << (bits - 1)).all())


def test_ends_kept_at_8_bits_in_execution_order():
    class Reordered(nn.Module):  # registration order differs from execution order
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.head = nn.Linear(16, 5)
            self.middle = nn.Linear(32, 16)
            self.stem = nn.Conv2d(1, 2, 3)
            self.flatten = nn.Flatten()
            self.squeeze = nn.Linear(200, 32)

        def forward(self, x):
            return self.head(self.middle(self.squeeze(self.flatten(self.stem(x)))))

    model, x = Reordered().eval(), torch.randn(1, 1, 12, 12)
    assert execution_order(model, (x,)) == ["stem", "squeeze", "middle", "head"]
    config = WeightOnlyQuantConfig(bits={"squeeze": 2, "middle": 4, "stem": 2, "head": 2})
    bits = WeightOnlyQuant().resolve_bits(model, config, (x,))
    assert bits == {"stem": 8, "squeeze": 2, "middle": 4, "head": 8}
    assert WeightOnlyQuant().resolve_bits(model, WeightOnlyQuantConfig(bits={"stem": 2, "head": 4},
                                                                       keep_ends_8bit=False), (x,)) == \
        {"stem": 2, "squeeze": 8, "middle": 8, "head": 4}  # unnamed layers take default_bits


def test_split_layer_inherits_bits_of_its_teacher_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 8)), nn.Linear(8, 3)).eval()
    ctx = TechniqueContext(task=None)
    bits = WeightOnlyQuant().resolve_bits(model, WeightOnlyQuantConfig(bits={"1": 2, "gone": 4}),
                                          (torch.randn(1, 8),), ctx)
    assert bits == {"0": 8, "1.0": 2, "1.1": 2, "2": 8}
    assert any("'gone' not found" in note for note in ctx.notes)


def test_suggest_searches_only_middle_layers_when_ends_are_kept():
    task = tiny_task()
    space = FixedSuggester({"weight_only_quant.keep_ends_8bit": True})
    config = WeightOnlyQuant().suggest(scoped(space, "weight_only_quant"), task)
    assert set(config.bits) == {"3", "6"} and set(config.bits.values()) <= {2, 4, 8}
    space = FixedSuggester({"weight_only_quant.keep_ends_8bit": False})
    assert set(WeightOnlyQuant().suggest(scoped(space, "weight_only_quant"), task).bits) == set(TINY_CNN_LAYERS)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_then_quantized_round_trip_is_bitwise(tmp_path, symmetric):
    plugins = Plugins(load_entry_points=False)
    task = tiny_task()
    pruning = plugins.registry.get("magnitude_pruning")
    prune_config = pruning.config_from_dict({"default_sparsity": 0.6})
    model = pruning.apply(copy.deepcopy(task.teacher), prune_config, TechniqueContext(task=task))
    config = WeightOnlyQuantConfig(bits={"3": 2, "6": 4}, symmetric=symmetric)
    ctx = TechniqueContext(task=task)
    model = WeightOnlyQuant().apply(model, config, ctx).eval()
    pruning_step = PlanStep("magnitude_pruning", {"default_sparsity": 0.6})
    _save(model, ctx, config, task, tmp_path / "m.slim", steps=(pruning_step,))
    loaded = load_model(tmp_path / "m.slim", plugins.registry).model
    x = task.split("val")[:][0][:32]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    for name, module in loaded.named_modules():
        if isinstance(module, WeightOnlyQuantized):
            assert torch.equal(module.weight_cache, module.dequantize())  # cache follows the loaded codes
            assert "weight_cache" not in module.state_dict()
    assert (loaded.get_submodule("6").weight_cache == 0).float().mean() == pytest.approx(0.6, abs=0.01)


def test_per_forward_dequantization_matches_cached():
    task = tiny_task()
    config = WeightOnlyQuantConfig(bits={"3": 4, "6": 2})
    cached, _ = compress(WeightOnlyQuant(), config, task)
    per_call, _ = compress(WeightOnlyQuant(), WeightOnlyQuantConfig(bits={"3": 4, "6": 2}, dequantize_once=False),
                           task)
    assert per_call.get_submodule("6").weight_cache is None
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(cached(x), per_call(x))


@pytest.mark.parametrize("bits", range(1, 9))
def test_fast_unpack_matches_common_unpack(bits):
    codes = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).long(), unpack_bits(packed, bits, codes.numel()))


def test_config_validation():
    with pytest.raises(ConfigError, match="bits"):
        WeightOnlyQuantConfig(bits={"fc1": 1})
    with pytest.raises(ConfigError, match="default_bits"):
        WeightOnlyQuantConfig(default_bits=16)
    with pytest.raises(ConfigError, match="scale_method"):
        WeightOnlyQuantConfig(scale_method="percentile")
