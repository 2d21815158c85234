"""Distillation benchmark on the embedded task: one small student trained three ways.

  scratch       - the student architecture, randomly initialised, trained on labels
  scratch+KD    - same, trained with Hinton knowledge distillation from the LeNet-5 teacher
  param+KD      - the student initialised from the teacher's most important channels
                  (parameter_distillation), then trained with KD

The student is the teacher at ``--width`` (0.3: conv 6 and 15 filters, fc 150), so all three
have identical shapes.  Every run uses the same recovery loop as the search.  Prints test accuracy
(1,000 digits) as mean +- std over seeds; one standard error of one run at 98 % is ~0.44 points.

    python benchmarks/distillation.py --seeds 5 --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from slimforge.core.measure import evaluate
from slimforge.core.plan import Recovery
from slimforge.core.recovery import AppliedStep, TeacherOutputs, recover
from slimforge.core.task import load_task
from slimforge.core.technique import TechniqueContext
from slimforge.plugins.distillation.knowledge import KnowledgeDistillation, KnowledgeDistillationConfig
from slimforge.plugins.distillation.student import ParameterDistillation, ParameterDistillationConfig


def build_student(task, width: float, from_teacher: bool, seed: int):
    ctx = TechniqueContext(task=task, seed=seed)
    student = ParameterDistillation().apply(copy.deepcopy(task.teacher), ParameterDistillationConfig(width=width), ctx)
    if not from_teacher:
        torch.manual_seed(seed)
        for module in student.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return student


def train(task, student, *, kd: bool, epochs: int, lr: float, seed: int, teacher_outputs) -> float:
    applied = []
    if kd:
        config = KnowledgeDistillationConfig(alpha=0.1, temperature=4.0, term="kl")
        applied.append(AppliedStep(KnowledgeDistillation(), config, TechniqueContext(task=task, seed=seed)))
    recover(student, applied, task.split("train"), Recovery(epochs=epochs, lr=lr), seed=seed,
            teacher_outputs=teacher_outputs)
    return evaluate(student, task.split("test"), task.metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    task = load_task()
    teacher_acc = evaluate(task.teacher, task.split("test"), task.metric)
    teacher_outputs = TeacherOutputs(task.teacher, task.split("train"))
    shapes = [tuple(p.shape) for p in build_student(task, args.width, True, 0).parameters() if p.dim() > 1]
    n_params = sum(p.numel() for p in build_student(task, args.width, True, 0).parameters())
    print(f"teacher test accuracy {teacher_acc:.4f} (431,080 params); student width {args.width}: "
          f"{n_params:,} params, weight shapes {shapes}")
    ways = {"scratch": (False, False), "scratch+KD": (False, True), "param+KD": (True, True)}
    results = {name: [] for name in ways}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for name, (from_teacher, kd) in ways.items():
            student = build_student(task, args.width, from_teacher, seed)
            results[name].append(train(task, student, kd=kd, epochs=args.epochs, lr=args.lr, seed=seed,
                                       teacher_outputs=teacher_outputs))
    print(f"\n{'student':<12} {'test acc mean':>13} {'std':>7} {'errors/1000':>12}   per-seed")
    for name, accs in results.items():
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name:<12} {mean:>13.4f} {std:>7.4f} {1000 * (1 - mean):>12.1f}   "
              + " ".join(f"{a:.3f}" for a in accs))
    print(f"\n{args.seeds} seeds x {args.epochs} epochs, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
