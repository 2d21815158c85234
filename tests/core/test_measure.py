"""Latency settings and CPU timing.  The CUDA paths (events, graph replay) need a GPU and are
exercised by benchmarks/gpu_search.py, whose results are recorded in benchmarks/README.md."""

from __future__ import annotations

import pytest
import torch

from slimforge.core.errors import ConfigError
from slimforge.core.measure import LatencySettings, time_forward


@pytest.mark.parametrize("field, value, message", [
    ("repeats", 0, "latency repeats: must be >= 1"),
    ("warmup", -1, "latency warmup: must be >= 0"),
    ("cuda_graph", "yes", "latency cuda_graph: must be true or false"),
])
def test_bad_latency_settings_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LatencySettings(**{field: value})


def test_cpu_timing_reports_its_method_and_restores_threads():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    threads = torch.get_num_threads()
    stats = time_forward(model, (torch.zeros(1, 8),), "cpu", LatencySettings(warmup=2, repeats=5))
    assert stats.repeats == 5 and stats.device == "cpu"
    assert stats.method == "perf_counter, 1 thread(s)"
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == threads


def test_cpu_timing_ignores_the_cuda_graph_setting():
    # The search refuses --latency-cuda-graph without --device cuda (tests/test_bad_input.py); the
    # timing function itself times eagerly on the CPU, since there is no graph to capture there.
    stats = time_forward(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), "cpu",
                         LatencySettings(warmup=0, repeats=3, cuda_graph=True))
    assert stats.method.startswith("perf_counter")
