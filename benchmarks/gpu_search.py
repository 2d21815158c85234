"""GPU check: a packed search on the embedded task, 1 vs several trials per GPU.

Runs where only torch, torchvision and slimforge's other dependency wheels are installed: no Ray,
no MLflow server (tracking is off).  For each packing (trials sharing the one GPU at once, as
worker processes) it prints trials per hour, then the CUDA-event latencies of the Pareto members
of the last run.  int8 techniques are left out: torch.ao's int8 kernels are CPU-only.

    python benchmarks/gpu_search.py --trials 16 --packing 1 4 8

Status: written without a GPU at hand; not yet run (see benchmarks/README.md for results once it is).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.search.engine import SearchSettings, run_search

TECHNIQUES = ("parameter_distillation", "structured_pruning", "magnitude_pruning", "knowledge_distillation",
              "weight_only_quant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--packing", type=int, nargs="+", default=[1, 4, 8], help="trials per GPU at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_search.py: no CUDA device visible to torch")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    task = load_task()
    _ = task.teacher  # train or load the cached teacher before timing anything
    root = Path(tempfile.mkdtemp(prefix="sf-gpu-search-"))
    result = None
    print(f"{'trials/GPU':>10} {'trials':>6} {'wall s':>7} {'trials/hour':>11} {'complete':>8} {'failed':>6}")
    for packing in args.packing:
        settings = SearchSettings(trials=args.trials, seed=args.seed, device="cuda", workers=packing,
                                  trial_timeout_s=1800, techniques=TECHNIQUES, tracking=False, progress=False,
                                  out_dir=root / f"pack{packing}", study=f"gpu-pack{packing}")
        started = time.perf_counter()
        result = run_search(task, Budgets.parse(max_accuracy_drop="2pt"), settings)
        wall = time.perf_counter() - started
        counts = result.counts()
        print(f"{packing:>10} {len(result.trials):>6} {wall:>7.1f} {3600 * len(result.trials) / wall:>11.0f} "
              f"{counts['complete']:>8} {counts['failed']:>6}")
    print("\nPareto members of the last run (latency: CUDA events after warm-up, batch 1, measured one at a time)")
    for member in result.pareto:
        m = member.measurements
        print(f"  trial {member.number:>3}  val {m.accuracy:.4f}  {m.size_bytes:>8} B  {m.latency_ms:.4f} ms  {member.plan_text}")


if __name__ == "__main__":
    main()
