"""slimforge export: the exported file loads in its own runtime and computes what slimforge's model
computes; int8 models keep int8 weights and reach onnxruntime's int8 kernels."""

from __future__ import annotations

import copy
import json

import pytest
import sf_testing_models
import torch

from slimforge.app import export as export_module
from slimforge.app.cli import main
from slimforge.app.export import ExportError, export_artifact, reference_model
from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

QUICK = LatencySettings(warmup=1, repeats=3)


@pytest.fixture(scope="module")
def plugins():
    return Plugins(load_entry_points=False)


def _artifact(tmp_path, plugins, technique: str | None):
    """The tiny task's trained CNN, as is or with one int8 technique (default config), saved."""
    task = sf_testing_models.tiny_task()
    model, plan, structure = task.teacher, Plan(), None
    if technique:
        t = plugins.registry.get(technique)
        config, ctx = t.config_from_dict({}), TechniqueContext(task=task)
        model = t.apply(copy.deepcopy(task.teacher), config, ctx).eval()
        plan, structure = Plan(steps=(PlanStep(technique, t.config_to_dict(config)),)), [ctx.structure]
    path = tmp_path / f"{technique or 'fp32'}.slim"
    save_model(model, path, task=task, plan=plan, structure=structure)
    return path, task


def _loaded(path, plugins, task):
    return load_model(path, plugins.registry, task=task).model


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, plugins):
    """(artifact, task, report) of the float32 artifact exported to ONNX, shared: an ONNX export takes seconds."""
    tmp_path = tmp_path_factory.mktemp("fp32")
    path, task = _artifact(tmp_path, plugins, None)
    return path, task, export_artifact(path, "onnx", tmp_path / "m.onnx", task=task, plugins=plugins, latency=QUICK)


def test_fp32_onnx_loads_in_onnxruntime_and_matches(fp32_onnx, plugins):
    path, task, report = fp32_onnx
    assert report.export_bytes == path.with_name("m.onnx").stat().st_size
    assert not report.int8 and report.tolerance == 1e-5 and report.within_tolerance
    assert [t.batch_size for t in report.latency] == [1, 32]
    assert all(t.runtime_ms > 0 and t.slimforge_ms > 0 for t in report.latency)
    # an onnxruntime session of its own, as a deployment opens it
    session = onnxruntime.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    x = task.example_inputs(7)[0]  # a batch size the export never saw: the batch dimension is dynamic
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        expected = _loaded(path, plugins, task)(x).numpy()
    assert out.shape == expected.shape and abs(out - expected).max() <= 1e-5


def test_fp32_torch_export_loads_back_and_matches(tmp_path, plugins):
    path, task = _artifact(tmp_path, plugins, None)
    report = export_artifact(path, "torch.export", None, task=task, plugins=plugins, latency=QUICK)
    assert report.path == str(path.with_suffix(".pt2")) and report.within_tolerance
    x = task.example_inputs(5)[0]
    with torch.inference_mode():
        assert torch.allclose(torch.export.load(report.path).module()(x), _loaded(path, plugins, task)(x), atol=1e-5)


def test_int8_ptq_onnx_runs_int8_kernels_and_is_smaller(tmp_path, plugins, fp32_onnx):
    _, task, dense = fp32_onnx
    int8, _ = _artifact(tmp_path, plugins, "int8_ptq")
    report = export_artifact(int8, "onnx", tmp_path / "int8.onnx", task=task, plugins=plugins, latency=QUICK)
    assert report.int8 and report.within_tolerance and report.top1_agreement >= 0.95
    assert report.int8_kernels.get("QLinearConv") == 1 and report.int8_kernels.get("QGemm") == 2, report.runtime_ops
    import onnx

    initializers = {i.name: i.data_type for i in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer}
    assert onnx.TensorProto.INT8 in initializers.values()
    # 10k weights: int8 is a quarter of float32, the graph itself a few KB in both
    assert report.export_bytes < 0.5 * dense.export_bytes, (report.export_bytes, dense.export_bytes)


