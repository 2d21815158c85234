"""GPU check: a packed search on the embedded task, 1 vs several trials sharing one GPU.

Runs where only torch, torchvision and the wheels of slimforge's other dependencies are installed:
no Ray, no MLflow server (tracking is off).  For each packing (trials on the one GPU at once, each
in its own worker process) it runs the same search and prints trials/hour and training epochs/hour.
Then, for the Pareto members of the most packed run, it prints four batch-1 latencies:

- search:    what the trial measured on the validation split, under the latency lock but while
             other trials were training on the same GPU (eager, or graph replays with
             --latency-cuda-graph);
- dedicated: what the search measured for the test split after every trial had ended (the number
             summary.json and the registry report), with nothing else on the GPU, same method;
- eager:     re-timed here, CUDA events around eager forward passes;
- graph:     re-timed here, CUDA events around replays of a captured CUDA graph
             (``--latency-cuda-graph``): what a server using graphs pays, without launch overhead.

int8 techniques are left out: torch.ao's int8 kernels are CPU-only.

    python benchmarks/gpu_search.py --trials 16 --packing 1 4 8
    python benchmarks/gpu_search.py --device cpu --trials 3 --packing 1 2   # dry run of the flow
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimforge.core.compressed import load_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, time_forward
from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.app.api import SearchSettings, run_search
from study_timing import trial_phase_seconds

TECHNIQUES = ("parameter_distillation", "structured_pruning", "magnitude_pruning", "knowledge_distillation",
              "weight_only_quant")
RETIME = LatencySettings(warmup=50, repeats=300)


def retime(model, task, device: str) -> tuple[float, float | None]:
    """Median batch-1 latency in ms, eager and (on CUDA) as graph replays (None if capture fails)."""
    inputs = task.example_inputs(1)
    eager = time_forward(model.to(device), inputs, device, RETIME).median_ms
    if not device.startswith("cuda"):
        return eager, None
    try:
        graph = time_forward(model, inputs, device, dataclasses.replace(RETIME, cuda_graph=True)).median_ms
    except Exception as exc:  # reported, so one model that cannot be captured does not hide the others
        print(f"    graph capture failed: {type(exc).__name__}: {exc}")
        graph = None
    return eager, graph


def repeatability(model, task, rounds: int) -> dict[str, list[float]]:
    """Median batch-1 latency of ``model`` in ``rounds`` back-to-back timings, eager and graph:
    the spread says how far one timing can be trusted on this host."""
    inputs = task.example_inputs(1)
    out = {"eager": [], "graph": []}
    for _ in range(rounds):
        for label in out:
            settings = dataclasses.replace(RETIME, cuda_graph=label == "graph")
            out[label].append(time_forward(model, inputs, "cuda", settings).median_ms)
    for label, values in out.items():
        print(f"  {label:>5}: " + " ".join(f"{v:.4f}" for v in values)
              + f"   max/min {max(values) / min(values):.2f}")
    return out


def write_json(report: dict, path: Path | None) -> None:
    if path:  # after every step, so a run cut short still leaves its numbers
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="trials per packing (default 16)")
    parser.add_argument("--packing", type=int, nargs="+", default=[1, 4, 8], help="trials on the GPU at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run the script")
    parser.add_argument("--search-timeout", type=float, default=150.0,
                        help="wall-time cap per packing in seconds: no trial starts after it (default 150)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="back-to-back timings of the teacher, eager and graph, to show their spread (default 6)")
    parser.add_argument("--latency-cuda-graph", action="store_true",
                        help="the searches time trials as CUDA-graph replays (default: eager)")
    parser.add_argument("--json", type=Path, default=Path(os.environ["OUT"]) / "gpu_search.json" if "OUT" in os.environ
                        else None, help="also write the numbers here (default $OUT/gpu_search.json when $OUT is set)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_search.py: no CUDA device visible to torch")
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__}; {os.cpu_count()} CPU cores")
    task = load_task()
    _ = task.teacher  # train or load the cached teacher before timing anything
    spread = None
    if args.device.startswith("cuda") and args.rounds > 0:
        print(f"\nuncompressed teacher, batch 1: median ms of {RETIME.repeats} passes, {args.rounds} rounds")
        spread = repeatability(task.teacher.to(args.device), task, args.rounds)
    root = Path(tempfile.mkdtemp(prefix="sf-gpu-search-"))
    report: dict = {"device": args.device, "torch": torch.__version__, "runs": [], "repeatability": spread,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    result = None
    print("\ntrials/hour: whole search (baseline, worker start-up and final test measurement included); "
          "steady: first trial start to last trial end")
    print(f"{'trials/GPU':>10} {'trials':>6} {'wall s':>7} {'trials/hour':>11} {'steady/hour':>11} "
          f"{'epochs/hour':>11} {'complete':>8} {'failed':>6} {'median trial s':>14} {'median train s':>14}")
    for packing in args.packing:
        settings = SearchSettings(trials=args.trials, seed=args.seed, device=args.device, workers=packing,
                                  trial_timeout_s=600, timeout_s=args.search_timeout, techniques=TECHNIQUES,
                                  latency=LatencySettings(cuda_graph=args.latency_cuda_graph),
                                  tracking=False, progress=False, out_dir=root / f"pack{packing}",
                                  study=f"gpu-pack{packing}")
        started = time.perf_counter()
        result = run_search(task, Budgets.parse(max_accuracy_drop="2pt"), settings)
        wall = time.perf_counter() - started
        counts = result.counts()
        epochs = sum(len(r.epoch_scores) for r in result.trials)
        durations = [r.duration_s for r in result.trials if r.state == "complete"]
        span = trial_phase_seconds(result)
        steady_rate = 3600 * len(result.trials) / span
        run = {"packing": packing, "trials": len(result.trials), "wall_s": wall, "epochs": epochs,
               "steady_trials_per_hour": steady_rate, "trial_span_s": span,
               "median_training_s": statistics.median([r.training_seconds for r in result.trials] or [0.0]),
               "trials_per_hour": 3600 * len(result.trials) / wall, "epochs_per_hour": 3600 * epochs / wall,
               "counts": counts, "median_trial_s": statistics.median(durations) if durations else None}
        report["runs"].append(run)
        print(f"{packing:>10} {run['trials']:>6} {wall:>7.1f} {run['trials_per_hour']:>11.0f} "
              f"{steady_rate:>11.0f} {run['epochs_per_hour']:>11.0f} {counts['complete']:>8} {counts['failed']:>6} "
              f"{run['median_trial_s'] or float('nan'):>14.2f} {run['median_training_s']:>14.2f}")
        for record in result.trials:
            if record.state == "failed":
                print(f"    trial {record.number} failed: {record.failure_reason}")
        write_json(report, args.json)

    plugins = Plugins()
    baseline = load_model(root / f"pack{args.packing[-1]}" / "baseline.slim", plugins.registry, task=task).model
    base_eager, base_graph = retime(baseline, task, args.device)
    report["baseline"] = {"eager_ms": base_eager, "graph_ms": base_graph}
    print(f"\nuncompressed teacher: eager {base_eager:.4f} ms, graph "
          f"{'-' if base_graph is None else f'{base_graph:.4f}'} ms (batch 1, median of {RETIME.repeats})")
    print(f"Pareto members of the run with {args.packing[-1]} trials/GPU (batch-1 latency in ms)")
    print(f"{'trial':>5} {'val':>6} {'test':>6} {'bytes':>8} {'search':>7} {'dedicated':>9} {'eager':>7} "
          f"{'graph':>7}  plan")
    report["pareto"] = []
    for member in result.pareto:
        model = load_model(member.artifact_path, plugins.registry, task=task).model
        eager, graph = retime(model, task, args.device)
        m, t = member.measurements, member.test_measurements
        report["pareto"].append({"trial": member.number, "val": m.accuracy, "test": t.accuracy, "bytes": m.size_bytes,
                                 "search_ms": m.latency_ms, "dedicated_ms": t.latency_ms, "eager_ms": eager,
                                 "graph_ms": graph, "plan": member.plan_text})
        print(f"{member.number:>5} {m.accuracy:>6.4f} {t.accuracy:>6.4f} {m.size_bytes:>8} {m.latency_ms:>7.4f} "
              f"{t.latency_ms:>9.4f} {eager:>7.4f} {'-' if graph is None else f'{graph:.4f}':>7}  {member.plan_text}")
    write_json(report, args.json)
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
