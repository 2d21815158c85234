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


# --- every weight site: attention, HF Conv1D, Embedding (tied too), GRU -----------------------------

SEQUENCE = "slimforge.core.testing:"


def _round_trip(tmp_path, task, config, model, ctx):
    plugins = Plugins(load_entry_points=False)
    plan = Plan(steps=(PlanStep("int8_dynamic", Int8Dynamic.config_to_dict(config)),))
    size = save_model(model, tmp_path / "m.slim", task=task, plan=plan, structure=[ctx.structure])
    return load_model(tmp_path / "m.slim", plugins.registry).model, size


def test_torch_transformer_attention_and_ffn_run_on_int8_linears(tmp_path):
    from slimforge.plugins.quantization.int8_sites import Int8Embedding, ProjectedMultiheadAttention

    task = tiny_task(SEQUENCE + "tiny_transformer")
    config = Int8DynamicConfig()
    model, ctx = compress(Int8Dynamic(), config, task)
    layer = model.encoder.layers[0]
    assert isinstance(layer.self_attn, ProjectedMultiheadAttention)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(getattr(layer.self_attn, proj), DynamicLinear)
    assert isinstance(layer.linear1, DynamicLinear) and isinstance(model.embed, Int8Embedding)
    assert any("pos (1x16x32) stays float32" in n for n in ctx.notes)
    assert ctx.structure["attention"] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    loaded, _ = _round_trip(tmp_path, task, config, model, ctx)
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_gpt2_conv1d_quantized_and_tied_table_stored_once(tmp_path):
    pytest.importorskip("transformers")
    from slimforge.plugins.quantization.int8_sites import Int8TiedEmbedding

    task = tiny_task(SEQUENCE + "tiny_gpt2")
    config = Int8DynamicConfig()
    model, ctx = compress(Int8Dynamic(), config, task)
    block = model.transformer.h[0]
    assert all(isinstance(m, DynamicLinear) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    assert isinstance(model.lm_head, DynamicLinear) and isinstance(model.transformer.wte, Int8TiedEmbedding)
    assert ctx.structure["tied"] == {"transformer.wte": "lm_head"}
    assert any("stored once" in n for n in ctx.notes)
    loaded, _ = _round_trip(tmp_path, task, config, model, ctx)
    rows = {row["name"]: row for row in describe_artifact(tmp_path / "m.slim")["tensors"]}
    assert not any(name.startswith("transformer.wte") for name in rows)
    int_repr = next(a for a in rows["lm_head._packed_params._packed_params[0]"]["arrays"] if a["part"] == "int_repr")
    assert int_repr["stored_dtype"] == "int8" and int_repr["raw_bytes"] == 64 * 32
    x = task.split("val")[:][0][:8]
    with torch.inference_mode():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_gru_weights_are_int8_in_the_artifact(tmp_path):
    from torch.ao.nn.quantized.dynamic import GRU as DynamicGRU

    task = tiny_task(SEQUENCE + "tiny_gru")
    config = Int8DynamicConfig(weight_granularity="per_tensor")
    model, ctx = compress(Int8Dynamic(), config, task)
    assert isinstance(model.rnn, DynamicGRU) and ctx.structure["rnn"] == ["rnn"]
    loaded, _ = _round_trip(tmp_path, task, config, model, ctx)
    rows = {row["name"]: row for row in describe_artifact(tmp_path / "m.slim")["tensors"]}
    assert rows["rnn._all_weight_values.0.weight_hh"]["dtype"] == "qint8"
    assert rows["rnn._all_weight_values.0.weight_hh"]["encoding"].startswith("per_tensor_affine")
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_artifacts_from_before_weight_sites_still_load(tmp_path):
    """An int8_dynamic artifact written when only Linear layers were quantized records an empty
    structure; it rebuilds as Linear-only (the Embedding and GRU stay float)."""
    from slimforge.plugins.quantization.int8_dynamic import quantize_linears

    task = tiny_task(SEQUENCE + "tiny_gru")
    config = Int8DynamicConfig()
    legacy = quantize_linears(task.teacher, config.weight_granularity)
    plan = Plan(steps=(PlanStep("int8_dynamic", Int8Dynamic.config_to_dict(config)),))
    save_model(legacy, tmp_path / "old.slim", task=task, plan=plan, structure=[{}])
    loaded = load_model(tmp_path / "old.slim", Plugins(load_entry_points=False).registry).model
    assert type(loaded.rnn) is nn.GRU and type(loaded.embed) is nn.Embedding
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(legacy(x), loaded(x))
