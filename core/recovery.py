"""Recovery training: the one fine-tuning loop every plan uses.

Techniques contribute through ``Technique.after_optimizer_step`` (e.g. pruning re-imposes its
masks after each step).  A NaN/inf loss stops the trial with a clear reason instead of saving a
broken model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from slimforge.core.errors import SlimforgeError
from slimforge.core.plan import Recovery


class TrainingDiverged(SlimforgeError, FloatingPointError):
    pass


@dataclass
class AppliedStep:
    """A technique already applied in this trial, with the config and context it used."""

    technique: object
    config: object
    ctx: object


def recover(model: nn.Module, applied: Sequence[AppliedStep], train_set, recovery: Recovery, *,
            device: str = "cpu", seed: int = 0, batch_size: int = 64,
            on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune ``model`` for ``recovery.epochs``; return the mean training loss of each epoch."""
    if recovery.epochs == 0:
        return []
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recovery.lr)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recovery.epochs * steps_per_epoch)
    losses = []
    for epoch in range(recovery.epochs):
        total, count = 0.0, 0
        for x, y in DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"recovery training diverged: loss is {loss.item()} at epoch {epoch + 1}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            for step in applied:
                step.technique.after_optimizer_step(model, step.config, step.ctx)
            total += loss.item() * len(x)
            count += len(x)
        losses.append(total / count)
        if on_epoch:
            on_epoch(epoch, losses[-1])
    return losses
