"""``slimforge export``: an artifact as a file a deployment runtime loads, checked and timed there.

Two formats:
- ``onnx``: one self-contained ``.onnx`` file (``torch.onnx.export``, the dynamo exporter, which
  needs ``onnxscript``), batch dimension dynamic, run in onnxruntime;
- ``torch.export``: a ``.pt2`` program (``torch.export.export`` + ``torch.export.save``), loaded
  back with ``torch.export.load`` and run as its ``.module()``.

The artifact is loaded exactly as ``slimforge evaluate`` loads it (``core.compressed.load_model``
with the task its header records), and that loaded model is the reference: the exported file is
loaded back in its runtime and its outputs on real validation inputs are compared with the loaded
model's.  Latency is timed in the runtime with ``core.measure.time_forward`` (same warm-up,
repeats and thread count as the search), at batch 1 and 32, next to slimforge's own model.

int8 models.  torch.ao's int8 modules hold their weights in packed fbgemm objects that neither
exporter can read (``torch.export``: "LinearPackedParamsBase does not have a field with name
'__obj_flatten__'"; the TorchScript ONNX exporter: no converter for ``quantized::linear_dynamic``).
So before export each int8 module is rewritten as its *reference form* (PyTorch's PT2E
representation): the int8 weights as an int8 tensor with their scales, dequantized in the graph
(``quantized_decomposed.dequantize_per_channel``), and every calibrated activation quantization as
a quantize -> dequantize pair with the module's own scale and zero point.  In ONNX these are
QuantizeLinear/DequantizeLinear nodes over int8 initializers (the QDQ format), which onnxruntime
fuses into its int8 kernels (QLinearConv, QGemm, ...): the report lists the kernels onnxruntime
actually chose.  A ``.pt2`` keeps the int8 weights too, but ``torch.export.load`` runs the
quantize/dequantize ops as float32 arithmetic: torch reaches int8 CPU kernels from such a program
only after lowering with inductor, which is not part of this export.  The reference form rounds
like the fbgemm kernels but not bit for bit (fbgemm requantizes in integer arithmetic), so int8
exports are checked against ``INT8_TOLERANCE`` rather than ``FP32_TOLERANCE``.
"""

from __future__ import annotations

import copy
import operator
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimforge.core.compressed import load_model
from slimforge.core.errors import ConfigError, MissingDependencyError, SlimforgeError, UnknownNameError
from slimforge.core.measure import LatencySettings, time_forward
from slimforge.core.outputs import logits_of

FORMATS = {"onnx": ".onnx", "torch.export": ".pt2"}
FP32_TOLERANCE = 1e-5  # float32 kernels in another runtime reorder sums: a few ulps of the logits, never more
# int8: the reference form and the fbgemm kernels may round one activation differently by one step,
# and that step then travels through the layers after it.  Bounded relative to the logits' range.
INT8_TOLERANCE = 0.02  # max |diff| <= 2 % of the reference outputs' range (max - min)
CHECK_EXAMPLES = 256  # validation inputs compared
LATENCY_BATCHES = (1, 32)


class ExportError(SlimforgeError, RuntimeError):
    """The model cannot be exported to the requested format (the message says what and why)."""


@dataclass
class RuntimeLatency:
    batch_size: int
    runtime_ms: float
    slimforge_ms: float  # the loaded artifact in torch, as ``slimforge evaluate`` times it


@dataclass
class ExportReport:
    artifact: str
    format: str
    path: str
    artifact_bytes: int
    export_bytes: int
    int8: bool
    max_abs_diff: float
    tolerance: float
    tolerance_rule: str
    top1_agreement: float
    examples: int
    latency: list[RuntimeLatency]
    runtime: str
    runtime_ops: dict[str, int]
    int8_kernels: dict[str, int]  # the runtime's int8 kernels among runtime_ops (ONNX only)
    latency_method: str
    notes: list[str] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"within_tolerance": self.within_tolerance}


# --- int8 modules -> their reference form --------------------------------------------------------

