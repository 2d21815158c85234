"""The ``slimforge`` command line: a thin layer over ``slimforge.app.api.run_search``.

Input is checked before anything heavy loads: the settings and budgets (``search.settings``,
``search.budgets``) import no torch, so a bad flag value is answered in well under a second.
Heavy modules (torch, optuna, mlflow) are imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimforge import __version__
from slimforge.core.errors import ConfigError, SlimforgeError, UnknownNameError

EXAMPLES = """\
examples:
  slimforge search                                   # embedded MNIST/LeNet-5 task, default budgets-free search
  slimforge search --trials 12 --max-size 150KB --out out/
  slimforge search --max-size 60KB --max-latency 0.5 --max-accuracy-drop 1pt
  slimforge search --config examples/user_task.toml  # your own model, data and metric
  slimforge search --task text-chargpt --trials 20   # embedded character GPT (next-token accuracy)
  slimforge search --config examples/hf_task.toml    # a Hugging Face save_pretrained folder
  slimforge search --study NAME --trials 30          # resume study NAME up to 30 trials
  slimforge search --backend ray --cpus-per-trial 2  # trials as Ray Tune trials (pip install 'slimforge[ray]')
  slimforge worker --storage postgresql://host/db --study NAME   # join search NAME from another host
  slimforge evaluate out/artifacts/<study>/trial-0003.slim
  slimforge export out/artifacts/<study>/trial-0003.slim --format onnx   # checked and timed in onnxruntime
  slimforge plugins list
  slimforge promote --model mnist-lenet5-compressed --policy smallest --min-accuracy 97% --dry-run
  slimforge sync --out out/                          # replay MLflow records kept while the server was down
  mlflow ui --backend-store-uri sqlite:///mlflow.db  # browse runs and registered models
"""

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in slimforge's one-line form (argparse prints the whole usage
    block first); exit code 2 as before.  Subcommand parsers inherit this class."""

    def error(self, message: str):
        self.exit(2, f"slimforge: error: {message} (see '{self.prog} --help')\n")


def _plugin_flags(parser) -> None:
    parser.add_argument("--strict-plugins", action="store_true", help="fail on a plugin that cannot load")
    parser.add_argument("--disable-plugins", help="comma-separated plugin or technique names to leave out")


def _plugins(args):
    """The process's plugins, built once from the command's plugin flags."""
    from slimforge.app.api import make_plugins

    return make_plugins(strict=args.strict_plugins, disabled=_name_list(args.disable_plugins))


