"""Recovery training: the one fine-tuning loop every plan uses.

Techniques contribute through hooks of the ``Technique`` contract:
- ``training_loss`` transforms the loss (knowledge distillation mixes in its term);
- ``recovery_parameters`` adds tensors to the optimizer that are not the model's (hint
  distillation's regressors: trained here, never saved, since the artifact is the model's state_dict);
- ``after_optimizer_step`` re-imposes constraints (pruning masks, N:M patterns, shared codebooks).

Multi-fidelity: after each epoch the model is scored on validation data and ``should_stop`` may end
training early (the search's rule lives in ``search.objective``).  A NaN/inf loss stops the trial
with a clear reason instead of saving a broken model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimforge.core.errors import SlimforgeError
from slimforge.core.outputs import logits_of, task_loss
from slimforge.core.plan import Recovery


class TrainingDiverged(SlimforgeError, FloatingPointError):
    pass


@dataclass
class AppliedStep:
    """A technique already applied in this trial, with the config and context it used."""

    technique: object
    config: object
    ctx: object


@dataclass
class TrainingBatch:
    """One recovery step's data, handed to ``Technique.training_loss``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    outputs: torch.Tensor  # logits (core.outputs.logits_of), class dimension last
    indices: torch.Tensor  # positions in the training split, to look up cached teacher outputs
    teacher_outputs: Callable[[], torch.Tensor]  # lazily computed or read from the cache


@dataclass
class RecoveryLog:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    scores: list[float] = field(default_factory=list)  # validation metric after each epoch
    score_before: float | None = None  # validation metric before training
    stopped_early: str | None = None  # reason, when ``should_stop`` ended training
    seconds: float = 0.0


class _Indexed(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index][:2]
        return x, y, index


class TeacherOutputs:
    """Teacher logits for a whole split, computed once and reused by every batch and trial:
    cheaper than a teacher forward per student step when the data is not augmented."""

    def __init__(self, teacher: nn.Module, dataset, device: str = "cpu", batch_size: int = 500):
        self.teacher, self.dataset, self.device, self.batch_size = teacher, dataset, device, batch_size
        self._cache: torch.Tensor | None = None

    def all(self) -> torch.Tensor:
        if self._cache is None:
            outputs = []
            self.teacher.to(self.device).eval()
            with torch.inference_mode():
                for x, *_ in DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False):
                    outputs.append(logits_of(self.teacher(x.to(self.device))).float())
            self._cache = torch.cat(outputs)
        return self._cache

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.all()[indices.to(self.all().device)]


def recover(model: nn.Module, applied: Sequence[AppliedStep], train_set, recovery: Recovery, *,
            device: str = "cpu", seed: int = 0, batch_size: int = 64,
            teacher_outputs: TeacherOutputs | None = None,
            score: Callable[[nn.Module], float] | None = None,
            should_stop: Callable[[RecoveryLog, int], str | None] | None = None) -> RecoveryLog:
    """Fine-tune ``model`` for up to ``recovery.epochs`` epochs.

    ``score(model)`` returns the validation metric (evaluated before training and after each
    epoch when given); ``should_stop(log, epochs_left)`` may end training early with a reason."""
    log = RecoveryLog()
    if recovery.epochs == 0:
        return log
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    if score is not None:
        log.score_before = score(model)
    optimizer = torch.optim.Adam(_trainable(model, applied), lr=recovery.lr)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recovery.epochs * steps_per_epoch)
    teacher_outputs = teacher_outputs or TeacherOutputs(_missing_teacher(), train_set)
    for epoch in range(recovery.epochs):
        model.train()
        total, count = 0.0, 0
        for x, y, idx in DataLoader(_Indexed(train_set), batch_size=batch_size, shuffle=True, generator=generator):
            x, y = x.to(device), y.to(device)
            outputs = logits_of(model(x))
            loss = task_loss(outputs, y)
            batch = TrainingBatch(x, y, outputs, idx, lambda idx=idx: teacher_outputs[idx])
            for step in applied:
                loss = step.technique.training_loss(model, batch, loss, step.config, step.ctx)
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
        log.losses.append(total / count)
        if score is not None:
            log.scores.append(score(model))
            reason = should_stop(log, recovery.epochs - epoch - 1) if should_stop else None
            if reason:
                log.stopped_early = reason
                break
    model.eval()
    log.seconds = time.perf_counter() - started
    return log


def _trainable(model: nn.Module, applied: Sequence[AppliedStep]) -> list[torch.Tensor]:
    """The model's trainable parameters, then each technique's ``recovery_parameters``; a tensor
    listed twice is optimised once (Adam would otherwise step it twice)."""
    tensors, seen = [], set()
    extra = (p for step in applied for p in step.technique.recovery_parameters(model, step.config, step.ctx))
    for p in (*model.parameters(), *extra):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            tensors.append(p)
    return tensors


class _missing_teacher(nn.Module):
    """Placeholder used when no teacher was given: asking for teacher outputs is a bug."""

    def forward(self, x):  # pragma: no cover - only reached by a misconfigured technique
        raise SlimforgeError("a technique asked for teacher outputs, but recovery was given no teacher")
