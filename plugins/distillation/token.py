"""Token-level knowledge distillation with a top-k teacher: word-level KD (Kim & Rush 2016) in the
memory-bounded form large-vocabulary language-model distillation uses.

Every prediction (a token of a sequence model's ``(N, T, V)`` logits; an example of a classifier's
``(N, C)``) gets its own soft target from the teacher, as in ``knowledge_distillation``.  What this
technique adds is that the teacher is kept only as its **top-k** log-probabilities per token, plus
one bucket for the rest of the mass:

- Cache: on the first epoch the teacher runs on each training batch (eval mode, no grad) and the
  technique stores, per example, the indices of its k largest logits and k + 1 log-probabilities at
  temperature T (the k entries and ``log(1 - sum)``, computed as a log-sum-exp over the logits
  outside the top k, so it does not cancel).  Later epochs read the cache.  Memory is
  ``positions x (k + 1)`` floats plus ``positions x k`` int32 indices, against ``positions x V``
  for ``core.recovery.TeacherOutputs``' dense cache, which this technique never builds (it is lazy
  and only built when a technique asks for ``batch.teacher_outputs()``).  The price: one teacher
  pass over the training split per *trial* instead of one per search.
- Loss: ``alpha * CE + (1 - alpha) * T**2 * KL``, the KL taken per counted position (targets equal
  to ``IGNORE_INDEX`` are left out, as in the task loss) and averaged.
- ``tail = "bucket"`` (default): teacher and student are both read as distributions over k + 1
  outcomes (the teacher's k tokens and "anything else"); the student's bucket is the log-sum-exp
  of its logits outside the teacher's top k.  This is an exact KL between two distributions, it is
  zero only when the student matches the teacher's top-k probabilities *and* its leftover mass,
  and with ``top_k >= V`` it equals ``knowledge_distillation``'s KL (tested).  The alternative,
  ``tail = "renormalize"``, renormalises both over the top-k support and ignores the rest; it is
  kept as an option but not the default because at T > 1 the tail holds a real share of the
  teacher's mass and dropping it overstates the teacher's confidence.  The KL code is
  ``knowledge.kl_rows``, shared with ``knowledge_distillation``.

Why the defaults: alpha 0.5 and T 4 are ``knowledge_distillation``'s; the searched k
(1, 4, 16, 64) spans "the teacher's argmax plus its confidence" to the 10-100 range that top-k LM
distillation caches typically keep.  A k at or above the class count is exact KD.

On a plain classifier the technique works unchanged (a "token" is an example), so the planner does
not exclude it there; it shares the ``distillation`` family with ``knowledge_distillation`` and
``hint_distillation``, so a plan holds at most one of them.

Measured on the embedded MNIST LeNet-5 (``benchmarks/new_techniques.py --only distillation``):
every layer magnitude-pruned to 10 % density, recovery at lr 1e-3, test accuracy on the 1,000
test digits, mean of 2 seeds: top-3 token KD (alpha 0.5, T 4) 0.914 after 2 epochs and 0.951
after 5, against full-softmax ``knowledge_distillation`` at the same alpha and T 0.918 / 0.957 and
no distillation 0.935 / 0.963.  So truncating a 10-way teacher to 3 entries costs about half a
point (within two runs' noise), and on this task no KD variant beats the label loss alone.  This
is a classifier with 10 outputs; it says nothing yet about a large vocabulary, where the cache
size is the point (to be measured on the embedded sequence task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.outputs import IGNORE_INDEX, logits_of
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.distillation.knowledge import kl_rows

TAILS = ("bucket", "renormalize")
TOP_K_CHOICES = (1, 4, 16, 64)


@dataclass(frozen=True, kw_only=True)
class TokenDistillationConfig:
    alpha: float = 0.5  # weight of the label cross-entropy
    temperature: float = 4.0
    top_k: int = 16  # teacher entries kept per token (clamped to the vocabulary size)
    tail: str = "bucket"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"token_distillation.alpha: must be in [0, 1], got {self.alpha!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"token_distillation.temperature: must be > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"token_distillation.top_k: must be an integer >= 1, got {self.top_k!r}")
        if self.tail not in TAILS:
            raise ConfigError(f"token_distillation.tail: unknown {self.tail!r}; valid choices: {', '.join(TAILS)}")


def top_k_log_probs(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(M, k + 1)`` log-probabilities at temperature T of the ``(M, k)`` ``indices`` of each row
    of ``(M, V)`` logits, then of everything else.  When k = V there is no "else" and the result
    is ``(M, V)``: a bucket of exactly zero mass would put log(0) (and NaN gradients) in the graph."""
    scaled = logits / temperature
    total = torch.logsumexp(scaled, dim=-1, keepdim=True)
    kept = scaled.gather(-1, indices) - total
    if indices.shape[-1] >= logits.shape[-1]:
        return kept
    rest = scaled.scatter(-1, indices, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True) - total
    return torch.cat([kept, tail], dim=-1)


