"""int8_ptq: the FX graph where it traces (CNN path unchanged), static int8 layer by layer where it
does not (Hugging Face models) or where FX keeps a module whole (nn.TransformerEncoder), and
notes for every site that gets something else."""

import pytest
import torch
from torch import nn
from torch.ao.quantization import QuantWrapper

from slimforge.core.artifact import describe_artifact
from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.outputs import logits_of
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.testing import compress, tiny_task
from slimforge.plugins.quantization.int8_ptq import Int8PTQ, Int8PTQConfig

SEQUENCE = "slimforge.core.testing:"
CONFIG = Int8PTQConfig(observer="minmax", calibration_batches=2, calibration_batch_size=32)


def _round_trip(tmp_path, task, model, ctx):
    plan = Plan(steps=(PlanStep("int8_ptq", Int8PTQ.config_to_dict(CONFIG)),))
    save_model(model, tmp_path / "m.slim", task=task, plan=plan, structure=[ctx.structure])
    loaded = load_model(tmp_path / "m.slim", Plugins(load_entry_points=False).registry).model
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(logits_of(model(x)), logits_of(loaded(x)))
    return {row["name"]: row for row in describe_artifact(tmp_path / "m.slim")["tensors"]}


def _static_linear(module) -> bool:
    from torch.ao.nn.quantized import Linear as StaticLinear

    return isinstance(module, QuantWrapper) and type(module.module) is StaticLinear


def test_cnn_traces_whole_and_records_nothing_new():
    model, ctx = compress(Int8PTQ(), CONFIG, tiny_task())
    assert ctx.structure == {} and ctx.notes == []
    assert isinstance(model, torch.fx.GraphModule)


def test_untraceable_hf_model_is_quantized_layer_by_layer(tmp_path):
    pytest.importorskip("transformers")
    from slimforge.plugins.quantization.int8_sites import Int8Embedding, Int8TiedEmbedding

    task = tiny_task(SEQUENCE + "tiny_gpt2")
    model, ctx = compress(Int8PTQ(), CONFIG, task)
    assert ctx.structure["fx"] is False
    assert any("torch.fx cannot quantize GPT2LMHeadModel as one graph" in n for n in ctx.notes)
    block = model.transformer.h[0]
    assert all(_static_linear(m) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    assert _static_linear(model.lm_head) and isinstance(model.transformer.wte, Int8TiedEmbedding)
    assert isinstance(model.transformer.wpe, Int8Embedding)
    scale = model.transformer.h[0].attn.c_attn.quant.scale
    assert float(scale) != 1.0  # calibrated, not the observer's placeholder
    rows = _round_trip(tmp_path, task, model, ctx)
    assert rows["lm_head.module._packed_params._packed_params[0]"]["dtype"] == "qint8"
    assert not any(name.startswith("transformer.wte") for name in rows)


def test_layers_inside_modules_fx_keeps_whole_are_quantized(tmp_path):
    task = tiny_task(SEQUENCE + "tiny_transformer")
    model, ctx = compress(Int8PTQ(), CONFIG, task)
    assert ctx.structure["fx"] is True and "encoder.layers.0.self_attn.q_proj" in ctx.structure["static"]
    assert any("torch.fx keeps whole (TransformerEncoder)" in n for n in ctx.notes)
    layer = model.encoder.layers[1]
    assert all(_static_linear(getattr(layer.self_attn, p)) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert _static_linear(layer.linear1) and _static_linear(layer.linear2)
    _round_trip(tmp_path, task, model, ctx)


def test_gru_falls_back_to_dynamic_int8_with_a_note(tmp_path):
    from torch.ao.nn.quantized.dynamic import GRU as DynamicGRU

    task = tiny_task(SEQUENCE + "tiny_gru")
    model, ctx = compress(Int8PTQ(), CONFIG, task)
    assert isinstance(model.rnn, DynamicGRU)
    assert any("no static int8 GRU/LSTM, so dynamic int8" in n for n in ctx.notes)
    rows = _round_trip(tmp_path, task, model, ctx)
    assert rows["rnn._all_weight_values.0.weight_ih"]["dtype"] == "qint8"


def test_quantized_model_stays_close_to_the_teacher():
    for name in ("tiny_bert", "tiny_llama"):
        pytest.importorskip("transformers")
        task = tiny_task(SEQUENCE + name)
        model, _ = compress(Int8PTQ(), CONFIG, task)
        x, y = task.split("test")[:]
        with torch.inference_mode():
            agreement = (logits_of(model(x)).argmax(-1) == y).float().mean()
        assert agreement >= 0.9, name


def test_custom_rnn_is_noted_not_skipped():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.RNN(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    from torch.utils.data import TensorDataset

    from slimforge.core.task import FactoryRef, Task

    teacher = Model().eval()
    data = TensorDataset(torch.randn(64, 3, 4), torch.zeros(64, dtype=torch.long))
    task = Task(name="rnn", architecture=FactoryRef("slimforge.core.testing:tiny_mlp"), teacher_factory=lambda: teacher,
                splits={"train": data, "val": data, "test": data})
    _, ctx = compress(Int8PTQ(), CONFIG, task)
    assert any("rnn (RNN) stays float32" in n for n in ctx.notes)
    assert any("rnn weight(s) stay float32" in n for n in ctx.notes)