def build_parser() -> argparse.ArgumentParser:
    from slimforge.search.budgets import budget_fields
    from slimforge.search.settings import TRACKING_URI_HELP, add_arguments

    parser = _Parser(
        prog="slimforge", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Find the best compressed versions of a PyTorch model under hard size, latency and "
                    "accuracy budgets. Sizes are artifact file bytes; latencies are timed on the device.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"slimforge {__version__}",
                        help="print slimforge's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    search = sub.add_parser("search", help="run a budgeted compression search",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                            description="Sample compression plans with Optuna, apply, fine-tune, save, and measure the "
                                        "saved artifact. Prints the Pareto table; writes OUT/summary.json.")
    task = search.add_argument_group("task")
    task.add_argument("--task", default=None, help="built-in task: mnist-lenet5 (default, offline), mnist-lenet300, "
                                                   "text-chargpt (a character GPT on Python's own docs, offline; "
                                                   "text-chargpt-tiny: its smoke-test size), "
                                                   "or torchvision:MODEL:DATASET (resnet18|mobilenet_v3_small, "
                                                   "mnist|fashionmnist|cifar10|fakedata)")
    task.add_argument("--config", type=Path, help="TOML file with [task] (module:function factories, or hf_model + "
                                                  "hf_class for a Hugging Face save_pretrained folder), "
                                                  "[budgets] and [search] tables; flags override it")
    task.add_argument("--data-dir", help="torchvision presets: folder holding the dataset (default ./data)")
    task.add_argument("--download", action="store_true", default=None,
                      help="torchvision presets: download the dataset if missing (needs network)")
    task.add_argument("--teacher-epochs", type=int, help="torchvision presets: epochs to train the teacher on first use")
    task.add_argument("--cache-dir", help="where the embedded tasks cache their trained teachers "
                                          "(default: $SLIMFORGE_CACHE_DIR or ~/.cache/slimforge)")
    budgets = search.add_argument_group("budgets (hard constraints the sampler sees)")
    for _, meta in budget_fields():
        budgets.add_argument(meta["flag"], help=meta["help"].replace("%", "%%"))
    add_arguments(search)  # every SearchSettings field, in its group

    evaluate = sub.add_parser("evaluate", help="load an artifact on its own and measure it on the test split")
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument("--split", default="test", help="split to score (default test)")
    evaluate.add_argument("--config", type=Path, help="task config, when the artifact's task cannot be rebuilt from its header")
    evaluate.add_argument("--trust", action="store_true",
                          help="call the factories the artifact's header names even though this account has not "
                               "trusted them yet (only for files whose origin you trust: it runs their code)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a line of text")
    _plugin_flags(evaluate)

    export = sub.add_parser("export", help="export an artifact for a runtime (ONNX, torch.export), checked and timed there",
                            description="Load the artifact as 'evaluate' does, export it, load the file back in its runtime "
                                        "(onnxruntime, or torch.export.load), compare its outputs with slimforge's model on "
                                        "validation inputs (1e-5 for float32, 2% of the outputs' range for int8) and time "
                                        "both at batch 1 and 32. int8 models keep int8 weights (ONNX: QuantizeLinear/"
                                        "DequantizeLinear; onnxruntime fuses static int8 into its int8 kernels, and the "
                                        "report names the kernels it ran). Exit 1 when the "
                                        "outputs differ by more than the tolerance. Needs pip install 'slimforge[export]'.")
    export.add_argument("artifact", type=Path)
    export.add_argument("--format", required=True, choices=("onnx", "torch.export"), help="onnx (.onnx) or torch.export (.pt2)")
    export.add_argument("--out", type=Path, help="output file (default: the artifact's path with .onnx or .pt2)")
    export.add_argument("--config", type=Path, help="task config, when the artifact's task cannot be rebuilt from its header")
    export.add_argument("--trust", action="store_true", help="as for evaluate: call the factories the header names")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    _plugin_flags(export)

    promote = sub.add_parser("promote", help="move the 'champion' alias to a registered version that really wins",
                             description="Re-measure every version of a registered model from the registry (held-out "
                                         "split, file bytes, timed latency) and move the 'champion' alias only if the "
                                         "policy's best version beats the current champion. The decision is recorded.")
    promote.add_argument("--model", required=True, help="registered model name, e.g. mnist-lenet5-compressed")
    promote.add_argument("--policy", default="best-accuracy", choices=("best-accuracy", "smallest"),
                         help="best-accuracy (highest accuracy within --max-size/--max-latency) or smallest "
                              "(smallest with accuracy >= --min-accuracy); default best-accuracy")
    promote.add_argument("--min-accuracy", help="accuracy floor: 0.97 or 97%%")
    promote.add_argument("--max-size", help="size limit, e.g. 150KB")
    promote.add_argument("--max-latency", help="latency limit in ms")
    promote.add_argument("--split", default="test", help="held-out split to re-measure on (default test)")
    promote.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    promote.add_argument("--dry-run", action="store_true", help="show the decision without moving the alias or recording it")
    _plugin_flags(promote)

    worker = sub.add_parser("worker", help="join a running search from another process or host",
                            description="Join the search STUDY in the Optuna storage STORAGE: rebuild its task, planner "
                                        "and budgets from the settings the search stored there, and run trials in this "
                                        "process until the study holds its total. Across hosts use a PostgreSQL or "
                                        "MySQL URL and an --out directory on a shared filesystem; on one host the "
                                        "search's sqlite file works.")
    worker.add_argument("--storage", required=True, help="the search's Optuna storage URL, e.g. "
                                                         "postgresql://user@host/db or sqlite:////abs/path/optuna.db")
    worker.add_argument("--study", required=True, help="the search's study name")
    worker.add_argument("--trials", type=int, help="run until the study holds this many trials (default: the search's total)")
    worker.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the search to create the study (default 60)")
    worker.add_argument("--no-progress", action="store_true", help="no progress bar")

    sync = sub.add_parser("sync", help="replay MLflow records a search kept while the tracking server was unreachable",
                          description="A search that cannot reach MLflow keeps going and writes every run, metric and "
                                      "registration it could not record to OUT/mlflow-pending.jsonl. This replays them "
                                      "in order; it is safe to run again (nothing is recorded twice).")
    sync.add_argument("--out", type=Path, default=Path("slimforge-out"), help="the search's output directory (default slimforge-out)")
    sync.add_argument("--tracking-uri", help="replay to this MLflow URI (default: the URI the search was given)")

    reproduce = sub.add_parser("reproduce", help="rebuild a registered model from its recorded plan and compare bytes",
                               description="Rebuild the registered model of a trial's MLflow run from the plan and "
                                           "task its artifact records (same seed, same epochs, same CPU threads) and "
                                           "check that the rebuilt artifact is identical, bit for bit. Exit 0 when "
                                           "identical, 1 when not.")
    reproduce.add_argument("run_id", help="MLflow run id of a trial (the nested run trial-NNNN of a registered model)")
    reproduce.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    reproduce.add_argument("--config", type=Path, help="task config, instead of the task the artifact's header records")
    reproduce.add_argument("--trust", action="store_true",
                           help="call the factories the artifact's header names even though this account has not "
                                "trusted them yet (it runs their code)")
    reproduce.add_argument("--out", type=Path, help="keep the rebuilt artifact in this folder (default: a temporary one)")
    _plugin_flags(reproduce)

    plugins = sub.add_parser("plugins", help="inspect installed technique plugins")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", metavar="ACTION")
    listing = plugins_sub.add_parser("list", help="every technique with its family, stage and source package")
    _plugin_flags(listing)
    return parser


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
    from slimforge.core.task import read_toml
    from slimforge.search.budgets import Budgets, budget_keys
    from slimforge.search.settings import settings_from

    # Everything the user typed is checked before torch loads (task building imports it).
    file_config = read_toml(args.config) if args.config else {}
    for table in file_config:
        if table not in ("task", "budgets", "search"):
            raise UnknownNameError(f"{args.config} table", table, ["task", "budgets", "search"])
    file_budgets = file_config.get("budgets", {})
    flags = {key: getattr(args, key) for key in budget_keys() if getattr(args, key) is not None}
    budgets = Budgets.parse(**(file_budgets | flags), fields={k: f"[budgets] {k}" for k in file_budgets if k not in flags})
    settings = settings_from(args, file_config.get("search", {}))
    settings.check_out_dir()
    if "task" in file_config and args.task:
        raise ConfigError("--task and a [task] table in --config both name a task; keep one")
    if settings.backend == "ray":  # join the cluster before the task loads: a refusal costs seconds
        from slimforge.search.backends.ray import connect

        connect(settings)

    from slimforge.app.api import make_plugins, run_search
    from slimforge.core.task import load_task, task_from_table

    if "task" in file_config:
        task = task_from_table(file_config["task"], base_dir=args.config.resolve().parent, origin=str(args.config))
    else:
        task = load_task(args.task, **_task_kwargs(args))
    print(f"task {task.name}; budgets: {budgets.describe()}; {settings.trials} trials", file=sys.stderr)
    plugins = make_plugins(strict=settings.strict_plugins, disabled=settings.disabled_plugins)
    result = run_search(task, budgets, settings, plugins)
    print(format_result(result))
    print(f"\nsummary: {settings.out_dir / 'summary.json'}")
    if settings.tracking:
        print(f"mlflow:  mlflow ui --backend-store-uri {settings.resolved(task.name).tracking_uri}")
    return 0


