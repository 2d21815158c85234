"""The ``slimforge`` command line: a thin layer over ``slimforge.search.run_search``.

Heavy modules (optuna, mlflow) are imported inside the commands that use them, so ``--help`` and
``plugins list`` stay quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimforge.core.errors import ConfigError, SlimforgeError, UnknownNameError

EXAMPLES = """\
examples:
  slimforge search                                   # embedded MNIST/LeNet-5 task, default budgets-free search
  slimforge search --trials 12 --max-size 150KB --out out/
  slimforge search --max-size 60KB --max-latency 0.5 --max-accuracy-drop 1pt
  slimforge search --config examples/user_task.toml  # your own model, data and metric
  slimforge search --study NAME --trials 30          # resume study NAME up to 30 trials
  slimforge evaluate out/artifacts/<study>/trial-0003.slim
  slimforge plugins list
  slimforge promote --model mnist-lenet5-compressed --policy smallest --min-accuracy 97% --dry-run
  mlflow ui --backend-store-uri sqlite:///mlflow.db  # browse runs and registered models
"""

SEARCH_KEYS = {"trials", "timeout", "seed", "study", "storage", "out", "techniques", "device",
               "disable_plugins", "strict_plugins", "workers", "trial_timeout", "trial_memory_limit",
               "tracking_uri", "tracking", "experiment", "registered_model", "latency_threads",
               "latency_repeats", "latency_batch_size"}
BUDGET_KEYS = {"max_size", "max_latency", "min_accuracy", "max_accuracy_drop"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimforge", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Find the best compressed versions of a PyTorch model under hard size, latency and "
                    "accuracy budgets. Sizes are artifact file bytes; latencies are timed on the device.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    search = sub.add_parser("search", help="run a budgeted compression search",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                            description="Sample compression plans with Optuna, apply, fine-tune, save, and measure the "
                                        "saved artifact. Prints the Pareto table; writes OUT/summary.json.")
    task = search.add_argument_group("task")
    task.add_argument("--task", default=None, help="built-in task: mnist-lenet5 (default, offline), mnist-lenet300, "
                                                   "or torchvision:MODEL:DATASET (resnet18|mobilenet_v3_small, "
                                                   "mnist|fashionmnist|cifar10|fakedata)")
    task.add_argument("--config", type=Path, help="TOML file with [task] (module:function factories), "
                                                  "[budgets] and [search] tables; flags override it")
    task.add_argument("--data-dir", help="torchvision presets: folder holding the dataset (default ./data)")
    task.add_argument("--download", action="store_true", default=None,
                      help="torchvision presets: download the dataset if missing (needs network)")
    task.add_argument("--teacher-epochs", type=int, help="torchvision presets: epochs to train the teacher on first use")
    task.add_argument("--cache-dir", help="where the embedded task caches its trained teacher "
                                          "(default: $SLIMFORGE_CACHE_DIR or ~/.cache/slimforge)")
    budgets = search.add_argument_group("budgets (hard constraints the sampler sees)")
    budgets.add_argument("--max-size", help="artifact size limit: bytes or with a unit, e.g. 150KB, 1.5MB, 60KiB")
    budgets.add_argument("--max-latency", help="median batch latency limit in ms on the target device, e.g. 0.5")
    budgets.add_argument("--min-accuracy", help="validation metric floor: 0.97 or 97%%")
    budgets.add_argument("--max-accuracy-drop", help="allowed drop from the uncompressed model's validation "
                                                     "metric: 1pt (= 1%% = 0.01); the stricter floor wins")
    run = search.add_argument_group("search")
    run.add_argument("--trials", type=int, help="total trials in the study (default 20)")
    run.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    run.add_argument("--techniques", help="comma-separated technique names to search over (default: all; "
                                          "see 'slimforge plugins list')")
    run.add_argument("--disable-plugins", help="comma-separated plugin (entry point) or technique names to leave out")
    run.add_argument("--strict-plugins", action="store_true", default=None,
                     help="fail when a third-party plugin cannot load (default: name it on stderr and skip it)")
    run.add_argument("--seed", type=int, help="sampler and trial seed (default 0)")
    run.add_argument("--study", help="study name; an existing name resumes that study")
    run.add_argument("--storage", help="Optuna storage URL (default: sqlite file OUT/optuna.db)")
    run.add_argument("--out", type=Path, help="output directory (default slimforge-out)")
    run.add_argument("--device", help="cpu (default) or cuda: where training and timing happen")
    run.add_argument("--workers", type=int, help="trials at once, each in a worker process (default 1: in this process)")
    run.add_argument("--trial-timeout", type=float, help="seconds after which a trial is killed and recorded as "
                                                         "failed (runs trials in a worker process)")
    run.add_argument("--trial-memory-limit", help="extra memory a trial may allocate, e.g. 4GB; beyond it the trial "
                                                  "fails with out-of-memory (runs trials in a worker process)")
    run.add_argument("--latency-threads", type=int, help="CPU threads while timing (default 1)")
    run.add_argument("--latency-repeats", type=int, help="timed repeats after warm-up (default 100)")
    run.add_argument("--latency-batch-size", type=int, help="batch size timed (default 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    track = search.add_argument_group("tracking")
    track.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db in the working dir)")
    track.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    track.add_argument("--experiment", help="MLflow experiment name (default slimforge)")
    track.add_argument("--registered-model", help="registered model name for Pareto members (default <task>-compressed)")

    evaluate = sub.add_parser("evaluate", help="load an artifact on its own and measure it on the test split")
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument("--split", default="test", help="split to score (default test)")
    evaluate.add_argument("--config", type=Path, help="task config, when the artifact's task cannot be rebuilt from its header")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a line of text")

    promote = sub.add_parser("promote", help="move the 'champion' alias to a registered version that really wins",
                             description="Re-measure every version of a registered model from the registry (held-out "
                                         "split, file bytes, timed latency) and move the 'champion' alias only if the "
                                         "policy's best version beats the current champion. The decision is recorded.")
    promote.add_argument("--model", required=True, help="registered model name, e.g. mnist-lenet5-compressed")
    promote.add_argument("--policy", default="best-accuracy",
                         help="best-accuracy (highest accuracy within --max-size/--max-latency) or smallest "
                              "(smallest with accuracy >= --min-accuracy); default best-accuracy")
    promote.add_argument("--min-accuracy", help="accuracy floor: 0.97 or 97%%")
    promote.add_argument("--max-size", help="size limit, e.g. 150KB")
    promote.add_argument("--max-latency", help="latency limit in ms")
    promote.add_argument("--split", default="test", help="held-out split to re-measure on (default test)")
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db in the working dir)")
    promote.add_argument("--dry-run", action="store_true", help="show the decision without moving the alias or recording it")

    plugins = sub.add_parser("plugins", help="inspect installed technique plugins")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", metavar="ACTION")
    listing = plugins_sub.add_parser("list", help="every technique with its family, stage and source package")
    listing.add_argument("--strict-plugins", action="store_true", help="fail on a plugin that cannot load")
    listing.add_argument("--disable-plugins", help="comma-separated plugin or technique names to leave out")
    return parser


def _search_settings(args, file_search: dict):
    from slimforge.core.measure import LatencySettings
    from slimforge.search.budgets import parse_size
    from slimforge.search.engine import SearchSettings

    for key in file_search:
        if key not in SEARCH_KEYS:
            raise UnknownNameError("[search] key", key, SEARCH_KEYS)
    merged = dict(file_search)
    for key in SEARCH_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            merged[key] = value
    if args.no_tracking:
        merged["tracking"] = False
    techniques, disabled = (_name_list(merged.get(key)) for key in ("techniques", "disable_plugins"))
    latency = LatencySettings(**{k: merged.pop(f"latency_{k}") for k in ("threads", "repeats", "batch_size")
                                 if f"latency_{k}" in merged})
    kwargs = {"trials": merged.get("trials"), "timeout_s": merged.get("timeout"), "seed": merged.get("seed"),
              "study": merged.get("study"), "storage": merged.get("storage"), "out_dir": merged.get("out"),
              "techniques": techniques or None, "device": merged.get("device"),
              "disabled_plugins": disabled, "strict_plugins": merged.get("strict_plugins"),
              "tracking_uri": merged.get("tracking_uri"), "tracking": merged.get("tracking"),
              "experiment": merged.get("experiment"), "registered_model": merged.get("registered_model"),
              "progress": not args.no_progress, "latency": latency, "workers": merged.get("workers"),
              "trial_timeout_s": merged.get("trial_timeout"),
              "trial_memory_limit": (parse_size(merged["trial_memory_limit"], "--trial-memory-limit")
                                     if merged.get("trial_memory_limit") is not None else None)}
    return SearchSettings(**{k: v for k, v in kwargs.items() if v is not None})


def _task_kwargs(args) -> dict:
    """Keyword arguments for a built-in task factory, from the flags that apply to it."""
    if args.task and args.task.startswith("torchvision:"):
        return {k: v for k, v in {"data_dir": args.data_dir, "download": args.download,
                                  "teacher_epochs": args.teacher_epochs, "device": args.device}.items() if v is not None}
    return {"cache": args.cache_dir} if args.cache_dir else {}


def _name_list(value) -> tuple[str, ...]:
    """``"a, b"`` or ``["a", "b"]`` -> ``("a", "b")``."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def cmd_search(args) -> int:
    from slimforge.core.task import load_task, read_toml, task_from_table
    from slimforge.search.budgets import Budgets
    from slimforge.search.engine import run_search

    file_config = read_toml(args.config) if args.config else {}
    for table in file_config:
        if table not in ("task", "budgets", "search"):
            raise UnknownNameError(f"{args.config} table", table, ["task", "budgets", "search"])
    file_budgets = file_config.get("budgets", {})
    for key in file_budgets:
        if key not in BUDGET_KEYS:
            raise UnknownNameError("[budgets] key", key, BUDGET_KEYS)
    budgets = Budgets.parse(**{k: getattr(args, k) if getattr(args, k) is not None else file_budgets.get(k)
                               for k in BUDGET_KEYS})
    settings = _search_settings(args, file_config.get("search", {}))
    if "task" in file_config:
        if args.task:
            raise ConfigError("--task and a [task] table in --config both name a task; keep one")
        task = task_from_table(file_config["task"], base_dir=args.config.resolve().parent, origin=str(args.config))
    else:
        task = load_task(args.task, **_task_kwargs(args))
    print(f"task {task.name}; budgets: {budgets.describe()}; {settings.trials} trials", file=sys.stderr)
    result = run_search(task, budgets, settings)
    print(format_result(result))
    print(f"\nsummary: {settings.out_dir / 'summary.json'}")
    if settings.tracking:
        print(f"mlflow:  mlflow ui --backend-store-uri {settings.resolved(task).tracking_uri}")
    return 0


