"""int8_dynamic: real int8 dynamic Linear modules, packed params stored at 1 byte/weight, bitwise round trip."""

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from slimforge.core.artifact import describe_artifact
from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.quantization.int8_dynamic import Int8Dynamic, Int8DynamicConfig

QSCHEME = {"per_channel": torch.per_channel_affine, "per_tensor": torch.per_tensor_affine}


def _packed(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith("_packed_params._packed_params")}


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_linears_become_int8_dynamic_and_convs_stay_float(granularity):
    task = tiny_task()
    model, ctx = compress(Int8Dynamic(), Int8DynamicConfig(weight_granularity=granularity), task)
    assert [type(m) for m in model if isinstance(m, (nn.Conv2d, DynamicLinear))] == \
        [nn.Conv2d, nn.Conv2d, DynamicLinear, DynamicLinear]
    assert any("2 conv layer(s) stay float32" in note for note in ctx.notes)
    packed = _packed(model)
    assert set(packed) == {"6._packed_params._packed_params", "8._packed_params._packed_params"}
    for weight, bias in packed.values():
        assert weight.dtype == torch.qint8 and weight.qscheme() == QSCHEME[granularity]
        assert bias.dtype == torch.float32
    x = task.split("val")[:][0]
    with torch.inference_mode():
        agreement = (model(x).argmax(1) == task.teacher(x).argmax(1)).float().mean()
    assert agreement >= 0.95


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_artifact_round_trips_packed_params_bitwise(tmp_path, granularity):
    plugins = Plugins(load_entry_points=False)
    task = tiny_task()
    config = Int8DynamicConfig(weight_granularity=granularity)
    model, ctx = compress(Int8Dynamic(), config, task)
    plan = Plan(steps=(PlanStep("int8_dynamic", Int8Dynamic.config_to_dict(config)),))
    save_model(model, tmp_path / "m.slim", task=task, plan=plan, structure=[ctx.structure])
    loaded = load_model(tmp_path / "m.slim", plugins.registry).model
    assert isinstance(loaded.get_submodule("6"), DynamicLinear)
    before, after = _packed(model), _packed(loaded)
    assert before.keys() == after.keys()
    for key, ((w0, b0), (w1, b1)) in ((k, (before[k], after[k])) for k in before):
        assert torch.equal(w0.int_repr(), w1.int_repr()), key
        if granularity == "per_channel":
            assert torch.equal(w0.q_per_channel_scales(), w1.q_per_channel_scales())
            assert torch.equal(w0.q_per_channel_zero_points(), w1.q_per_channel_zero_points())
        else:
            assert w0.q_scale() == w1.q_scale() and w0.q_zero_point() == w1.q_zero_point()
        assert torch.equal(b0, b1)
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    # one byte per Linear weight in the file, before entropy coding
    rows = {row["name"]: row for row in describe_artifact(tmp_path / "m.slim")["tensors"]}
    weight_row = rows["6._packed_params._packed_params[0]"]
    int_repr = next(a for a in weight_row["arrays"] if a["part"] == "int_repr")
    assert int_repr["stored_dtype"] == "int8"
    assert int_repr["raw_bytes"] == task.teacher[6].weight.numel()


def test_composition_rules():
    assert "kmeans_clustering" in Int8Dynamic.cannot_follow
    registry = Plugins(load_entry_points=False).registry
    assert type(registry.get("int8_ptq")).family == Int8Dynamic.family  # never in one plan


def test_config_validation():
    with pytest.raises(ConfigError, match="weight_granularity"):
        Int8DynamicConfig(weight_granularity="per_group")
