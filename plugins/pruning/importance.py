"""Importance scores for pruning, and the shared base of the unstructured pruning techniques.

Three per-weight criteria, each a tensor shaped like the stored weight of the site it scores
(``core.sites``: Conv/Linear, HF Conv1D, nn.MultiheadAttention's in_proj_weight, Embedding tables,
RNN weight_ih/hh; a score is per weight, so the stored layout is as good as the logical one):

- ``magnitude``: |w|.  Needs no data.
- ``taylor``: mean_b |w * g_b|, the first-order Taylor estimate of the loss change when w is set
  to zero, taken on each mini-batch and averaged over batches (Molchanov et al., CVPR 2019, who
  also average their per-batch scores).  Taking |.| per batch matters: at a converged teacher the
  mean gradient is near zero and mostly noise, and |w * mean_b g_b| cancels signs across batches
  (on the embedded LeNet-5, 50 % pruned with 8 batches, no fine-tuning: 0.55 accuracy against 0.96
  with the per-batch form).
- ``fisher``: w^2 * mean_b(g_b^2), the Optimal-Brain-Damage saliency with the Hessian diagonal
  replaced by the diagonal empirical Fisher (LeCun et al. 1989; Theis et al. 2018).  With mu and
  s^2 the mean and variance of a weight's per-sample gradient, the per-sample Fisher is mu^2 + s^2
  and the squared gradient of a batch of B samples has expectation mu^2 + s^2 / B; near
  convergence mu is small, so batch gradients rank weights like the per-sample Fisher at one
  backward pass per batch instead of one per sample.

``g_b`` is the gradient of the task cross-entropy (``core.outputs.task_loss``: per example for a
classifier, per token for a sequence model) on mini-batch ``b`` of ``SCORE_BATCH_SIZE`` training
samples; ``batches`` of them are taken in a seeded shuffled order, with the model in eval mode
(dropout off, batch-norm statistics frozen: the function being pruned is the deployed one).
``torch.autograd.grad`` is used, so no ``.grad`` is left behind.  Gradients are taken with respect
to the stored tensors themselves, so a packed in_proj_weight, an RNN's flat weights and a tied
embedding (whose gradient sums its input and output uses) are scored like any Linear weight.

``UnstructuredPruning`` is the technique base that magnitude_pruning, gradient_pruning and
fisher_pruning share: same config fields, same per-site density search space, same masks; they
differ only in ``criterion``.  What they act on and note:

- every weight site (``plugins.common.mask_sites``), a tied input/output embedding once (its mask
  holds for both uses).  The density of each is searched as ``density.<site.setting_key>`` (the
  module name for a module's weight, so CNN plans and Optuna parameter names are those of before
  sites), except for position embeddings: too small to be worth a search dimension (under 1 % of a
  transformer's weights) and read by every token at their position; unless a config names one
  (or sets ``default_sparsity``) it stays dense, with a note;
- a note for each >=2-D parameter that is no site (e.g. a bare learned position tensor) and for each
  site an earlier technique re-expressed: those stay dense;
- a note for each configured name that matches no site.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from slimforge.core.errors import ConfigError
from slimforge.core.outputs import task_loss
from slimforge.core.sites import weight_sites
from slimforge.core.technique import Family, Stage, TechniqueContext
from slimforge.plugins.common import (MaskedTechnique, apply_masks, keep_top, mask_sites, note_unmatched_sites,
                                      site_sparsity, suggest_site_sparsity)

CRITERIA = ("magnitude", "taylor", "fisher")
SCORE_BATCH_SIZE = 64
DEFAULT_BATCHES = 8


@dataclass
class GradientStatistics:
    """Per-parameter gradient moments over the scored batches (keys: ``named_parameters`` names)."""

    mean: dict[str, torch.Tensor]  # mean_b g_b: the gradient of the loss on all scored samples
    mean_abs: dict[str, torch.Tensor]  # mean_b |g_b|: what the Taylor score multiplies |w| by
    mean_square: dict[str, torch.Tensor]  # mean_b g_b^2: diagonal empirical Fisher estimate
    batches: int


@contextlib.contextmanager
def _scoring_mode(model: nn.Module):
    """Eval mode and every parameter differentiable for the duration; both restored after.

    cuDNN's RNN backward refuses eval mode ("can only be called in training mode"), so a model with
    a recurrent layer is scored with cuDNN off (PyTorch's own RNN kernels differentiate in eval)."""
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    try:
        with torch.backends.cudnn.flags(enabled=False) if has_rnn else contextlib.nullcontext():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def gradient_statistics(model: nn.Module, dataset, *, batches: int = DEFAULT_BATCHES,
                        batch_size: int = SCORE_BATCH_SIZE, seed: int = 0,
                        names: list[str] | None = None) -> GradientStatistics:
    """Cross-entropy gradients of every parameter (or of the ``named_parameters`` ``names``) on the
    first ``batches`` batches of a seeded shuffle of ``dataset``: their mean, mean absolute value and
    mean square."""
    if batches < 1:
        raise ConfigError(f"batches: must be >= 1, got {batches}")
    named = [(name, p) for name, p in model.named_parameters() if names is None or name in names]
    device = named[0][1].device if named else torch.device("cpu")
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named}
    total_abs = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named}
    total_square = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    seen = 0
    with _scoring_mode(model), torch.enable_grad():
        for x, y in loader:
            loss = task_loss(model(x.to(device)), y.to(device))
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (name, _), g in zip(named, grads, strict=True):
                if g is not None:  # a parameter the forward pass does not use scores zero
                    total[name] += g.float()
                    total_abs[name] += g.float().abs()
                    total_square[name] += g.float().square()
            seen += 1
            if seen == batches:
                break
    return GradientStatistics(mean={k: v / seen for k, v in total.items()},
                              mean_abs={k: v / seen for k, v in total_abs.items()},
                              mean_square={k: v / seen for k, v in total_square.items()}, batches=seen)


