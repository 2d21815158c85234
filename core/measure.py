"""Honest measurement: metric on held-out data, latency timed on the device, size = file bytes.

The default size and latency implementations are registered as the *last* plugins, so another
plugin's ``slimforge_measure_latency`` (e.g. an ONNX Runtime timer) takes precedence.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.outputs import logits_of


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


def evaluate(model: torch.nn.Module, dataset, metric, device: str = "cpu", batch_size: int = 500) -> float:
    """The task metric of ``model`` on the whole of ``dataset``."""
    model.eval()
    outputs, targets = [], []
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            outputs.append(logits_of(model(x.to(device))).float().cpu())
            targets.append(y)
    return float(metric(torch.cat(outputs), torch.cat(targets)))


def time_forward(model, example_inputs, device: str, settings: LatencySettings) -> LatencyStats:
    """Median wall time of one forward pass after warm-up; CUDA events on GPUs (around graph
    replays with ``settings.cuda_graph``)."""
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


class DefaultMeasurements:
    """Core implementations of the measurement hooks (registered last)."""

    @hookimpl(trylast=True)
    def slimforge_measure_size(self, path):
        return os.path.getsize(path)

    @hookimpl(trylast=True)
    def slimforge_measure_latency(self, model, example_inputs, device, settings):
        return time_forward(model, example_inputs, device, settings)
