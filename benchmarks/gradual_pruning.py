"""One-shot vs gradual magnitude pruning at equal retraining, on an embedded task's teacher.

slimforge's pruning techniques prune once and then retrain with the masks held (``MaskedTechnique``).
Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune") instead raises the sparsity along a
cubic schedule, s_t = s_f * (1 - (1 - t/T)^3), over the first ``ramp`` of the training steps,
re-ranking the surviving weights by magnitude at ``events`` evenly spaced steps.  This script
measures whether that would pay on slimforge's small-data embedded tasks before it is built into
the techniques: both arms start from the same teacher, prune the same weights' sites to the same
final per-site densities, train the same number of Adam steps (cosine learning rate) on the train
split, and are scored on validation after the final masks are applied.

    python benchmarks/gradual_pruning.py --task mnist-lenet300 --densities 0.066,0.1,0.158
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from slimforge.core.outputs import accuracy, task_loss
from slimforge.core.task import load_task


def prunable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, p in model.named_parameters() if p.dim() > 1]


def magnitude_masks(model: torch.nn.Module, densities: list[float]) -> list[torch.Tensor]:
    masks = []
    for p, density in zip(prunable(model), densities, strict=True):
        keep = max(1, int(round(density * p.numel())))
        threshold = p.detach().abs().flatten().kthvalue(p.numel() - keep + 1).values
        masks.append(p.detach().abs() >= threshold)
    return masks


def apply(model: torch.nn.Module, masks: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, mask in zip(prunable(model), masks, strict=True):
            p.mul_(mask)


def prune_and_retrain(teacher, train, final: list[float], epochs: int, gradual: bool, *, seed: int,
                      lr: float = 3e-3, ramp: float = 0.75, events: int = 20, batch_size: int = 64):
    torch.manual_seed(seed)
    model = copy.deepcopy(teacher).train()
    x_all, y_all = train.tensors
    total = epochs * math.ceil(len(x_all) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    ramp_steps = int(ramp * total)
    every = max(1, ramp_steps // events)

    def densities_at(step: int) -> list[float]:
        if not gradual or step >= ramp_steps:
            return final
        reached = 1 - (1 - step / ramp_steps) ** 3
        return [1 - (1 - d) * reached for d in final]

    masks = magnitude_masks(model, densities_at(0))
    apply(model, masks)
    generator, step = torch.Generator().manual_seed(seed), 0
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(x_all), batch_size):
            batch = order[start:start + batch_size]
            loss = task_loss(model(x_all[batch]), y_all[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if gradual and step <= ramp_steps and step % every == 0:
                masks = magnitude_masks(model, densities_at(step))
            apply(model, masks)
    apply(model, magnitude_masks(model, final))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist-lenet300")
    parser.add_argument("--densities", default="0.066,0.1,0.158",
                        help="final density per >=2-D parameter, in model order (default: LeNet-300-100 at 7 %%)")
    parser.add_argument("--epochs", default="6,12")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task)
    teacher, train, val = task.teacher, task.split("train"), task.split("val")
    x_val, y_val = val.tensors
    final = [float(d) for d in args.densities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    with torch.no_grad():
        print(f"{args.task}: teacher val {accuracy(teacher.eval()(x_val), y_val):.4f}; final densities {final}")
    print("| epochs | schedule | val per seed | mean |")
    print("|---:|---|---|---:|")
    for epochs in (int(e) for e in args.epochs.split(",")):
        for gradual in (False, True):
            scores = []
            for seed in seeds:
                model = prune_and_retrain(teacher, train, final, epochs, gradual, seed=seed)
                with torch.no_grad():
                    scores.append(accuracy(model(x_val), y_val))
            print(f"| {epochs} | {'gradual (cubic)' if gradual else 'one-shot'} | "
                  f"{', '.join(f'{s:.4f}' for s in scores)} | {sum(scores) / len(scores):.4f} |", flush=True)


if __name__ == "__main__":
    main()