def format_result(result) -> str:
    counts = result.counts()
    lines = [f"study {result.study_name}: {len(result.trials)} trials - {counts['complete']} complete, "
             f"{counts['rejected']} rejected before training, {counts['failed']} failed, {counts['feasible']} feasible",
             f"baseline: {result.baseline.accuracy:.4f} val / {result.baseline_test.accuracy:.4f} test, "
             f"{result.baseline.size_bytes / 1000:.1f} KB, {result.baseline.latency_ms:.3f} ms", ""]
    if not result.pareto:
        from slimforge.search.feasibility import describe

        return "\n".join(lines + describe(result.closest_to_feasible()))
    header = f"{'trial':>5}  {'acc val':>7}  {'acc test':>8}  {'KB':>8}  {'ratio':>6}  {'ms':>7}  {'version':>7}  plan"
    lines += ["Pareto front (feasible, validation-selected):", header, "-" * len(header)]
    for r in result.pareto:
        m, t = r.measurements, r.test_measurements
        ratio = result.baseline.size_bytes / m.size_bytes
        version = r.links.get("model_version", "-")
        lines.append(f"{r.number:>5}  {m.accuracy:>7.4f}  {t.accuracy:>8.4f}  {m.size_bytes / 1000:>8.1f}  "
                     f"{ratio:>5.1f}x  {m.latency_ms:>7.3f}  {version!s:>7}  {r.plan_text}")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from slimforge.core.artifact import read_artifact
    from slimforge.core.manager import Plugins
    from slimforge.core.measure import LatencySettings
    from slimforge.core.task import task_from_config, task_from_source
    from slimforge.search.budgets import Budgets
    from slimforge.search.objective import TrialRunner

    if not args.artifact.exists():
        raise ConfigError(f"artifact: file not found: {args.artifact}")
    meta, _ = read_artifact(args.artifact)
    task = task_from_config(args.config) if args.config else task_from_source(meta.get("task", {}))
    plugins = Plugins()
    runner = TrialRunner(task=task, plugins=plugins, budgets=Budgets(), artifact_dir=args.artifact.parent,
                         latency=LatencySettings())
    m = runner.measure(args.artifact, args.split)
    if args.json:
        print(json.dumps(m.to_dict()))
    else:
        print(f"{args.artifact}: {task.metric_name} {m.accuracy:.4f} on {args.split} ({len(task.split(args.split))} examples), "
              f"{m.size_bytes} bytes ({m.size_bytes / 1000:.1f} KB), latency {m.latency_ms:.3f} ms median")
    return 0