def format_result(result, width: int | None = None) -> str:
    """The printed summary and Pareto table.  ``width``: cut each row's plan to this many columns
    (default: the terminal's width when stdout is a terminal, else no cut: a log keeps whole
    plans); summary.json always has them whole."""
    import shutil

    from slimforge.search.reports import search_summary

    if width is None:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0

    s = search_summary(result.trials, result.baseline)
    stopped = f", {s['stopped_by_scheduler']} stopped by the scheduler" if s["stopped_by_scheduler"] else ""
    stopped += f", {s['stopped_early']} stopped early" if s["stopped_early"] else ""
    hypervolume = f"{s['hypervolume']:.4f}" if s["hypervolume"] is not None else "n/a"
    lines = [f"study {result.study_name}: {s['trials_done']} trials done - {s['complete']} complete, "
             f"{s['rejected_before_training']} rejected before training, {s['failed']} failed{stopped}, "
             f"{s['feasible']} feasible; feasible-front hypervolume {hypervolume} (log size and latency, "
             f"normalised to the baseline; see summary.json)",
             f"baseline: {result.baseline.accuracy:.4f} val / {result.baseline_test.accuracy:.4f} test, "
             f"{result.baseline.size_bytes / 1000:.1f} KB, {result.baseline.latency_ms:.3f} ms", ""]
    if not result.pareto:
        from slimforge.search.feasibility import closest_for, describe

        closest = closest_for(result)
        if closest is None:  # feasible trials exist, but all of them are under the registration floor
            floor = result.registration_floor or {}
            return "\n".join(lines + [
                f"no Pareto front: all {s['feasible']} feasible trial(s) are below the registration floor "
                f"{floor.get('min_accuracy', float('nan')):.4f} ({floor.get('rule', '')}); they are in summary.json. "
                "Lower it with --register-min-accuracy or --register-max-accuracy-drop, or run more trials"])
        return "\n".join(lines + describe(closest))
    header = f"{'trial':>5}  {'acc val':>7}  {'acc test':>8}  {'KB':>8}  {'ratio':>6}  {'ms':>7}  {'version':>7}  plan"
    lines += ["Pareto front (feasible, validation-selected):", header, "-" * len(header)]
    cut = False
    for r in result.pareto:
        m, t = r.measurements, r.test_measurements
        ratio = result.baseline.size_bytes / m.size_bytes
        version = r.links.get("model_version", "floor" if r.not_registered else "-")
        row = (f"{r.number:>5}  {m.accuracy:>7.4f}  {t.accuracy:>8.4f}  {m.size_bytes / 1000:>8.1f}  "
               f"{ratio:>5.1f}x  {m.latency_ms:>7.3f}  {version!s:>7}  ")
        room = width - len(row) - 1  # the last column left free: some terminals wrap a full line
        plan = r.plan_text
        if width and len(plan) > room:
            plan, cut = plan[:max(room - 3, 10)] + "...", True
        lines.append(row + plan)
    if cut:
        lines.append("(plans cut to the terminal's width; whole plans in summary.json, pareto[].plan_text)")
    below = [str(r.number) for r in result.pareto if r.not_registered]
    if below:
        floor = result.registration_floor
        lines.append(f"not registered (version 'floor'): trial(s) {', '.join(below)}, below the registration floor "
                     f"{floor['min_accuracy']:.4f} ({floor['rule']}); set it with --register-min-accuracy or "
                     "--register-max-accuracy-drop")
    return "\n".join(lines)