def taylor_score(weight: torch.Tensor, grad_abs: torch.Tensor) -> torch.Tensor:
    """|w| * mean_b |g_b| = mean_b |w * g_b|."""
    return (weight.detach().float() * grad_abs).abs()


def fisher_score(weight: torch.Tensor, grad_square: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().square() * grad_square


def importance_scores(model: nn.Module, criterion: str, dataset=None, *, sites: list[str] | None = None,
                      batches: int = DEFAULT_BATCHES, batch_size: int = SCORE_BATCH_SIZE,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-weight importance of the weight ``sites`` (site names; default: every site), each shaped
    like the site's stored tensor, by site name.  Gradients are computed only for those sites.

    ``dataset`` (``(x, y)`` items) is needed by the gradient criteria only."""
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion: must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    every = weight_sites(model)
    names = list(every) if sites is None else sites
    missing = [name for name in names if name not in every]
    if missing:
        raise ConfigError(f"no weight site named {', '.join(map(repr, missing))}; sites: {', '.join(every)}")
    weights = {name: every[name].tensor(model) for name in names}
    if criterion == "magnitude":
        return {name: w.detach().abs() for name, w in weights.items()}
    if dataset is None:
        raise ConfigError(f"criterion {criterion!r} needs training data to compute gradients")
    # Looked up by identity: a tied tensor is listed once by named_parameters, under its first name.
    param_name = {id(p): n for n, p in model.named_parameters()}
    stats = gradient_statistics(model, dataset, batches=batches, batch_size=batch_size, seed=seed,
                                names=[param_name[id(w)] for w in weights.values()])
    if criterion == "taylor":
        return {name: taylor_score(w, stats.mean_abs[param_name[id(w)]]) for name, w in weights.items()}
    return {name: fisher_score(w, stats.mean_square[param_name[id(w)]]) for name, w in weights.items()}


# --- the unstructured techniques' shared config and behaviour ------------------------------------

@dataclass(frozen=True, kw_only=True)
class UnstructuredPruningConfig:
    technique: ClassVar[str] = "unstructured pruning"  # names the field in error messages
    sparsity: dict[str, float] = field(default_factory=dict)  # layer name -> fraction of zeros
    default_sparsity: float = 0.0  # for layers not named in ``sparsity``

    def __post_init__(self) -> None:
        for layer, value in {**self.sparsity, "default_sparsity": self.default_sparsity}.items():
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{self.technique}.sparsity[{layer!r}]: must be in [0, 1), got {value!r}")

    def sparsity_of(self, layer: str) -> float:
        return self.sparsity.get(layer, self.default_sparsity)


@dataclass(frozen=True, kw_only=True)
class GradientScoredConfig(UnstructuredPruningConfig):
    batches: int = DEFAULT_BATCHES  # training batches (of SCORE_BATCH_SIZE) the gradients average

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ConfigError(f"{self.technique}.batches: must be an integer >= 1, got {self.batches!r}")


class UnstructuredPruning(MaskedTechnique):
    """Zero the lowest-``criterion`` fraction of each weight site; masks kept in training.

    Subclasses set ``name``, ``Config``, ``description`` and ``criterion``."""

    family = Family.PRUNING
    stage = Stage.PRUNING
    needs_recovery = True
    criterion: ClassVar[str]

    def suggest(self, space, task):
        return self.Config(sparsity=suggest_site_sparsity(space, task))

    def apply(self, model: nn.Module, config, ctx: TechniqueContext) -> nn.Module:
        note_unmatched_sites(model, config.sparsity, ctx, self.name)
        sparsity = {}
        for name, site in mask_sites(model, ctx, self.name).items():
            value = site_sparsity(site, config, ctx, self.name)
            if value > 0:
                sparsity[name] = value
        scores = {}
        if sparsity:  # the gradient criteria cost a data pass: none when nothing is pruned
            data = ctx.task.split("train") if self.criterion != "magnitude" else None
            scores = importance_scores(model, self.criterion, data, sites=list(sparsity),
                                       batches=getattr(config, "batches", DEFAULT_BATCHES), seed=ctx.seed)
        apply_masks(model, {name: keep_top(scores[name], value) for name, value in sparsity.items()}, ctx)
        return model
