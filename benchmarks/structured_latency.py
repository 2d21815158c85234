"""Structured vs unstructured pruning on the embedded LeNet-5: what each buys in bytes and CPU time.

  dense        - the teacher as it is
  structured   - structured_pruning, 50 % of the channels/neurons of conv1, conv2 and fc1 removed
                 (L1-magnitude criterion, Torch-Pruning): a smaller dense network
  unstructured - magnitude_pruning, 50 % of every weight tensor zeroed: same shapes, sparse file

No fine-tuning: accuracy is the validation metric straight after pruning.  Every number is of the
model loaded back from its artifact (``save_model`` -> ``load_model``), as the search measures it.
Latency is ``core.measure.time_forward`` (median of ``--repeats`` forward passes after warm-up,
1 thread, CPU); the variants are timed interleaved (dense, structured, unstructured, dense, ...)
for ``--rounds`` rounds; each reports the median of its round medians, and "vs dense" is the
median over rounds of its round median divided by dense's in the same round (a paired ratio, so
load from other processes on a shared machine, which drifts between rounds, mostly cancels).

A second table gives the accuracy without fine-tuning of both kinds of pruning at 50 % under each
criterion (magnitude, first-order Taylor, Fisher), i.e. the choice the search makes per family.

    python benchmarks/structured_latency.py --rounds 7 --repeats 300
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, evaluate, time_forward
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.task import load_task
from slimforge.core.technique import TechniqueContext
from slimforge.plugins.pruning.fisher import FisherPruning
from slimforge.plugins.pruning.gradient import GradientPruning
from slimforge.plugins.pruning.magnitude import MagnitudePruning, MagnitudePruningConfig
from slimforge.plugins.pruning.structured import StructuredPruning, StructuredPruningConfig

BATCH_SIZES = (1, 64)


def variants():
    return {
        "dense": None,
        "structured 50% ch (L1)": (StructuredPruning(), StructuredPruningConfig(channel_sparsity=0.5,
                                                                                criterion="magnitude")),
        "unstructured 50% (abs w)": (MagnitudePruning(), MagnitudePruningConfig(default_sparsity=0.5)),
    }


def build(task, step, folder: Path, label: str, registry):
    """Apply ``step`` to a teacher copy, write the artifact, load it back: (loaded model, bytes)."""
    model, structures, steps = copy.deepcopy(task.teacher), [], ()
    if step is not None:
        technique, config = step
        ctx = TechniqueContext(task=task, seed=0)
        model = technique.apply(model, config, ctx)
        structures, steps = [ctx.structure], (PlanStep(technique.name, technique.config_to_dict(config)),)
    path = folder / f"{label.split()[0]}.slim"
    size = save_model(model.eval(), path, task=task, plan=Plan(steps=steps, seed=0), structure=structures)
    return load_model(path, registry).model, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()

    task = load_task()
    registry = Plugins(load_entry_points=False).registry
    val = task.split("val")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, step in variants().items():
            model, size = build(task, step, Path(folder), label, registry)
            params = sum(p.numel() for p in model.parameters())
            nonzero = sum(int((p != 0).sum()) for p in model.parameters())
            rows[label] = {"model": model, "params": params, "nonzero": nonzero, "bytes": size,
                           "acc": evaluate(model, val, task.metric),
                           "ms": {b: [] for b in BATCH_SIZES}}

    settings = LatencySettings(repeats=args.repeats, threads=1)
    inputs = {b: task.example_inputs(b) for b in BATCH_SIZES}
    started = time.perf_counter()
    for _ in range(args.rounds):
        for batch in BATCH_SIZES:
            for row in rows.values():
                row["ms"][batch].append(time_forward(row["model"], inputs[batch], "cpu", settings).median_ms)
    seconds = time.perf_counter() - started

    median = {label: {b: statistics.median(row["ms"][b]) for b in BATCH_SIZES} for label, row in rows.items()}
    dense = rows["dense"]["ms"]
    ratio = {label: {b: statistics.median(v / d for v, d in zip(row["ms"][b], dense[b], strict=True))
                     for b in BATCH_SIZES} for label, row in rows.items()}
    print(f"LeNet-5 teacher (embedded mnist-lenet5), val split {len(val)} digits, no fine-tuning; "
          f"latency: median of {args.rounds} interleaved rounds x {args.repeats} repeats, 1 thread, CPU "
          f"(torch {torch.__version__}, {seconds:.0f} s of timing)\n")
    print("| variant | params | nonzero | artifact bytes | val acc | b1 ms | b1 vs dense | b64 ms | b64 vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        m = median[label]
        print(f"| {label} | {row['params']:,} | {row['nonzero']:,} | {row['bytes']:,} | {row['acc']:.4f} "
              f"| {m[1]:.4f} | {ratio[label][1]:.2f} | {m[64]:.3f} | {ratio[label][64]:.2f} |")
    print("\nval accuracy without fine-tuning, 50 % pruned, by criterion:\n")
    print("| criterion | structured 50% channels | unstructured 50% weights |")
    print("|---|---:|---:|")
    unstructured = {"magnitude": MagnitudePruning(), "taylor": GradientPruning(), "fisher": FisherPruning()}
    for criterion, technique in unstructured.items():
        accs = []
        for step in ((StructuredPruning(), StructuredPruningConfig(channel_sparsity=0.5, criterion=criterion)),
                     (technique, technique.Config(default_sparsity=0.5))):
            model = step[0].apply(copy.deepcopy(task.teacher), step[1], TechniqueContext(task=task, seed=0))
            accs.append(evaluate(model, val, task.metric))
        print(f"| {criterion} | {accs[0]:.4f} | {accs[1]:.4f} |")
    print("\nper-round medians (ms):")
    for label, row in rows.items():
        for batch in BATCH_SIZES:
            print(f"  {label:<24} b{batch:<3} " + " ".join(f"{v:.4f}" for v in row["ms"][batch]))


if __name__ == "__main__":
    main()
