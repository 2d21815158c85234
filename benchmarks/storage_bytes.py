"""Artifact bytes of the code-storing built-ins, for comparing two checkouts of slimforge.

Applies each fixed plan to a task's cached teacher (no fine-tuning: this measures how the
techniques *store* what they compute, and fine-tuning only moves float values), saves the
artifact with ``save_model``, loads it back with ``load_model`` and prints, per plan, the
artifact's bytes, the loaded model's validation metric and a digest of its outputs on the first
validation batch, so two checkouts can be compared row by row: same digest = same model.

    python benchmarks/storage_bytes.py                          # this checkout
    python benchmarks/storage_bytes.py --root /tmp/slimforge-main   # another checkout's code

``--root`` imports slimforge's folders (``core``, ``plugins``, ...) from that checkout instead of
the installed one, so one venv measures both.

``--places`` (this checkout only) measures what the storage hook's *layer* place buys over the
*derived* one, on LeNet-5 at 4 bits: the built-in plan (every plain layer a ``WeightOnlyQuantized``
module) against the same ``QuantizedWeight`` codes stored on every site as parametrizations
through the public ``store_weight``; artifact bytes and the median batch-1 forward time on one
thread, both models timed in interleaved rounds so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import tempfile
from pathlib import Path

PACKAGES = ("core", "plugins", "search", "tracking", "app")
TASKS = ("mnist-lenet5", "text-chargpt-tiny")
PRUNE = ("magnitude_pruning", {"default_sparsity": 0.9})
PLANS = {
    "weight_only_quant 2 bit": [("weight_only_quant", {"default_bits": 2, "keep_ends_8bit": False})],
    "weight_only_quant 4 bit": [("weight_only_quant", {"default_bits": 4, "keep_ends_8bit": False})],
    "weight_only_quant 4 bit asym": [("weight_only_quant", {"default_bits": 4, "keep_ends_8bit": False,
                                                            "symmetric": False})],
    "weight_only_quant 8 bit": [("weight_only_quant", {"default_bits": 8, "keep_ends_8bit": False})],
    "kmeans 16 clusters": [("kmeans_clustering", {"conv_bits": 4, "fc_bits": 4})],
    "kmeans 32 clusters": [("kmeans_clustering", {"conv_bits": 5, "fc_bits": 5})],
    "prune 90% + kmeans 32": [PRUNE, ("kmeans_clustering", {"conv_bits": 5, "fc_bits": 5})],
    "prune 90% + weight_only 4 bit": [PRUNE, ("weight_only_quant", {"default_bits": 4, "keep_ends_8bit": False})],
}


def use_checkout(root: Path) -> None:
    """Make ``slimforge.<package>`` import from ``root/<package>`` (before anything imports it)."""
    import slimforge

    for package in PACKAGES:
        init = root / package / "__init__.py"
        spec = importlib.util.spec_from_file_location(f"slimforge.{package}", init,
                                                      submodule_search_locations=[str(root / package)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(slimforge, package, module)
        spec.loader.exec_module(module)


def measure(task_name: str, plan_steps, folder: Path):
    import torch

    from slimforge.core.compressed import load_model, save_model
    from slimforge.core.manager import Plugins
    from slimforge.core.measure import evaluate
    from slimforge.core.plan import Plan, PlanStep
    from slimforge.core.task import load_task
    from slimforge.core.technique import TechniqueContext

    task = load_task(task_name)
    registry = Plugins(load_entry_points=False).registry
    torch.manual_seed(0)
    model = task.teacher_factory()
    model.load_state_dict(task.teacher.state_dict())
    model.eval()
    steps, structure = [], []
    for name, config in plan_steps:
        technique = registry.get(name)
        ctx = TechniqueContext(task=task, seed=0)
        model = technique.apply(model, technique.config_from_dict(config), ctx)
        steps.append(PlanStep(name, config))
        structure.append(ctx.structure)
    plan = Plan(steps=tuple(steps), seed=0)
    path = folder / f"{task_name}-{len(list(folder.iterdir()))}.slim"
    size = save_model(model, path, task=task, plan=plan, structure=structure)
    loaded = load_model(path, registry, task=task).model
    validation = task.split("val")
    score = evaluate(loaded, validation, task.metric)
    inputs = torch.stack([validation[i][0] for i in range(min(64, len(validation)))])
    with torch.no_grad():
        outputs = loaded(inputs)
    outputs = getattr(outputs, "logits", outputs)
    digest = hashlib.sha256(outputs.detach().contiguous().numpy().tobytes()).hexdigest()[:12]
    return size, score, digest


def place_costs(rounds: int = 15) -> None:
    """Bytes and batch-1 latency of the layer place against the derived place (see ``--places``)."""
    import statistics

    import torch

    from slimforge.core.compressed import load_model, save_model
    from slimforge.core.manager import Plugins
    from slimforge.core.measure import LatencySettings, time_forward
    from slimforge.core.plan import Plan, PlanStep
    from slimforge.core.sites import weight_sites
    from slimforge.core.task import load_task
    from slimforge.core.technique import TechniqueContext
    from slimforge.plugins.api import store_weight
    from slimforge.plugins.quantization.weight_only import QuantizedWeight

    task, registry = load_task("mnist-lenet5"), Plugins(load_entry_points=False).registry
    technique = registry.get("weight_only_quant")
    config = {"default_bits": 4, "keep_ends_8bit": False}

    def fresh():
        model = task.teacher_factory()
        model.load_state_dict(task.teacher.state_dict())
        return model.eval()

    layer_ctx = TechniqueContext(task=task)
    layer_model = technique.apply(fresh(), technique.config_from_dict(config), layer_ctx)
    derived_ctx, derived_model = TechniqueContext(task=task), fresh()
    for site in weight_sites(derived_model).values():
        store_weight(derived_model, site, QuantizedWeight.from_matrix(site, site.matrix(derived_model), 4, True, "mse"),
                     derived_ctx)
    plan = Plan(steps=(PlanStep("weight_only_quant", config),), seed=0)
    models, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, ctx in (("layer place (built-in)", layer_model, layer_ctx),
                                  ("derived place on every site", derived_model, derived_ctx)):
            path = Path(tmp) / "m.slim"
            sizes[label] = save_model(model, path, task=task, plan=plan, structure=[ctx.structure])
            models[label] = load_model(path, registry, task=task).model
    models["float teacher"], sizes["float teacher"] = fresh(), None
    x = task.example_inputs()
    outputs = [m(*x) for m in (models["layer place (built-in)"], models["derived place on every site"])]
    assert torch.equal(*outputs), "the two places must compute the same model"
    samples = {label: [] for label in models}
    settings = LatencySettings(warmup=20, repeats=200)
    for _ in range(rounds):
        for label, model in models.items():
            samples[label].append(time_forward(model, x, "cpu", settings).median_ms * 1000)
    print(f"\n# LeNet-5, weight_only_quant 4 bit: median of {rounds} rounds x {settings.repeats} batch-1 forwards, "
          f"{settings.threads} thread")
    print("| storage place | artifact bytes | latency (us) |")
    print("|---|---:|---:|")
    for label in models:
        size = f"{sizes[label]:,}" if sizes[label] is not None else "-"
        print(f"| {label} | {size} | {statistics.median(samples[label]):.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a slimforge checkout to import instead of the installed one")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--places", action="store_true", help="also compare the layer and derived places (LeNet-5)")
    args = parser.parse_args()
    if args.root:
        use_checkout(args.root.resolve())
    import slimforge.core

    print(f"# code from {Path(slimforge.core.__file__).parent.parent}", flush=True)
    print("| task | plan | artifact bytes | val metric | output digest |")
    print("|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for task_name in args.tasks:
            for label, steps in PLANS.items():
                size, score, digest = measure(task_name, steps, Path(tmp))
                print(f"| {task_name} | {label} | {size:,} | {score:.4f} | {digest} |", flush=True)
    if args.places:
        place_costs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