def teacher_top_k(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores for ``(M, V)`` teacher logits: ``(M, k + 1)`` log-probabilities
    (``(M, V)`` when k = V) and ``(M, k)`` int32 indices, k = min(top_k, V)."""
    k = min(top_k, logits.shape[-1])
    indices = logits.topk(k, dim=-1).indices
    return top_k_log_probs(logits.float(), indices, temperature), indices.to(torch.int32)


def top_k_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, indices: torch.Tensor,
             temperature: float, tail: str = "bucket", counted: torch.Tensor | None = None) -> torch.Tensor:
    """T**2 * mean over counted rows of KL(teacher || student) on the teacher's top-k support.

    ``student_logits`` ``(M, V)``; ``teacher_log_probs`` ``(M, k + 1)`` and ``indices`` ``(M, k)``
    from ``teacher_top_k``; ``counted`` an optional ``(M,)`` bool mask of rows to average over."""
    student = top_k_log_probs(student_logits, indices.long(), temperature)
    teacher = teacher_log_probs.to(student.dtype)
    if tail == "renormalize":
        k = indices.shape[-1]
        teacher = teacher[:, :k] - torch.logsumexp(teacher[:, :k], dim=-1, keepdim=True)
        student = student[:, :k] - torch.logsumexp(student[:, :k], dim=-1, keepdim=True)
    rows = kl_rows(teacher, student)
    if counted is not None:
        if not bool(counted.any()):
            return rows.sum() * 0.0  # keeps the graph; a batch of padding teaches nothing
        rows = rows[counted]
    return rows.mean() * temperature**2


class TopKCache:
    """Per-trial cache of the teacher's top-k per training example (positions in the training set
    recovery iterates over; recovery does not augment, so an example's teacher output is fixed)."""

    def __init__(self, teacher: nn.Module, top_k: int, temperature: float):
        self.teacher, self.top_k, self.temperature = teacher, top_k, temperature
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, inputs: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, ..., k + 1)`` log-probabilities and ``(N, ..., k)`` indices for a batch."""
        keys = [int(i) for i in indices]
        missing = [n for n, key in enumerate(keys) if key not in self.entries]
        if missing:
            self.teacher.to(inputs.device).eval()
            with torch.no_grad():
                logits = logits_of(self.teacher(inputs[missing]))
            vocab = logits.shape[-1]
            log_probs, top = teacher_top_k(logits.reshape(-1, vocab), self.top_k, self.temperature)
            shape = logits.shape[:-1]
            # Held in host memory: the cache grows with the training split, a GPU's memory does not.
            log_probs, top = log_probs.view(*shape, -1).cpu(), top.view(*shape, -1).cpu()
            for row, n in enumerate(missing):
                self.entries[keys[n]] = (log_probs[row], top[row])
        log_probs, top = zip(*(self.entries[key] for key in keys), strict=True)
        return torch.stack(log_probs), torch.stack(top)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.entries.values())


class TokenDistillation(Technique):
    name = "token_distillation"
    family = Family.DISTILLATION
    stage = Stage.TRAINING
    Config = TokenDistillationConfig
    needs_recovery = True
    requires = frozenset({"teacher", "training_data"})
    description = ("Word-level KD per token (Kim & Rush 2016) from a top-k teacher cache (k+1 log-probs per "
                   "token, rest as one bucket); alpha, T, k searched; padding ignored.")

    def suggest(self, space, task) -> TokenDistillationConfig:
        return TokenDistillationConfig(
            alpha=space.suggest_float("alpha", 0.0, 0.9, step=0.1),
            temperature=space.suggest_float("temperature", 1.0, 8.0, log=True),
            top_k=space.suggest_categorical("top_k", list(TOP_K_CHOICES)),
        )

    def apply(self, model: nn.Module, config: TokenDistillationConfig, ctx: TechniqueContext) -> nn.Module:
        ctx.state["top_k_cache"] = TopKCache(ctx.task.teacher, config.top_k, config.temperature)
        return model  # distillation changes only how recovery trains

    def training_loss(self, model, batch, loss, config: TokenDistillationConfig, ctx):
        cache: TopKCache = ctx.state["top_k_cache"]
        log_probs, indices = cache.lookup(batch.inputs, batch.indices)
        vocab = batch.outputs.shape[-1]
        counted = batch.targets.reshape(-1) != IGNORE_INDEX
        device = batch.outputs.device
        term = top_k_kl(batch.outputs.reshape(-1, vocab), log_probs.reshape(-1, log_probs.shape[-1]).to(device),
                        indices.reshape(-1, indices.shape[-1]).to(device), config.temperature, config.tail,
                        counted.to(device))
        return config.alpha * loss + (1.0 - config.alpha) * term


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(TokenDistillation)