_QDTYPES = {torch.quint8: (torch.uint8, 0, 255), torch.qint8: (torch.int8, -128, 127)}


def _is_int8(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def is_int8_model(model: nn.Module) -> bool:
    return any(_is_int8(m) for m in model.modules())


def _decomposed():
    """``torch.ops.quantized_decomposed``: PyTorch registers these ops only when their module is imported."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


def _fake_quant(x, scale: float, zero_point: int, dtype):
    """quantize -> dequantize with fixed parameters: QuantizeLinear -> DequantizeLinear in ONNX."""
    storage, qmin, qmax = _QDTYPES[dtype]
    ops = _decomposed()
    q = ops.quantize_per_tensor(x, scale, zero_point, qmin, qmax, storage)
    return ops.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, storage)


class ReferenceQuantize(nn.Module):
    """torch.ao's calibrated ``Quantize`` (or FX's ``quantize_per_tensor``) kept as a pair."""

    def __init__(self, scale: float, zero_point: int, dtype):
        super().__init__()
        self.scale, self.zero_point, self.dtype = float(scale), int(zero_point), dtype

    def forward(self, x):
        return _fake_quant(x, self.scale, self.zero_point, self.dtype)


class Int8Weight(nn.Module):
    """An int8 weight as stored: the integer values, and per-tensor or per-channel scales."""

    def __init__(self, qweight: torch.Tensor):
        super().__init__()
        self.register_buffer("values", qweight.int_repr().clone())
        if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            self.axis = int(qweight.q_per_channel_axis())
            self.register_buffer("scales", qweight.q_per_channel_scales().float().clone())
            self.register_buffer("zero_points", qweight.q_per_channel_zero_points().long().clone())
        else:
            self.axis = None
            self.scale, self.zero_point = float(qweight.q_scale()), int(qweight.q_zero_point())

    def forward(self):
        ops = _decomposed()
        if self.axis is None:
            return ops.dequantize_per_tensor(self.values, self.scale, self.zero_point, -128, 127, torch.int8)
        return ops.dequantize_per_channel(self.values, self.scales, self.zero_points, self.axis, -128, 127, torch.int8)


class ReferenceLayer(nn.Module):
    """A static int8 Linear/Conv (optionally with its fused ReLU), output requantized to the
    module's calibrated scale and zero point, as the int8 kernel does; or, ``dynamic``, torch.ao's
    dynamic Linear: the input quantized with parameters from its own range, output float."""

    def __init__(self, module: nn.Module, *, relu: bool, dynamic: bool = False):
        super().__init__()
        self.weight = Int8Weight(module.weight())
        bias = module.bias()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.relu, self.dynamic = relu, dynamic
        self.conv = None
        if hasattr(module, "stride"):  # a convolution
            if getattr(module, "padding_mode", "zeros") != "zeros":
                raise ExportError(f"int8 {type(module).__name__} with padding_mode={module.padding_mode!r} has no reference form")
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
            self.conv_args = (module.stride, module.padding, module.dilation, module.groups)
        self.out = None if dynamic else (float(module.scale), int(module.zero_point))

    def forward(self, x):
        if self.dynamic:
            x = _dynamic_fake_quant(x)
        w = self.weight()
        y = self.conv(x, w, self.bias, *self.conv_args) if self.conv else F.linear(x, w, self.bias)
        if self.relu:
            y = F.relu(y)
        return y if self.out is None else _fake_quant(y, *self.out, torch.quint8)


def _dynamic_fake_quant(x):
    """What fbgemm's dynamic Linear does to its input: uint8 over the batch's range (with zero in
    it), reduce_range on x86 (0..127), per tensor."""
    qmin, qmax = 0, 127
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((high - low) / (qmax - qmin), min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax).to(torch.int64)
    ops = _decomposed()
    q = ops.quantize_per_tensor.tensor(x, scale, zero_point, qmin, qmax, torch.uint8)
    return ops.dequantize_per_tensor.tensor(q, scale, zero_point, qmin, qmax, torch.uint8)


def _reference_module(module: nn.Module) -> nn.Module:
    from torch.ao.nn import intrinsic, quantized

    qi = intrinsic.quantized
    if isinstance(module, quantized.Quantize):
        return ReferenceQuantize(module.scale.item(), module.zero_point.item(), module.dtype)
    if isinstance(module, quantized.DeQuantize):
        return nn.Identity()
    if isinstance(module, quantized.dynamic.Linear):
        return ReferenceLayer(module, relu=False, dynamic=True)
    if isinstance(module, (qi.LinearReLU, qi.ConvReLU1d, qi.ConvReLU2d, qi.ConvReLU3d)):
        return ReferenceLayer(module, relu=True)
    if isinstance(module, (quantized.Linear, quantized.Conv1d, quantized.Conv2d, quantized.Conv3d)):
        return ReferenceLayer(module, relu=False)
    raise ExportError(f"int8 module {type(module).__module__}.{type(module).__name__} has no reference form for "
                      "export (supported: static and dynamic int8 Linear, static int8 Conv1d/2d/3d with or without ReLU)")


def reference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose torch.ao int8 modules are replaced by their reference form (module
    docstring); a float model comes back unchanged."""
    if not is_int8_model(model):
        return model
    _decomposed()
    model = copy.deepcopy(model)
    if isinstance(model, torch.fx.GraphModule):
        _rewrite_fx_graph(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if _is_int8(module) and not any(name.startswith(done + ".") for done in replaced):
            try:
                replacement = _reference_module(module)
            except ExportError as exc:
                raise ExportError(f"{name}: {exc}") from None
            if not name:  # the model itself is one int8 module
                return replacement.eval()
            model.set_submodule(name, replacement)
            replaced.append(name)
    return model.eval()


def _rewrite_fx_graph(model: torch.fx.GraphModule) -> None:
    """FX-converted int8 graphs quantize with ``torch.quantize_per_tensor`` calls and dequantize with
    ``.dequantize()``: the first becomes a quantize -> dequantize pair, the second nothing (values
    stay float between the reference layers)."""
    graph = model.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            x, scale, zero_point, dtype = node.args
            with graph.inserting_before(node):
                pair = graph.call_function(_fake_quant, (x, float(_attr(model, scale)), int(_attr(model, zero_point)), dtype))
            node.replace_all_uses_with(pair)
            graph.erase_node(node)
        elif node.op == "call_method" and node.target == "dequantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and str(node.target).startswith("quantized."):  # torch.ops.quantized.add, ...
            raise ExportError(f"int8 graph op {node.target} has no reference form for export")
    graph.eliminate_dead_code()
    model.recompile()


def _attr(model: nn.Module, value):
    """The constant a ``get_attr`` node reads (scales and zero points are buffers of the graph)."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return operator.attrgetter(value.target)(model)
    return value


# --- the runtimes ---------------------------------------------------------------------------------

class OnnxRuntimeModel:
    """An onnxruntime session with the call convention ``time_forward`` uses (tensors in, a tensor
    out); the numpy conversions are zero-copy views.  ``kernels`` counts the ops of the graph the
    session runs, after onnxruntime's fusions (which kernels the QDQ pairs became)."""

    def __init__(self, path: Path, threads: int):
        ort = _require("onnxruntime", "ONNX export")
        onnx = _require("onnx", "ONNX export")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # what the search pins, so the numbers compare
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its warning about saving the optimized graph is about that copy, not the export
        with tempfile.TemporaryDirectory(prefix="slimforge-ort-") as tmp:
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")  # written when the session starts
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.kernels: dict[str, int] = {}
            for node in onnx.load(options.optimized_model_filepath).graph.node:
                self.kernels[node.op_type] = self.kernels.get(node.op_type, 0) + 1
        self.input_name = self.session.get_inputs()[0].name

    def eval(self):
        return self

    def __call__(self, x):
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


class _Callable:
    """A loaded program's module for ``time_forward``: torch.export's modules refuse ``.eval()``
    (they have no train mode to leave)."""

    def __init__(self, module):
        self.module = module

    def eval(self):
        return self

    def __call__(self, x):
        return self.module(x)


def _require(module: str, feature: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(module, feature, extra="export") from None


def _tensor_qparams_translations() -> dict:
    """ONNX for quantize/dequantize with *computed* parameters (the dynamic Linear's input):
    onnxscript's own translation accepts only constant zero points."""
    _require("onnxscript", "ONNX export")  # the dynamo exporter translates through it
    from onnxscript import ir
    from onnxscript import opset18 as op

    def quantize(input, scale, zero_point, quant_min, quant_max, dtype):
        return op.QuantizeLinear(input, scale, op.Cast(zero_point, to=ir.DataType.UINT8))

    def dequantize(input, scale, zero_point, quant_min, quant_max, dtype, out_dtype=-1):
        return op.DequantizeLinear(input, scale, op.Cast(zero_point, to=ir.DataType.UINT8))

    ops = _decomposed()
    return {ops.quantize_per_tensor.tensor: quantize, ops.dequantize_per_tensor.tensor: dequantize}


def _export_onnx(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    translations = _tensor_qparams_translations()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["input"], output_names=["output"], verbose=False,
                                    custom_translation_table=translations)
    program.save(str(out), external_data=False)  # one file: its bytes are the deployment's
    # The exporter annotates every node with its Python stack trace and FX provenance: about 20 KB
    # of debugging text (with this machine's source paths) that no runtime reads.
    onnx = _require("onnx", "ONNX export")
    graph = onnx.load(str(out))
    for node in graph.graph.node:
        del node.metadata_props[:]
    onnx.save(graph, str(out))


def _export_program(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))


def _program_ops(program) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            name = str(node.target).removesuffix(".default")
            ops[name] = ops.get(name, 0) + 1
    return ops


class _Logits(nn.Module):
    """The model's class scores as a plain tensor (Hugging Face models return a ModelOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return logits_of(self.model(x))


# --- the command ----------------------------------------------------------------------------------

def export_artifact(path: Path | str, fmt: str, out: Path | str | None = None, *, task, plugins,
                    latency: LatencySettings = LatencySettings(), batches=LATENCY_BATCHES) -> ExportReport:
    """Export the artifact at ``path`` to ``fmt`` (``FORMATS``), load the file back in its runtime,
    compare its outputs with slimforge's loaded model on ``CHECK_EXAMPLES`` validation inputs, and
    time both at each batch size in ``batches``."""
    if fmt not in FORMATS:
        raise UnknownNameError("--format", fmt, FORMATS)
    path = Path(path)
    out = Path(out) if out is not None else path.with_suffix(FORMATS[fmt])
    if out.resolve() == path.resolve():
        raise ConfigError(f"--out: {out} is the artifact itself; choose another path")
    loaded = load_model(path, plugins.registry, task=task).model.eval()
    int8 = is_int8_model(loaded)
    model = _Logits(reference_model(loaded)).eval()
    example = task.example_inputs(max(batches))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = []
    try:
        if fmt == "onnx":
            _export_onnx(model, example, out)
            runtime_model = OnnxRuntimeModel(out, latency.threads)
            runtime = f"onnxruntime {_require('onnxruntime', 'ONNX export').__version__}, CPUExecutionProvider"
        else:
            _export_program(model, example, out)
            program = torch.export.load(str(out))
            runtime_model = _Callable(program.module())
            runtime = f"torch {torch.__version__}, torch.export.load(...).module()"
            if int8:
                notes.append("int8 weights are stored as int8, but torch.export.load runs their quantize/dequantize ops as "
                             "float32 arithmetic: torch's int8 CPU kernels need an inductor lowering this export does not do")
                notes.append("load it with `import torch.ao.quantization.fx._decomposed` first: that import registers the "
                             "quantized_decomposed ops the program calls")
    except SlimforgeError:
        raise
    except Exception as exc:
        raise ExportError(f"{fmt} export of {path.name} failed: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None

    inputs = task.example_inputs(CHECK_EXAMPLES)[0]
    with torch.inference_mode():
        reference = logits_of(loaded(inputs)).float()
        exported = runtime_model(inputs).float()
    if exported.shape != reference.shape:
        raise ExportError(f"exported {fmt} model returns shape {tuple(exported.shape)}, slimforge's {tuple(reference.shape)}")
    diff = float((exported - reference).abs().max())
    top1 = float((exported.argmax(-1) == reference.argmax(-1)).float().mean())
    if int8:
        tolerance = INT8_TOLERANCE * float(reference.max() - reference.min())
        rule = f"int8: {INT8_TOLERANCE:.0%} of the outputs' range ({tolerance:.4g})"
    else:
        tolerance, rule = FP32_TOLERANCE, f"float32: {FP32_TOLERANCE:g}"

    timings, method = [], ""
    for batch in batches:
        x = task.example_inputs(batch)
        ours = plugins.measure_latency(loaded, x, "cpu", latency)  # as the search and `evaluate` time it
        theirs = time_forward(runtime_model, x, "cpu", latency)
        timings.append(RuntimeLatency(batch_size=len(x[0]), runtime_ms=theirs.median_ms, slimforge_ms=ours.median_ms))
        method = theirs.method
    ops = runtime_model.kernels if fmt == "onnx" else _program_ops(program)
    kernels = {op: n for op, n in ops.items() if op in ORT_INT8_KERNELS} if fmt == "onnx" else {}
    if int8 and fmt == "onnx":
        notes.append(_onnx_int8_note(kernels))
    return ExportReport(artifact=str(path), format=fmt, path=str(out), artifact_bytes=os.path.getsize(path),
                        export_bytes=os.path.getsize(out), int8=int8, max_abs_diff=diff, tolerance=tolerance,
                        tolerance_rule=rule, top1_agreement=top1, examples=len(inputs), latency=timings,
                        runtime=runtime, runtime_ops=ops, int8_kernels=kernels, notes=notes,
                        latency_method=f"median of {latency.repeats} after {latency.warmup} warm-up, {method}")


# onnxruntime's int8 kernels, by the op names its QDQ fusion produces on the CPU provider
ORT_INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul", "ConvInteger", "QLinearAdd", "QLinearGlobalAveragePool")


def _onnx_int8_note(kernels: dict[str, int]) -> str:
    if kernels:
        return "onnxruntime runs int8 kernels: " + ", ".join(f"{op} x{n}" for op, n in kernels.items())
    return ("onnxruntime fused none of the QuantizeLinear/DequantizeLinear pairs into an int8 kernel: it dequantizes the int8 "
            "weights and computes in float32")


def format_report(report: ExportReport) -> str:
    """One screen: the file, the check, the latencies."""
    status = "OK" if report.within_tolerance else "OUTSIDE TOLERANCE"
    lines = [f"exported {report.artifact} -> {report.path} ({report.format})",
             f"  bytes:    {report.export_bytes:,} exported ({report.artifact_bytes:,} artifact)"
             + ("; int8 model" if report.int8 else "; float32 model"),
             f"  runtime:  {report.runtime}",
             f"  check:    max |diff| {report.max_abs_diff:.3g} vs slimforge's loaded model on {report.examples} validation "
             f"inputs, tolerance {report.tolerance_rule}: {status}; top-1 agreement {report.top1_agreement:.4f}",
             f"  latency:  {report.latency_method}"]
    for t in report.latency:
        lines.append(f"    batch {t.batch_size:>3}: {t.runtime_ms:8.3f} ms in the runtime, {t.slimforge_ms:8.3f} ms slimforge (torch)")
    top = sorted(report.runtime_ops.items(), key=lambda kv: -kv[1])[:8]
    lines.append("  ops:      " + ", ".join(f"{op} x{n}" for op, n in top))
    lines += [f"  note:     {note}" for note in report.notes]
    return "\n".join(lines)
