"""Honest measurement: metric on held-out data, latency timed on the device, size = file bytes.

``measure_artifact`` is the one place an artifact is measured: it loads the file the way a user
would and measures what it loaded.  Trials, the baseline, ``slimforge evaluate``, ``slimforge
reproduce`` and ``slimforge promote`` all call it.

The default size and latency implementations are registered as the *last* plugins, so another
plugin's ``slimforge_measure_latency`` (e.g. an ONNX Runtime timer) takes precedence.

torch is imported inside the functions that use it: the settings and result types here are read
by the command line while it checks its input, which must answer before torch has loaded.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.core.errors import ConfigError, SlimforgeError
from slimforge.core.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from slimforge.core.manager import Plugins
    from slimforge.core.task import Task


@dataclass(frozen=True)
class LatencySettings:
    batch_size: int = 1
    warmup: int = 20
    repeats: int = 100
    threads: int = 1  # pinned so numbers compare across trials on a shared machine
    # CUDA only: time replays of a captured CUDA graph instead of eager launches.  For a small model
    # at batch 1 the eager forward is mostly kernel-launch overhead, which a deployment serving
    # through graphs does not pay; the number then says what the GPU itself takes.
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"latency {name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"latency warmup: must be >= 0, got {self.warmup}")
        if not isinstance(self.cuda_graph, bool):
            raise ConfigError(f"latency cuda_graph: must be true or false, got {self.cuda_graph!r}")


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    device: str
    method: str


@dataclass
class Measurements:
    """What a trial or a baseline measured.  ``accuracy`` is the task metric on ``split``."""

    accuracy: float
    size_bytes: int
    latency_ms: float
    split: str = "val"
    latency_p90_ms: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class BrokenOutputsError(SlimforgeError, ValueError):
    """A model's outputs on the data it is scored on are unusable: not finite (NaN, inf), or not one
    row per example.  Such a model is never a result: a metric such as accuracy still returns a
    number for NaN logits (argmax picks some class), so without this check a broken model would be
    recorded as complete and could land on the Pareto front."""


def check_outputs(outputs: torch.Tensor, examples: int) -> None:
    """Raise ``BrokenOutputsError`` unless ``outputs`` has one row per example and is finite."""
    import torch

    if outputs.dim() == 0 or outputs.shape[0] != examples:
        raise BrokenOutputsError(f"outputs have shape {list(outputs.shape)} for {examples} examples "
                                 "(one row per example expected)")
    finite = torch.isfinite(outputs.reshape(examples, -1)).all(dim=1)
    if not bool(finite.all()):
        kinds = "/".join(k for k, has in (("NaN", bool(torch.isnan(outputs).any())),
                                           ("inf", bool(torch.isinf(outputs).any()))) if has)
        raise BrokenOutputsError(f"outputs are not finite ({kinds}) for {examples - int(finite.sum())} of "
                                 f"{examples} examples")


def evaluate(model: torch.nn.Module, dataset, metric, device: str = "cpu", batch_size: int = 500) -> float:
    """The task metric of ``model`` on the whole of ``dataset``; ``BrokenOutputsError`` when the
    outputs are non-finite or not one row per example (``check_outputs``)."""
    import torch
    from torch.utils.data import DataLoader

    from slimforge.core.outputs import logits_of  # imports torch: only once a model is scored

    model.eval()
    outputs, targets = [], []
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            outputs.append(logits_of(model(x.to(device))).float().cpu())
            targets.append(y)
    outputs, targets = torch.cat(outputs), torch.cat(targets)
    check_outputs(outputs, len(targets))
    return float(metric(outputs, targets))


def time_forward(model, example_inputs, device: str, settings: LatencySettings) -> LatencyStats:
    """Median wall time of one forward pass after warm-up; CUDA events on GPUs (around graph
    replays with ``settings.cuda_graph``)."""
    import torch

    model.eval()
    inputs = tuple(t.to(device) for t in example_inputs)
    on_gpu = device.startswith("cuda")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.inference_mode():
            for _ in range(settings.warmup):
                model(*inputs)
            if on_gpu and settings.cuda_graph:
                samples = _cuda_event_samples(_captured(model, inputs).replay, settings.repeats)
                method = "cuda-events, cuda-graph replay"
            elif on_gpu:
                samples, method = _cuda_event_samples(lambda: model(*inputs), settings.repeats), "cuda-events"
            else:
                samples, method = _cpu_samples(model, inputs, settings.repeats), f"perf_counter, {settings.threads} thread(s)"
    finally:
        torch.set_num_threads(previous_threads)
    samples.sort()
    decile = max(0, len(samples) // 10)
    return LatencyStats(statistics.median(samples), samples[decile], samples[-1 - decile],
                        settings.repeats, device, method)


def _cpu_samples(model, inputs, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        model(*inputs)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def _cuda_event_samples(forward, repeats: int) -> list[float]:
    """Milliseconds between CUDA events recorded around each call of ``forward``."""
    import torch

    samples = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        forward()
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end))
    return samples


def _captured(model, inputs) -> torch.cuda.CUDAGraph:
    """One forward pass captured as a CUDA graph, to be timed as replays.

    Capture runs on a side stream after a few warm-up passes there (PyTorch's documented recipe:
    lazy initialisations must not happen inside the capture).  A model that cannot be captured
    (host synchronisation, data-dependent shapes) raises: the caller asked for graph timing and
    must not silently get eager numbers under that name."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            model(*inputs)
    except RuntimeError as exc:
        raise ConfigError(f"--latency-cuda-graph: this model cannot be captured as a CUDA graph "
                          f"({str(exc).splitlines()[0]}); time it without --latency-cuda-graph") from exc
    return graph