def _artifact_task(args):
    """The task an artifact was saved with (``--config`` overrides its header), after the trust check."""
    from slimforge.core.artifact import read_artifact
    from slimforge.core.task import task_from_config, task_from_source

    if not args.artifact.exists():
        raise ConfigError(f"artifact: file not found: {args.artifact}")
    meta, _ = read_artifact(args.artifact)
    if args.config:
        return task_from_config(args.config)
    from slimforge.core import trust

    if args.trust:
        trust.trust(meta, str(args.artifact))
    trust.check(meta, str(args.artifact))  # before anything the header names is imported
    return task_from_source(meta.get("task", {}))


def cmd_evaluate(args) -> int:
    from slimforge.core.measure import measure_artifact

    task = _artifact_task(args)
    m = measure_artifact(args.artifact, task=task, plugins=_plugins(args), split=args.split)
    if args.json:
        print(json.dumps(m.to_dict()))
    else:
        print(f"{args.artifact}: {task.metric_name} {m.accuracy:.4f} on {args.split} ({len(task.split(args.split))} examples), "
              f"{m.size_bytes} bytes ({m.size_bytes / 1000:.1f} KB), latency {m.latency_ms:.3f} ms median")
    return 0


def cmd_export(args) -> int:
    from slimforge.app.export import export_artifact, format_report

    report = export_artifact(args.artifact, args.format, args.out, task=_artifact_task(args), plugins=_plugins(args))
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0 if report.within_tolerance else 1


