"""Deployment export table: fp32 and int8 artifacts exported to ONNX and torch.export.

Rows, each an artifact of the embedded task (``mnist-lenet5``, the cached LeNet-5 teacher):

  fp32           the teacher as an artifact (empty plan)
  int8_ptq       ``int8_ptq`` (static int8, torch.ao FX: int8 Conv and Linear kernels), default config
  int8_dynamic   ``int8_dynamic`` (torch.ao dynamic int8 Linear; convolutions stay float32), default config
  trial N        with ``--run DIR``: every Pareto member in DIR/summary.json (a search's output folder)

Each artifact goes through ``slimforge.app.export.export_artifact`` in both formats, exactly what
``slimforge export`` runs: load as ``slimforge evaluate`` does, export, load the file back in its
runtime, compare the outputs on 256 validation inputs, time the runtime and slimforge's own model
(median of ``--repeats`` after warm-up, 1 thread) at batch 1 and 32.  All rows are one run, so
their latencies compare with each other; on a shared machine they do not compare across runs.
A second table times the fp32, int8_ptq and int8_dynamic ONNX files in onnxruntime in
``--rounds`` interleaved rounds, the fairer comparison under load.

    python benchmarks/export.py                         # fp32, int8_ptq, int8_dynamic
    python benchmarks/export.py --run /tmp/export-run   # and the front of that search
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from slimforge.app.export import FORMATS, ExportError, OnnxRuntimeModel, export_artifact
from slimforge.core.artifact import read_artifact
from slimforge.core.compressed import save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings, time_forward
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.task import load_task, task_from_source
from slimforge.core.technique import TechniqueContext

INT8_TECHNIQUES = ("int8_ptq", "int8_dynamic")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def own_artifacts(task, plugins, out: Path) -> dict[str, Path]:
    """The teacher as fp32, and each int8 technique applied to it, saved as artifacts."""
    paths = {"fp32": out / "fp32.slim"}
    save_model(task.teacher, paths["fp32"], task=task, plan=Plan())
    for name in INT8_TECHNIQUES:
        technique = plugins.registry.get(name)
        config = technique.config_from_dict({})
        ctx = TechniqueContext(task=task)
        model = technique.apply(copy.deepcopy(task.teacher), config, ctx).eval()
        paths[name] = out / f"{name}.slim"
        save_model(model, paths[name], task=task, plan=Plan(steps=(PlanStep(name, technique.config_to_dict(config)),)),
                   structure=[ctx.structure])
    return paths


def front_artifacts(run: Path) -> dict[str, Path]:
    summary = json.loads((run / "summary.json").read_text())
    return {f"trial {m['number']}": Path(m["artifact_path"]) for m in summary["pareto"]}


def interleaved_onnx(task, reports: dict, rounds: int, latency: LatencySettings) -> None:
    """fp32 against int8 in onnxruntime, timed in interleaved rounds (each round times every model
    once at each batch size), so load from other processes falls on all of them alike: the median
    of the round medians."""
    import statistics

    models = {label: OnnxRuntimeModel(Path(r.path), latency.threads) for label, r in reports.items()}
    samples = {(label, b): [] for label in models for b in (1, 32)}
    for _ in range(rounds):
        for label, model in models.items():
            for batch in (1, 32):
                samples[label, batch].append(time_forward(model, task.example_inputs(batch), "cpu", latency).median_ms)
    fp32 = reports["fp32"]
    print(f"\nonnxruntime, fp32 vs int8, {rounds} interleaved rounds of {latency.repeats} repeats (median of round medians):\n")
    print("| model | .onnx bytes | vs fp32 | ms b1 | ms b32 | b32 speed-up vs fp32 | int8 kernels |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base32 = statistics.median(samples["fp32", 32])
    for label, r in reports.items():
        b1, b32 = statistics.median(samples[label, 1]), statistics.median(samples[label, 32])
        kernels = ", ".join(f"{op} x{n}" for op, n in r.int8_kernels.items()) or "-"
        print(f"| {label} | {r.export_bytes:,} | {r.export_bytes / fp32.export_bytes:.2f}x | {b1:.3f} | {b32:.3f} | "
              f"{base32 / b32:.2f}x | {kernels} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a search's output folder: also export its Pareto members")
    parser.add_argument("--out", type=Path, default=Path("benchmarks-out/export"), help="where artifacts and exports go")
    parser.add_argument("--repeats", type=int, default=100, help="timed repeats per latency (median reported)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the onnxruntime int8-vs-fp32 table")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON here")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    plugins = Plugins()
    task = load_task("mnist-lenet5")
    artifacts = own_artifacts(task, plugins, args.out)
    if args.run:
        artifacts |= front_artifacts(args.run)
    latency = LatencySettings(repeats=args.repeats)
    reports, failures = [], []
    for label, path in artifacts.items():
        own_task = task if path.parent == args.out else task_from_source(read_artifact(path)[0]["task"])
        for fmt, suffix in FORMATS.items():
            log(f"{label}: {fmt} ...")
            try:
                report = export_artifact(path, fmt, args.out / f"{path.stem}-{label.replace(' ', '')}{suffix}",
                                         task=own_task, plugins=plugins, latency=latency)
            except ExportError as exc:
                failures.append((label, fmt, str(exc)))
                continue
            reports.append((label, report))

    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"latency: median of {args.repeats} after 20 warm-up, 1 thread\n")
    print("| artifact | artifact B | format | export B | max abs diff | tolerance | top-1 agree | runtime ms b1 | "
          "runtime ms b32 | slimforge ms b1 | slimforge ms b32 | onnxruntime int8 kernels |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, r in reports:
        b1, b32 = r.latency
        kernels = ", ".join(f"{op} x{n}" for op, n in r.int8_kernels.items()) or "-"
        print(f"| {label} | {r.artifact_bytes:,} | {r.format} | {r.export_bytes:,} | {r.max_abs_diff:.2g} | "
              f"{r.tolerance:.2g} | {r.top1_agreement:.4f} | {b1.runtime_ms:.3f} | {b32.runtime_ms:.3f} | "
              f"{b1.slimforge_ms:.3f} | {b32.slimforge_ms:.3f} | {kernels} |")
    for label, fmt, why in failures:
        print(f"\n{label} -> {fmt}: not exported: {why}")
    interleaved_onnx(task, {label: r for label, r in reports if r.format == "onnx" and label in ("fp32", *INT8_TECHNIQUES)},
                     args.rounds, latency)
    if args.json:
        args.json.write_text(json.dumps([{"label": label, **r.to_dict()} for label, r in reports]
                                        + [{"label": label, "format": fmt, "error": why} for label, fmt, why in failures],
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
