"""hint_distillation, token_distillation and max_entropy_sparsity against their baselines on the
embedded MNIST LeNet-5 task (3,000 training digits; test accuracy on the 1,000 test digits).

Distillation: LeNet-5 pruned to ``--sparsity`` (every layer, magnitude), then ``--epochs`` of the
search's own recovery loop at lr ``--lr`` with one of

  none            task cross-entropy only
  KD              knowledge_distillation (alpha 0.5, T 4, KL)
  token top-3     token_distillation (alpha 0.5, T 4, top-3 teacher + tail bucket)
  token top-1     the same with only the teacher's argmax and its probability kept
  hint            hint_distillation (defaults: CE + 1.0 x hint at fc1, the deepest feature point)
  hint x3         hint_distillation at conv1, conv2 and fc1 (depth 1, 3 points)
  hint x3 b10     the same with beta 10
  hint+KD         hint_distillation with alpha 0.5 (CE/KL mixed like KD) plus the fc1 hint
  KD a0.1, hint x3+KD a0.1   alpha 0.1 (benchmarks/distillation.py's setting), for ``--student``

``--student W`` distils into a parameter_distillation student of width W (narrower layers: the
hint regressors then widen 0.3 x C channels back to C) instead of the pruned teacher.

Sparsity: at equal per-layer density (every layer), magnitude pruning vs random_sparsity vs
max_entropy_sparsity, one-shot and after ``--epochs`` of fine-tuning; the artifact bytes and the
mean histogram entropy of the kept values (32 bins over each layer's range).

Mean +- std over ``--seeds`` seeds (the seed drives the fine-tuning order and the random mask).

    python benchmarks/new_techniques.py --only sparsity --epochs 1 --densities 0.1 0.3
    python benchmarks/new_techniques.py --only distillation --epochs 5 --arms none KD "token top-3" hint "hint x3"
    python benchmarks/new_techniques.py --only distillation --epochs 5 --student 0.3 --arms none "KD a0.1" \
        "hint x3+KD a0.1" "hint x3"
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimforge.core.compressed import save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import evaluate
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.recovery import AppliedStep, TeacherOutputs, recover
from slimforge.core.task import load_task
from slimforge.core.technique import TechniqueContext
from slimforge.plugins.common import weight_layers
from slimforge.plugins.sparsity.max_entropy_sparsity import histogram_entropy

DISTILL_ARMS = {
    "none": [],
    "KD": [("knowledge_distillation", {"alpha": 0.5, "temperature": 4.0, "term": "kl"})],
    "token top-3": [("token_distillation", {"alpha": 0.5, "temperature": 4.0, "top_k": 3})],
    "token top-1": [("token_distillation", {"alpha": 0.5, "temperature": 4.0, "top_k": 1})],
    "hint": [("hint_distillation", {})],
    "hint x3": [("hint_distillation", {"points": 3})],
    "hint x3 b10": [("hint_distillation", {"points": 3, "beta": 10.0})],
    "hint+KD": [("hint_distillation", {"alpha": 0.5})],
    # benchmarks/distillation.py's KD setting for a student trained far from the teacher
    "KD a0.1": [("knowledge_distillation", {"alpha": 0.1, "temperature": 4.0, "term": "kl"})],
    "hint x3+KD a0.1": [("hint_distillation", {"points": 3, "alpha": 0.1})],
}
SPARSITY_ARMS = ("magnitude_pruning", "random_sparsity", "max_entropy_sparsity")


def apply_steps(plugins, task, model, steps, seed):
    applied = []
    for name, config in steps:
        technique = plugins.registry.get(name)
        ctx = TechniqueContext(task=task, seed=seed)
        config = technique.config_from_dict(config)
        model = technique.apply(model, config, ctx)
        applied.append(AppliedStep(technique, config, ctx))
    return model, applied


def summary(values):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {std:.4f}  (" + " ".join(f"{v:.4f}" for v in values) + ")"


def distillation(plugins, task, args, teacher_outputs):
    if args.student:
        structural = ("parameter_distillation", {"width": args.student})
        print(f"\n## distillation into a width-{args.student} student (parameter_distillation), "
              f"{args.epochs} epochs at lr {args.lr}")
    else:
        structural = ("magnitude_pruning", {"default_sparsity": args.sparsity})
        print(f"\n## distillation after {args.sparsity:.0%} magnitude pruning, {args.epochs} epochs at lr {args.lr}")
    for arm in args.arms:
        steps = DISTILL_ARMS[arm]
        accs, seconds = [], []
        for seed in range(args.seeds):
            model, applied = apply_steps(plugins, task, copy.deepcopy(task.teacher),
                                         [structural, *steps], seed)
            log = recover(model, applied, task.split("train"), Recovery(epochs=args.epochs, lr=args.lr), seed=seed,
                          teacher_outputs=teacher_outputs)
            accs.append(evaluate(model, task.split("test"), task.metric))
            seconds.append(log.seconds / args.epochs)
        print(f"{arm:<12} test acc {summary(accs)}  {statistics.mean(seconds):.1f} s/epoch")


def sparsity(plugins, task, args, teacher_outputs):
    for density in args.densities:
        print(f"\n## sparsity at density {density} in every layer ({args.epochs} epochs fine-tuning at lr {args.lr})")
        for arm in SPARSITY_ARMS:
            one_shot, tuned, sizes, entropies = [], [], [], []
            for seed in range(args.seeds):
                config = {"default_sparsity": round(1.0 - density, 6)}
                model, applied = apply_steps(plugins, task, copy.deepcopy(task.teacher), [(arm, config)], seed)
                teacher_layers = weight_layers(task.teacher)
                layer_entropy = []
                for name, layer in weight_layers(model).items():
                    w = teacher_layers[name].weight.detach()
                    kept = w[layer.weight.detach() != 0]
                    layer_entropy.append(histogram_entropy(kept, float(w.min()), float(w.max()), 32))
                entropies.append(statistics.mean(layer_entropy))
                one_shot.append(evaluate(model, task.split("test"), task.metric))
                recover(model, applied, task.split("train"), Recovery(epochs=args.epochs, lr=args.lr), seed=seed,
                        teacher_outputs=teacher_outputs)
                tuned.append(evaluate(model, task.split("test"), task.metric))
                with tempfile.TemporaryDirectory() as folder:
                    plan = Plan(steps=(PlanStep(arm, config),), recovery=Recovery(epochs=args.epochs, lr=args.lr),
                                seed=seed)
                    sizes.append(save_model(model, Path(folder) / "m.slim", task=task, plan=plan,
                                            structure=[applied[0].ctx.structure]))
            print(f"{arm:<21} one-shot {summary(one_shot)}\n{'':<21} tuned    {summary(tuned)}\n"
                  f"{'':<21} bytes {statistics.mean(sizes):,.0f}  kept-value entropy {statistics.mean(entropies):.3f} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--student", type=float, help="distil into a parameter_distillation student of this "
                        "width instead of a magnitude-pruned teacher")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--only", choices=("distillation", "sparsity"))
    parser.add_argument("--arms", nargs="+", choices=list(DISTILL_ARMS), default=list(DISTILL_ARMS),
                        help="distillation arms to run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 is fastest on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = load_task()
    plugins = Plugins(load_entry_points=False)
    teacher_outputs = TeacherOutputs(task.teacher, task.split("train"))
    print(f"teacher test accuracy {evaluate(task.teacher, task.split('test'), task.metric):.4f}")
    if args.only != "sparsity":
        distillation(plugins, task, args, teacher_outputs)
    if args.only != "distillation":
        sparsity(plugins, task, args, teacher_outputs)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
