"""Knowledge distillation (Hinton et al. 2015): the compressed model learns from the original.

Recovery loss = alpha * CE(labels) + (1 - alpha) * term, where the term is
- ``kl``:  KL(softmax(z_t / T) || softmax(z_s / T)) * T**2 (the T**2 keeps gradient scale
  comparable across temperatures), or
- ``mse``: mean squared error between student and teacher logits.
alpha, T and the term are searched.  Teacher logits come from a per-search cache
(``core.recovery.TeacherOutputs``): recovery does not augment data, so one teacher pass over the
training split serves every batch of every trial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext

TERMS = ("kl", "mse")


@dataclass(frozen=True, kw_only=True)
class KnowledgeDistillationConfig:
    alpha: float = 0.5  # weight of the label cross-entropy
    temperature: float = 4.0
    term: str = "kl"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"knowledge_distillation.alpha: must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"knowledge_distillation.temperature: must be > 0, got {self.temperature}")
        if self.term not in TERMS:
            raise ConfigError(f"knowledge_distillation.term: unknown {self.term!r}; valid choices: {', '.join(TERMS)}")


def kl_rows(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) of each row of two ``(M, K)`` tensors of log-probabilities.

    An outcome whose teacher probability is exactly 0 (log-probability -inf, e.g. a top-k tail
    bucket that holds no mass) adds 0 instead of NaN from 0 * (-inf - -inf)."""
    p_teacher = log_p_teacher.exp()
    pointwise = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return pointwise.sum(dim=-1)


def kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(p_teacher || p_student) at temperature T, times T**2, averaged
    over predictions: per example for a classifier, per token for sequence logits ``(N, T, V)``."""
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=1)
    return kl_rows(log_p_teacher, log_p_student).mean() * temperature**2


def mse_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_logits, teacher_logits)


class KnowledgeDistillation(Technique):
    name = "knowledge_distillation"
    family = Family.DISTILLATION
    stage = Stage.TRAINING
    Config = KnowledgeDistillationConfig
    needs_recovery = True
    requires = frozenset({"teacher", "training_data"})
    description = "Hinton KD (KL*T^2) or logit MSE from the original model, mixed with CE; alpha, T searched."

    def suggest(self, space, task) -> KnowledgeDistillationConfig:
        return KnowledgeDistillationConfig(
            alpha=space.suggest_float("alpha", 0.0, 0.9, step=0.1),
            temperature=space.suggest_float("temperature", 1.0, 8.0, log=True),
            term=space.suggest_categorical("term", list(TERMS)),
        )

    def apply(self, model: nn.Module, config, ctx: TechniqueContext) -> nn.Module:
        return model  # distillation changes only how recovery trains

    def training_loss(self, model, batch, loss, config: KnowledgeDistillationConfig, ctx):
        teacher = batch.teacher_outputs().to(batch.outputs.device)
        if config.term == "kl":
            term = kl_term(batch.outputs, teacher, config.temperature)
        else:
            term = mse_term(batch.outputs, teacher)
        return config.alpha * loss + (1.0 - config.alpha) * term


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(KnowledgeDistillation)
