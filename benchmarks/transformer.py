"""Compression table of the embedded sequence task (``text-chargpt``, a character GPT).

Rows, each a plan run by the search's own trial runner (apply -> fine-tune -> save the artifact ->
load it back -> measure the loaded model):

  dense fp32        the teacher as an artifact
  int8              ``int8_dynamic`` alone (torch.ao dynamic int8 Linear kernels)
  sub-int           ``weight_only_quant`` at 4 bits on every layer (no 8-bit ends)
  pruning+sharing   ``magnitude_pruning`` (``--sparsity`` on every layer) -> retrain -> ``kmeans_clustering``
                    (``--kmeans-bits``) -> fine-tune: Deep Compression's pipeline
  distilled         ``parameter_distillation`` (``--width``) + ``knowledge_distillation`` (KL, T=4), fine-tuned
  search            ``run_search`` with at most ``--max-drop`` validation drop and a size budget of
                    dense / ``--size-ratio``; the smallest feasible Pareto member, then its plan re-run
                    with more seeds (``benchmarks/compression.py``'s ``search_rows``); with
                    ``--no-finetune`` the search of one-shot plans only (no trial trains)

Fine-tuned rows report mean +- std over ``--seeds`` seeds; one-shot rows (int8, sub-int) are one
deterministic model.  Columns: artifact bytes, ratio to the dense artifact, val / test next-token
accuracy, and median CPU latency (1 thread) at batch 1 and batch 32, interleaved over rounds across
every timed model so load from other processes hits all alike.  A row whose plan fails is kept with
its failure reason: the table says what does not work yet, it never hides it.

    python benchmarks/transformer.py                             # 3 seeds, 30 search trials
    python benchmarks/transformer.py --quick                     # 1 seed, 1-epoch fine-tuning, 4 trials
    python benchmarks/transformer.py --rows '' --no-finetune --trials 40   # the one-shot search row alone
    python benchmarks/transformer.py --task text-chargpt-tiny --quick   # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from compression import Row, interleaved_latency, search_rows

from slimforge.core.compressed import save_model
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.task import load_task
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.records import COMPLETE

SEARCH_TECHNIQUES = ("magnitude_pruning", "nm_sparsity", "kmeans_clustering", "weight_only_quant", "int8_dynamic",
                     "parameter_distillation", "knowledge_distillation")
ROW_ORDER = ("dense", "int8", "subint", "prune_share", "distilled", "search", "search_seeds")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plans(args, seed: int) -> dict[str, Plan]:
    """The hand-set plans of the table, for one fine-tuning seed."""
    return {
        "int8": Plan(steps=(PlanStep("int8_dynamic", {}),), seed=seed),
        "subint": Plan(steps=(PlanStep("weight_only_quant", {"default_bits": 4, "keep_ends_8bit": False}),), seed=seed),
        "prune_share": Plan(steps=(PlanStep("magnitude_pruning", {"default_sparsity": args.sparsity}),
                                   PlanStep("kmeans_clustering", {"fc_bits": args.kmeans_bits})),
                            recovery=Recovery(epochs=args.epochs, lr=args.lr, before_sharing_epochs=args.epochs),
                            seed=seed),
        "distilled": Plan(steps=(PlanStep("parameter_distillation", {"width": args.width}),
                                 PlanStep("knowledge_distillation", {"alpha": 0.1, "temperature": 4.0, "term": "kl"})),
                          recovery=Recovery(epochs=args.student_epochs, lr=args.lr), seed=seed),
    }


LABELS = {"dense": "dense fp32", "int8": "int8 (int8_dynamic)", "subint": "sub-int (weight_only_quant 4 bit)",
          "prune_share": "pruning + sharing (magnitude -> k-means)", "distilled": "distilled student (param + KD)"}


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, Row], dense_bytes: int) -> str:
    header = ["method", "bytes", "ratio", "val acc %", "test acc %", "ms b=1", "ms b=32", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ROW_ORDER:
        row = rows.get(name)
        if row is None:
            continue
        if not row.sizes:  # failed, or no feasible search trial: the reason instead of numbers
            lines.append(f"| {row.method} | {row.note} |" + " |" * (len(header) - 2))
            continue
        size = statistics.mean(row.sizes)
        spread = f" ± {statistics.stdev(row.sizes):,.0f}" if len(row.sizes) > 1 else ""
        b1 = f"{row.latency_ms:.3f}" if row.latency_ms is not None else "-"
        b32 = f"{row.latency_b32_ms:.3f}" if getattr(row, "latency_b32_ms", None) is not None else "-"
        lines.append(f"| {row.method} | {size:,.0f}{spread} | {dense_bytes / size:.1f}x | "
                     f"{mean_std(row.val_accuracies, 100)} | {mean_std(row.accuracies, 100)} | {b1} | {b32} | "
                     f"{len(row.sizes)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="text-chargpt", help="text-chargpt (default) or text-chargpt-tiny (smoke run)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per fine-tuned row (default 3)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of pruning+sharing (each phase)")
    parser.add_argument("--student-epochs", type=int, default=6, help="fine-tuning epochs of the distilled student")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sparsity", type=float, default=0.8, help="magnitude pruning: fraction of zeros per layer")
    parser.add_argument("--kmeans-bits", type=int, default=5, help="k-means code width of Linear layers")
    parser.add_argument("--width", type=float, default=0.5, help="parameter_distillation width")
    parser.add_argument("--trials", type=int, default=30, help="search trials; 0 skips the search row")
    parser.add_argument("--size-ratio", type=int, default=8, help="search size budget: dense bytes / this (default 8)")
    parser.add_argument("--max-drop", default="1pt", help="search accuracy budget (validation), default 1pt")
    parser.add_argument("--techniques", default=None,
                        help=f"techniques the search may use (default {','.join(SEARCH_TECHNIQUES)}; with "
                             "--no-finetune every one-shot technique)")
    parser.add_argument("--no-finetune", action="store_true",
                        help="the search row without fine-tuning: one-shot plans (gptq, awq, sparsegpt, wanda, "
                             "weight-only, int8), each trial seconds")
    parser.add_argument("--rows", default="int8,subint,prune_share,distilled",
                        help="hand-set rows to run (comma-separated; dense always runs)")
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 1-epoch fine-tuning (2 for the student), 4 search trials, 2 latency rounds")
    parser.add_argument("--out", type=Path, default=Path("/tmp/slimforge-transformer-bench"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.student_epochs, args.latency_rounds = 1, 1, 2, 2
        args.trials = min(args.trials, 4)
        args.latency_repeats = min(args.latency_repeats, 20)
    if args.seeds < 1:
        parser.error("--seeds: must be >= 1")
    if args.techniques is None and not args.no_finetune:
        args.techniques = ",".join(SEARCH_TECHNIQUES)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in LABELS or r == "dense"]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; valid choices: int8, subint, prune_share, distilled")

    started = time.perf_counter()
    plugins = Plugins()
    task = load_task(args.task)
    out = args.out / args.task
    out.mkdir(parents=True, exist_ok=True)
    runner = TrialRunner(task=task, plugins=plugins, budgets=Budgets(), artifact_dir=out)
    params = sum(p.numel() for p in task.teacher.parameters())
    rows: dict[str, Row] = {"dense": Row(LABELS["dense"])}
    dense_bytes = save_model(task.teacher, out / "dense.slim", task=task, plan=Plan())
    rows["dense"].add(runner, out / "dense.slim")
    log(f"dense: {params:,} parameters, {dense_bytes} B, val {rows['dense'].val_accuracies[0]:.4f} "
        f"test {rows['dense'].accuracies[0]:.4f}")
    details, number = [], iter(range(10_000))
    for name in wanted:
        rows[name] = Row(LABELS[name])
        one_shot = name in ("int8", "subint")  # no fine-tuning: every seed gives the same model
        for seed in range(1 if one_shot else args.seeds):
            plan = plans(args, seed)[name]
            row_started = time.perf_counter()
            record = runner.run(plan, next(number))
            if record.state != COMPLETE:  # a failed trial may still have written its artifact
                rows[name].note = f"failed: {record.failure_reason or record.state}"
                log(f"{name} seed {seed}: {rows[name].note}")
                break
            rows[name].add(runner, record.artifact_path)
            log(f"{name} seed {seed}: {rows[name].sizes[-1]} B, val {rows[name].val_accuracies[-1]:.4f} "
                f"test {rows[name].accuracies[-1]:.4f} ({time.perf_counter() - row_started:.0f} s)")
        if not rows[name].note:
            rows[name].note = f"plan: {Plan.from_dict(record.plan).describe()}"
        skipped = [n for n in record.notes if not n.startswith("retrained") and "Traceback" not in n]
        if skipped:
            details.append(f"{name}: {len(skipped)} note(s), first: {skipped[0][:200]}")
    if args.trials:
        # compression.search_rows reads these settings off ``args`` and keys its output folder.
        search_rows(args.task, task, runner, plugins, dense_bytes, list(range(args.seeds)), args, rows, details)
        if "search" not in rows:
            rows["search"] = Row("search", note=f"no feasible trial in {args.trials} (see below)")
        for key in ("search", "search_seeds"):
            if key in rows:
                rows[key].method = {"search": f"search best at <= {args.max_drop} drop",
                                    "search_seeds": f"search best, its plan, {args.seeds} seeds"}[key]

    timed = [row.timed for row in rows.values() if row.timed]
    for batch, attr in ((1, "latency_ms"), (32, "latency_b32_ms")):
        latency = interleaved_latency(timed, plugins.registry, task.example_inputs(batch), args.latency_rounds,
                                      args.latency_repeats)
        for row in rows.values():
            setattr(row, attr, latency.get(row.timed))

    print(table(rows, dense_bytes))
    print()
    print(f"task {args.task}: {params:,} parameters; dense artifact {dense_bytes:,} B; "
          f"{len(task.split('val'))} val / {len(task.split('test'))} test windows of "
          f"{task.split('val').tensors[0].shape[1]} characters")
    for name in ROW_ORDER:
        row = rows.get(name)
        if row is not None and row.note:
            print(f"  {row.method}: {row.note}")
    for line in details:
        print(f"  {line}")
    print(f"\nfine-tuning: {args.epochs} epoch(s) per phase at lr {args.lr:g} (student {args.student_epochs}); seeds "
          f"{args.seeds}; search trials {args.trials}; latency: 1 thread, {args.latency_rounds} interleaved rounds x "
          f"{args.latency_repeats} repeats; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