def cmd_promote(args) -> int:
    from slimforge.search.budgets import Budgets
    from slimforge.search.settings import resolve_tracking_uri
    from slimforge.tracking.registry import promote

    limits = Budgets.parse(max_size=args.max_size, max_latency=args.max_latency, min_accuracy=args.min_accuracy)
    uri = resolve_tracking_uri(args.tracking_uri)
    decision = promote(args.model, args.policy, tracking_uri=uri, min_accuracy=limits.min_accuracy,
                       max_size_bytes=limits.max_size_bytes, max_latency_ms=limits.max_latency_ms, split=args.split,
                       dry_run=args.dry_run, progress=lambda msg: print(msg, file=sys.stderr), plugins=_plugins(args))
    print(f"{'version':>7}  {'acc':>7}  {'logged acc':>10}  {'bytes':>8}  {'logged bytes':>12}  {'ms':>7}  eligible")
    for c in decision.versions:
        marker = " (champion)" if c.version == decision.champion_before else ""
        print(f"{c.version:>7}  {c.accuracy:>7.4f}  {c.logged.get('accuracy_test', '-')[:10]:>10}  {c.size_bytes:>8}  "
              f"{c.logged.get('size_bytes', '-'):>12}  {c.latency_ms:>7.3f}  {'yes' if c.eligible else 'no: ' + c.why_not}{marker}")
    if decision.dry_run:
        verb = f"WOULD PROMOTE v{decision.candidate}" if decision.would_promote else "WOULD NOT PROMOTE"
    else:
        verb = f"PROMOTED v{decision.candidate} to champion" if decision.promoted else "NOT PROMOTED"
    print(f"\n{verb}: {decision.reason}")
    return 0


def cmd_worker(args) -> int:
    from slimforge.search.engine import run_worker

    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {args.trials}")
    records = run_worker(storage=args.storage, study=args.study, trials=args.trials, progress=not args.no_progress,
                         wait_s=args.wait)  # its plugins follow the search's stored settings
    states = [r.state for r in records]
    print(f"worker ran {len(records)} trial(s) of study {args.study}: "
          + (", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)) or "none left to run"))
    return 0


def cmd_sync(args) -> int:
    from slimforge.tracking.mlflow import sync_pending

    report = sync_pending(args.out, args.tracking_uri)
    if not report.done and not report.pending:
        print(f"nothing pending in {args.out} (no {report.journal.name})")
        return 0
    counts = report.counts()
    names = {"search_start": "search run(s)", "trial": "trial run(s)", "register": "registered version(s)",
             "search_end": "search(es) ended"}
    done = ", ".join(f"{counts[k]} {v}" for k, v in names.items() if counts.get(k)) or "nothing"
    versions = [o["links"] for op, o in report.done if op["op"] == "register"]
    if versions:
        done += " (" + ", ".join(f"{v['registered_model']} v{v['model_version']}" for v in versions) + ")"
    print(f"replayed {len(report.done)} operation(s): {done}")
    if report.pending:
        first = report.pending[0]
        print(f"{len(report.pending)} operation(s) still pending in {report.journal}: {first.get('last_error', '')}",
              file=sys.stderr)
        return 1
    print(f"nothing pending; {report.journal.name} removed")
    return 0


def cmd_reproduce(args) -> int:
    from slimforge.search.reproduce import reproduce
    from slimforge.search.settings import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    result = reproduce(args.run_id, tracking_uri=uri, config=args.config, trust_header=args.trust, out_dir=args.out,
                       log=lambda msg: print(msg, file=sys.stderr), plugins=_plugins(args))
    print(f"recorded: {result.recorded_sha256}  {result.model_uri} (trial {result.trial})")
    print(f"rebuilt:  {result.rebuilt_sha256}  {result.rebuilt_path if args.out else '(temporary; keep it with --out)'}")
    print("identical" if result.identical else f"different: {result.difference}")
    return 0 if result.identical else 1


def cmd_plugins(args) -> int:
    plugins = _plugins(args)
    rows = plugins.plugin_rows()
    columns = ("technique", "family", "stage", "one-shot", "source", "description")
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
    handler = {"search": cmd_search, "evaluate": cmd_evaluate, "export": cmd_export, "promote": cmd_promote, "sync": cmd_sync,
               "plugins": cmd_plugins, "worker": cmd_worker, "reproduce": cmd_reproduce}[args.command]
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