def test_int8_dynamic_torch_export_keeps_int8_weights(tmp_path, plugins):
    path, task = _artifact(tmp_path, plugins, "int8_dynamic")
    report = export_artifact(path, "torch.export", tmp_path / "d.pt2", task=task, plugins=plugins, latency=QUICK)
    assert report.int8 and report.within_tolerance
    assert report.runtime_ops["quantized_decomposed.dequantize_per_channel"] == 2  # fc1, fc2
    program = torch.export.load(str(tmp_path / "d.pt2"))
    int8 = [t for t in program.state_dict.values() if t.dtype == torch.int8] + \
           [t for t in program.constants.values() if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    assert sum(t.numel() for t in int8) == 8 * 6 * 6 * 32 + 32 * 4


def test_int8_reference_form_matches_the_int8_kernels(tmp_path, plugins):
    """The reference form is what both formats export: it rounds as fbgemm does, within the int8
    tolerance, and leaves no torch.ao module behind."""
    path, task = _artifact(tmp_path, plugins, "int8_ptq")
    model = _loaded(path, plugins, task)
    reference = reference_model(model)
    assert not export_module.is_int8_model(reference)
    x = task.example_inputs(128)[0]
    with torch.inference_mode():
        ours, ref = model(x), reference(x)
    assert float((ours - ref).abs().max()) <= export_module.INT8_TOLERANCE * float(ours.max() - ours.min())


def test_an_int8_module_without_reference_form_is_named(plugins):
    from torch.ao.nn.quantized import Embedding

    model = torch.nn.Sequential(Embedding(10, 4))
    with pytest.raises(ExportError, match=r"^0: int8 module torch\.ao\.nn\.quantized\.modules\.embedding_ops\.Embedding "
                                          r"has no reference form"):
        reference_model(model)


def test_an_int8_graph_op_without_reference_form_is_named():
    from torch.ao.nn.quantized import Quantize

    class Residual(torch.nn.Module):  # what FX conversion leaves for a residual add of int8 tensors
        def __init__(self):
            super().__init__()
            self.quant = Quantize(0.1, 0, torch.quint8)

        def forward(self, x):
            q = self.quant(x)
            return torch.ops.quantized.add(q, q, 0.2, 0)

    with pytest.raises(ExportError, match=r"^int8 graph op quantized\.add has no reference form"):
        reference_model(torch.fx.symbolic_trace(Residual()))


def test_cli_export_prints_the_report_and_json(tmp_path, plugins, capsys):
    path, _ = _artifact(tmp_path, plugins, None)
    assert main(["export", str(path), "--format", "torch.export"]) == 0
    out = capsys.readouterr().out
    assert f"-> {path.with_suffix('.pt2')} (torch.export)" in out and "batch  32:" in out and ": OK;" in out
    assert main(["export", str(path), "--format", "torch.export", "--out", str(tmp_path / "x.pt2"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "torch.export" and data["within_tolerance"] and data["export_bytes"] > 0


def test_cli_export_exits_1_outside_the_tolerance(tmp_path, plugins, capsys, monkeypatch):
    """The check can fail: onnxruntime's float32 kernels differ from torch's by a few ulps, so a
    zero tolerance is broken and the command says so (the file is still written)."""
    path, _ = _artifact(tmp_path, plugins, None)
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", 0.0)
    assert main(["export", str(path), "--format", "onnx"]) == 1
    assert "tolerance float32: 0: OUTSIDE TOLERANCE" in capsys.readouterr().out
    assert path.with_suffix(".onnx").stat().st_size > 0


def test_cli_export_bad_input_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.slim"), "--format", "onnx"]) == 2
    assert capsys.readouterr().err == f"slimforge: error: artifact: file not found: {tmp_path / 'none.slim'}\n"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "none.slim"), "--format", "tflite"])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite' (choose from 'onnx', 'torch.export')" in capsys.readouterr().err