def latency_lock_path() -> Path:
    """One lock file per user and host: latency is never timed while another slimforge process of
    this user on this host (a worker process, a Ray trial, ``slimforge worker``) is timing.  Local
    on purpose: trials on other hosts do not disturb timing here, and flock over NFS is unreliable."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"slimforge-latency-{uid}.lock"


@contextlib.contextmanager
def file_lock(path: Path | None):
    """Exclusive lock across processes (a no-op without a path)."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure_artifact(path: Path | str, *, task: Task, plugins: Plugins, split: str, device: str = "cpu",
                     latency: LatencySettings = LatencySettings(), latency_lock: Path | None = None) -> Measurements:
    """Load the artifact as a user would, then measure what was loaded: the task metric on
    ``split`` (outputs checked first: ``BrokenOutputsError`` names the plan's last technique), latency under ``latency_lock`` (so concurrent trials never time at once), and the
    file's size through the ``measure_size`` hook."""
    from slimforge.core.compressed import load_model

    loaded = load_model(path, plugins.registry, task=task)
    where = _device_for(loaded.model, device)
    try:
        accuracy = evaluate(loaded.model.to(where), task.split(split), task.metric, device=where)
    except BrokenOutputsError as exc:
        # One line a trial record, the baseline check and `slimforge evaluate` all show as is.
        last = loaded.plan.steps[-1].technique if loaded.plan.steps else None
        by = f"after technique {last!r}" if last else "of the uncompressed model"
        raise BrokenOutputsError(f"the loaded artifact's {exc} on the {split!r} split, {by}; "
                                 "not counted as a result") from None
    with file_lock(latency_lock):
        stats = plugins.measure_latency(loaded.model, task.example_inputs(latency.batch_size), where, latency)
    return Measurements(accuracy=accuracy, size_bytes=plugins.measure_size(path), latency_ms=stats.median_ms,
                        latency_p90_ms=stats.p90_ms, split=split)


def _device_for(model: Any, device: str) -> str:
    # torch.ao int8 modules only have CPU kernels: such a model is measured where it can run.
    if device != "cpu" and any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        return "cpu"
    return device


class DefaultMeasurements:
    """Core implementations of the measurement hooks (registered last)."""

    @hookimpl(trylast=True)
    def slimforge_measure_size(self, path):
        return os.path.getsize(path)

    @hookimpl(trylast=True)
    def slimforge_measure_latency(self, model, example_inputs, device, settings):
        return time_forward(model, example_inputs, device, settings)