def cmd_promote(args) -> int:
    from slimforge.search.budgets import Budgets
    from slimforge.tracking.registry import promote

    limits = Budgets.parse(max_size=args.max_size, max_latency=args.max_latency, min_accuracy=args.min_accuracy)
    uri = args.tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    decision = promote(args.model, args.policy, tracking_uri=uri, min_accuracy=limits.min_accuracy,
                       max_size_bytes=limits.max_size_bytes, max_latency_ms=limits.max_latency_ms, split=args.split,
                       dry_run=args.dry_run, progress=lambda msg: print(msg, file=sys.stderr))
    print(f"{'version':>7}  {'acc':>7}  {'logged acc':>10}  {'bytes':>8}  {'logged bytes':>12}  {'ms':>7}  eligible")
    for c in decision.versions:
        marker = " (champion)" if c.version == decision.champion_before else ""
        print(f"{c.version:>7}  {c.accuracy:>7.4f}  {c.logged.get('accuracy_test', '-')[:10]:>10}  {c.size_bytes:>8}  "
              f"{c.logged.get('size_bytes', '-'):>12}  {c.latency_ms:>7.3f}  {'yes' if c.eligible else 'no: ' + c.why_not}{marker}")
    verb = "PROMOTED" if decision.promoted else "NOT PROMOTED"
    print(f"\n{verb}: {decision.reason}")
    return 0


def cmd_plugins(args) -> int:
    from slimforge.core.manager import Plugins

    plugins = Plugins(strict=args.strict_plugins, disabled=_name_list(args.disable_plugins))
    rows = plugins.plugin_rows()
    columns = ("technique", "family", "stage", "source", "description")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.ljust(widths[c]) for c in columns[:-1]) + "  description")
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns[:-1]) + "  " + row["description"])
    for name, reason in plugins.skipped:
        print(f"skipped plugin {name}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "plugins" and args.plugins_command is None:
        parser.parse_args(["plugins", "--help"])
    handler = {"search": cmd_search, "evaluate": cmd_evaluate, "promote": cmd_promote, "plugins": cmd_plugins}[args.command]
    try:
        return handler(args)
    except SlimforgeError as exc:
        if args.debug:
            raise
        print(f"slimforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimforge: interrupted; finished trials are saved (rerun with --study to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
