"""The same search as ``user_task.toml``, from Python: build a ``Task``, call ``run_search``, use the result.

    python examples/python_api.py --out api-out --trials 16
    python examples/python_api.py --out api-out --trials 4 --max-size 1MB --tracking-uri sqlite:///api-out/mlflow.db

Runs from any working directory.  MLflow tracking goes to ``--tracking-uri`` (default: a sqlite
file inside ``--out``); ``--no-tracking`` turns it off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
# Artifacts name their architecture "user_model:build_model", so this folder must be importable
# wherever one is loaded: here (explicitly, so it also holds when this file is imported rather
# than run), in `slimforge evaluate` (which reads the folder from the artifact's header), and on
# PYTHONPATH for any other process.
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

import user_model  # noqa: E402  (needs the sys.path entry above)

from slimforge.core.compressed import load_model  # noqa: E402
from slimforge.core.manager import Plugins  # noqa: E402
from slimforge.core.measure import evaluate  # noqa: E402
from slimforge.core.task import FactoryRef, Task  # noqa: E402
from slimforge.search.budgets import Budgets  # noqa: E402
from slimforge.app.api import SearchSettings, run_search  # noqa: E402

TECHNIQUES = ("magnitude_pruning", "knowledge_distillation", "int8_ptq")


def digits_task() -> Task:
    """A user task built directly: the objects ``[task]`` in user_task.toml would produce."""
    return Task(
        name="sklearn-digits",
        # What an artifact rebuilds before loading its tensors: only the structure is needed, so
        # skip training (the trained weights all get replaced anyway).
        architecture=FactoryRef("user_model:build_model", {"pretrained": False}),
        teacher_factory=user_model.build_model,  # the trained model to compress, built on first use
        splits=user_model.build_data(),
        metric=user_model.macro_f1,
        metric_name="macro_f1",
        # How `slimforge evaluate ARTIFACT` rebuilds this task (data and metric) from the artifact's
        # header: the same table a TOML [task] holds, plus the folder its modules import from.
        source={"config": {"name": "sklearn-digits", "model": "user_model:build_model",
                           "data": "user_model:build_data", "metric": "user_model:macro_f1"},
                "base_dir": str(EXAMPLES_DIR)},
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("slimforge-api-out"), help="output directory")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-size", default="30KB", help="artifact size budget (default 30KB)")
    parser.add_argument("--max-accuracy-drop", default="2pt", help="allowed macro-F1 drop (default 2pt)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    task = digits_task()
    budgets = Budgets.parse(max_size=args.max_size, max_accuracy_drop=args.max_accuracy_drop)
    settings = SearchSettings(
        trials=args.trials, seed=args.seed, out_dir=args.out, techniques=TECHNIQUES,
        tracking=not args.no_tracking,
        tracking_uri=args.tracking_uri or f"sqlite:///{(args.out / 'mlflow.db').resolve()}",
        progress=False,
    )
    result = run_search(task, budgets, settings)

    counts = result.counts()
    print(f"study {result.study_name}: {len(result.trials)} trials, {counts['complete']} complete, "
          f"{counts['feasible']} feasible")
    base = result.baseline
    print(f"baseline: {task.metric_name} {base.accuracy:.4f} val / {result.baseline_test.accuracy:.4f} test, "
          f"{base.size_bytes / 1000:.1f} KB, {base.latency_ms:.3f} ms")
    if not result.pareto:
        print("no trial met every budget: loosen the budgets or run more trials")
        return 0

    print(f"\nPareto front, best {task.metric_name} first:")
    for member in result.pareto:  # TrialRecord: measurements on val, test_measurements on test
        val, test = member.measurements, member.test_measurements
        # A member below the registration floor is reported, not registered; not_registered says why.
        version = member.links.get("model_version", f"- ({member.not_registered})" if member.not_registered else "-")
        print(f"  trial {member.number:>3}: {task.metric_name} {val.accuracy:.4f} val / {test.accuracy:.4f} test, "
              f"{val.size_bytes / 1000:.1f} KB ({base.size_bytes / val.size_bytes:.1f}x smaller), "
              f"{val.latency_ms:.3f} ms, mlflow version {version}")
        print(f"             plan: {member.plan_text}")
        print(f"             artifact: {member.artifact_path}")

    # An artifact is self-contained: load the best member back and score it on the test split.
    best = result.pareto[0]
    loaded = load_model(best.artifact_path, Plugins().registry)
    score = evaluate(loaded.model, task.split("test"), task.metric)
    print(f"\nreloaded trial {best.number} from {Path(best.artifact_path).name}: test {task.metric_name} {score:.4f}")
    print(f"summary: {settings.out_dir / 'summary.json'}")
    if settings.tracking:
        print(f"mlflow:  mlflow ui --backend-store-uri {settings.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
