"""Hint-layer distillation (FitNets, Romero et al. 2015): the student's intermediate features are
pulled towards the teacher's through a learned projection, on top of the label loss (and,
optionally, Hinton KD on the logits).

Recovery loss = ``alpha * CE + (1 - alpha) * KL_T * T**2 + beta * mean_points NMSE(P(s), t)``,
where for each hint point ``s`` is the student's feature, ``t`` the teacher's at the paired point,
``P`` a linear regressor from the student's width to the teacher's applied along the channel
dimension (a 1x1 convolution for ``(N, C, H, W)`` features, a Linear for ``(N, D)`` and
``(N, T, D)``), and NMSE the squared error divided by the teacher feature's mean square on the
batch, so ``beta`` means the same on every layer and model (raw MSE scales with activation size).
Positions whose target is ``IGNORE_INDEX`` are left out of a sequence feature's error.

**Hint points.**  The teacher's candidate points, in forward order, are its repeated blocks (the
children of its longest ``nn.ModuleList`` of one block type: transformer / RNN-stack layers) or,
in a model without such blocks, its Conv/Linear layers except the output layer (whose output is the
logits: KD's job).  ``points`` hints are spread evenly over the first ``depth`` of that list: the
i-th at relative depth ``depth * i / points`` (FitNets used one hint in the middle: depth 0.5,
points 1).  Pairing: a student with the same block count (or a model without blocks) is paired by
module name, which pruning, sparsity, factorization (``fc1`` becomes a Sequential still named
``fc1``) and sharing keep; a student with fewer blocks is paired by relative depth.  A point whose
student module is missing, or whose features differ in anything but width, is a note and skipped.

**The regressor is not part of the model.**  It lives in the trial's ``TechniqueContext`` and
reaches the optimizer through ``Technique.recovery_parameters``; the artifact is the model's
state_dict, so it is trained and then dropped, and the artifact loads strictly.  It is initialised
by ridge least squares on calibration features (FitNets trained a random one in a first stage; a
pruned student is already trained, and a random projection would push its features in random
directions until the regressor catches up).

**Teacher features are computed per batch** (teacher forward in eval mode, no grad, hooks removed
after each call), not cached: a cache of every intermediate feature of the training split costs
``positions x width`` floats per hint point (LeNet-5's conv1 alone: 11.5 KB per digit, 35 MB for
the 3,000-digit split; a sequence model's is ``N x T x D``), against one extra forward pass,
about a third of a training step.  The same pass gives the teacher logits the KD part uses.

Student features are captured by forward hooks registered in ``apply``.  They fire only while the
hooked module is in training mode with grad enabled, and only on the module they were registered
on, so evaluation, latency timing and deep copies of the model are unaffected.

Defaults: alpha 1 (hints with the label loss, as FitNets' second term is; KD on logits is
``knowledge_distillation``'s job and a plan holds one distillation technique), beta 1, one hint at
depth 1 (the deepest feature point: on LeNet-5, fc1).

Measured on the embedded MNIST LeNet-5 (``benchmarks/new_techniques.py --only distillation``):
every layer magnitude-pruned to 10 % density, then recovery at lr 1e-3, test accuracy on the 1,000
test digits, mean of 2 seeds (one run's standard error at 96 % is about 0.6 points):

    recovery loss                         2 epochs   5 epochs
    CE only (no distillation)              0.935      0.963
    knowledge_distillation (a 0.5, T 4)    0.918      0.957
    hint (defaults: CE + 1.0 x fc1 hint)   0.935      0.955
    hint at conv1, conv2, fc1              -          0.957
    the same with beta 10                  -          0.944
    hint + KD (alpha 0.5)                  0.916      -

Into a narrower student (parameter_distillation at width 0.3, regressors widening 6->20, 15->50,
150->500; ``--student 0.3 --epochs 5``): CE only 0.9645, KD (alpha 0.1) 0.9650, hints at conv1,
conv2, fc1 0.9590, the same + KD (alpha 0.1) 0.9615.

So on this task **hints do not beat plain fine-tuning**, and neither does logit KD: a pruned
LeNet-5 still holds most of the teacher's function, 3,000 labelled digits are enough to recover
it, and every distillation term slows the label loss down.  A large hint weight (10) clearly hurts.
FitNets' gains were for thin, deep students trained from scratch; what this measures is the
pruned-and-fine-tuned case only.  A teacher forward per batch is the cost (per-epoch times on the
loaded 2-core machine ranged 9-22 s across arms, too noisy to state the overhead).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from slimforge.core.errors import ConfigError, SlimforgeError
from slimforge.core.hookspecs import hookimpl
from slimforge.core.outputs import IGNORE_INDEX, logits_of
from slimforge.core.technique import Family, Stage, Technique, TechniqueContext
from slimforge.plugins.common import weight_layers
from slimforge.plugins.distillation.knowledge import kl_term

MAX_POINTS = 4
CALIBRATION_EXAMPLES = 128  # inputs whose features initialise the regressors
RIDGE = 1e-3  # regressor init: lambda = RIDGE * mean eigenvalue of the student features' Gram matrix
MAX_FIT_ROWS = 50_000  # feature positions (examples x spatial / tokens) the least-squares fit uses


@dataclass(frozen=True, kw_only=True)
class HintDistillationConfig:
    depth: float = 1.0  # relative depth of the deepest hint point, in (0, 1]
    points: int = 1  # hint points, spread evenly over the first ``depth`` of the candidates
    beta: float = 1.0  # weight of the hint term
    alpha: float = 1.0  # weight of the label cross-entropy; 1 - alpha goes to KD on the logits
    temperature: float = 4.0  # of that KD term

    def __post_init__(self) -> None:
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"hint_distillation.{name}: must be a number, got {value!r}")
            return value

        if not 0.0 < number("depth") <= 1.0:
            raise ConfigError(f"hint_distillation.depth: must be in (0, 1], got {self.depth}")
        if isinstance(self.points, bool) or not isinstance(self.points, int) or not 1 <= self.points <= MAX_POINTS:
            raise ConfigError(f"hint_distillation.points: must be an integer in 1..{MAX_POINTS}, got {self.points!r}")
        if not 0.0 < number("beta") <= 1000.0:
            raise ConfigError(f"hint_distillation.beta: must be in (0, 1000], got {self.beta}")
        if not 0.0 <= number("alpha") <= 1.0:
            raise ConfigError(f"hint_distillation.alpha: must be in [0, 1], got {self.alpha}")
        if not number("temperature") > 0:
            raise ConfigError(f"hint_distillation.temperature: must be > 0, got {self.temperature}")


# --- where the hints are -------------------------------------------------------------------------

def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the children of the longest ``nn.ModuleList`` whose (>= 2) children share one
    type: a transformer's or an RNN stack's layers.  Empty when there is none."""
    best: list[str] = []
    for name, module in model.named_modules():
        children = list(module.named_children())
        if (isinstance(module, nn.ModuleList) and len(children) >= 2 and len(children) > len(best)
                and len({type(child) for _, child in children}) == 1):
            best = [f"{name}.{child}" if name else child for child, _ in children]
    return best


def candidate_points(model: nn.Module, inputs: torch.Tensor) -> tuple[list[str], bool]:
    """The model's feature points in forward order, and whether they are blocks (True) or
    Conv/Linear layers (False, the output layer left out)."""
    blocks = repeated_blocks(model)
    names = blocks or list(weight_layers(model))
    order = call_order(model, names, inputs)
    return (order, True) if blocks else (order[:-1], False)


def call_order(model: nn.Module, names: list[str], inputs: torch.Tensor) -> list[str]:
    """``names`` sorted by when their module first runs in a forward pass; unused ones dropped."""
    modules = dict(model.named_modules())
    seen: list[str] = []

    def record(name):
        return lambda module, args, output: seen.append(name) if name not in seen else None

    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def hint_positions(count: int, config: HintDistillationConfig) -> list[int]:
    """Indices into ``count`` candidates of the hint points: relative depths depth * i / points."""
    depths = (config.depth * i / config.points for i in range(1, config.points + 1))
    return sorted({max(0, math.ceil(depth * count) - 1) for depth in depths})


def pair_points(teacher_points: list[str], teacher_blocks: bool, student: nn.Module,
                student_points: list[str], chosen: list[int]) -> list[tuple[str, str | None]]:
    """(teacher point, student point or None) for each chosen teacher index: by name when the
    student kept the teacher's structure, by relative depth when it has fewer blocks."""
    names = dict(student.named_modules())
    by_depth = teacher_blocks and len(student_points) != len(teacher_points) and student_points
    pairs = []
    for index in chosen:
        teacher_name = teacher_points[index]
        if by_depth:
            relative = (index + 1) / len(teacher_points)
            pairs.append((teacher_name, student_points[max(0, math.ceil(relative * len(student_points)) - 1)]))
        else:
            pairs.append((teacher_name, teacher_name if teacher_name in names else None))
    return pairs


# --- features and their regressors ---------------------------------------------------------------

def first_tensor(output) -> torch.Tensor:
    """A module's feature: its output, or the first tensor of a tuple (Hugging Face blocks)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return logits_of(output)


def channel_dim(feature: torch.Tensor, module: nn.Module) -> int:
    """Convolution features carry channels in dim 1; (N, D) and (N, T, D) features in the last."""
    convolutional = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())
    return 1 if feature.dim() >= 4 or (feature.dim() == 3 and convolutional) else feature.dim() - 1


def as_rows(feature: torch.Tensor, dim: int) -> torch.Tensor:
    """``(positions, channels)``: every spatial position / token is one regression sample."""
    return feature.movedim(dim, -1).reshape(-1, feature.shape[dim])


class Regressor(nn.Module):
    """Student width -> teacher width along ``dim``: a Linear, which is a 1x1 convolution when
    applied to the channel dimension of a convolution feature."""

    def __init__(self, student_width: int, teacher_width: int, dim: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(student_width, teacher_width)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.linear(feature.movedim(self.dim, -1)).movedim(-1, self.dim)

    @torch.no_grad()
    def fit(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Ridge least squares on ``(rows, width)`` features: the regressor starts at the best
        linear map, so the hint's first gradients are about what no linear map explains."""
        x = torch.cat([student.double(), torch.ones(len(student), 1, dtype=torch.double, device=student.device)], 1)
        gram = x.T @ x
        ridge = RIDGE * torch.trace(gram) / gram.shape[0]
        solution = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                      x.T @ teacher.double())
        self.linear.weight.copy_(solution[:-1].T.to(self.linear.weight.dtype))
        self.linear.bias.copy_(solution[-1].to(self.linear.bias.dtype))


def normalised_error(projected: torch.Tensor, target: torch.Tensor, dim: int, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over counted positions, divided by the target's mean square there."""
    error, scale = (projected - target).square(), target.square()
    if target.dim() == 3 and dim == 2 and tuple(targets.shape) == tuple(target.shape[:2]):
        counted = (targets != IGNORE_INDEX).to(error.device)
        error, scale = error[counted], scale[counted]
        if error.numel() == 0:
            return projected.sum() * 0.0
    return error.mean() / scale.mean().clamp_min(1e-12)


@dataclass
class HintPoint:
    teacher: str
    student: str
    dim: int
    regressor: Regressor


class HintState:
    """One trial's hints: the paired points, their regressors, and the student-feature hooks."""

    def __init__(self, teacher: nn.Module, points: list[HintPoint], model: nn.Module):
        self.teacher, self.points = teacher, points
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[p.student].register_forward_hook(self._capture(p.student, modules[p.student]))
                        for p in points]

    def _capture(self, name: str, module: nn.Module):
        # A weak reference and an identity test: a deep copy of the model shares this hook
        # function but not the module, so a copy's forward never writes here (and nothing here
        # keeps a discarded model alive).
        target = weakref.ref(module)
        features = self.features

        def hook(module, args, output):
            if module is target() and module.training and torch.is_grad_enabled():
                features[name] = first_tensor(output)
        return hook

    def teacher_forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher logits and features at the hint points for one batch (eval, no grad)."""
        modules = dict(self.teacher.named_modules())
        captured: dict[str, torch.Tensor] = {}
        # The last call's output, as the student's hook keeps: a module called twice per forward
        # is compared at the same call on both sides.
        handles = [modules[p.teacher].register_forward_hook(
            lambda m, a, o, name=p.teacher: captured.__setitem__(name, first_tensor(o))) for p in self.points]
        try:
            self.teacher.to(inputs.device).eval()
            with torch.no_grad():
                logits = logits_of(self.teacher(inputs))
        finally:
            for handle in handles:
                handle.remove()
        return logits, captured


def _other_dims(feature: torch.Tensor, dim: int) -> list[int]:
    return [n for i, n in enumerate(feature.shape) if i != dim]


def _calibration_inputs(ctx: TechniqueContext, device) -> torch.Tensor:
    dataset = ctx.task.calibration
    return torch.stack([dataset[i][0] for i in range(min(CALIBRATION_EXAMPLES, len(dataset)))]).to(device)


def _capture_once(model: nn.Module, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda m, a, o, name=name: captured.__setitem__(name, first_tensor(o))) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return captured


class HintDistillation(Technique):
    name = "hint_distillation"
    family = Family.DISTILLATION
    stage = Stage.TRAINING
    Config = HintDistillationConfig
    needs_recovery = True
    requires = frozenset({"teacher", "training_data"})
    description = ("FitNets hints: student features at searched depths regress onto the teacher's through a "
                   "least-squares-initialised projection (not saved); beta, alpha searched.")

    def suggest(self, space, task) -> HintDistillationConfig:
        alpha = space.suggest_float("alpha", 0.0, 1.0, step=0.25)
        return HintDistillationConfig(
            depth=space.suggest_float("depth", 0.25, 1.0, step=0.25),
            points=space.suggest_int("points", 1, 3),
            beta=round(space.suggest_float("beta", 0.03, 30.0, log=True), 4),
            alpha=alpha,
            # Define-by-run: the temperature only matters when there is a KD term.
            temperature=space.suggest_float("temperature", 1.0, 8.0, log=True) if alpha < 1.0 else 4.0,
        )

    def apply(self, model: nn.Module, config: HintDistillationConfig, ctx: TechniqueContext) -> nn.Module:
        teacher = ctx.task.teacher
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        inputs = _calibration_inputs(ctx, device)
        teacher.to(device).eval()
        teacher_points, blocks = candidate_points(teacher, inputs)
        student_points, _ = candidate_points(model, inputs)
        points: list[HintPoint] = []
        if not teacher_points:
            ctx.note("hint_distillation: the teacher has no intermediate feature point; training uses the "
                     "label/KD loss only")
        pairs = pair_points(teacher_points, blocks, model, student_points,
                            hint_positions(len(teacher_points), config)) if teacher_points else []
        teacher_features = _capture_once(teacher, [t for t, _ in pairs], inputs)
        student_features = _capture_once(model, [s for _, s in pairs if s], inputs)
        for teacher_name, student_name in pairs:
            if student_name is None:
                ctx.note(f"hint_distillation: teacher point {teacher_name!r} has no student module of that name; "
                         "skipped")
                continue
            t, s = teacher_features[teacher_name], student_features[student_name]
            dim = channel_dim(t, dict(teacher.named_modules())[teacher_name])
            if t.dim() != s.dim() or _other_dims(t, dim) != _other_dims(s, dim):
                ctx.note(f"hint_distillation: {student_name!r} features {tuple(s.shape)} and teacher {teacher_name!r} "
                         f"features {tuple(t.shape)} differ beyond width; skipped")
                continue
            regressor = Regressor(s.shape[dim], t.shape[dim], dim).to(device)
            generator = torch.Generator().manual_seed(ctx.seed)
            rows = torch.randperm(as_rows(s, dim).shape[0], generator=generator)[:MAX_FIT_ROWS]
            regressor.fit(as_rows(s, dim)[rows.to(device)], as_rows(t, dim)[rows.to(device)])
            points.append(HintPoint(teacher_name, student_name, dim, regressor))
        ctx.state["hints"] = HintState(teacher, points, model)
        if points:
            ctx.note("hint_distillation: hints " + ", ".join(
                f"{p.student}->{p.teacher} ({p.regressor.linear.in_features}->{p.regressor.linear.out_features})"
                for p in points))
        return model

    def recovery_parameters(self, model, config, ctx):
        hints: HintState = ctx.state["hints"]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return [param for point in hints.points for param in point.regressor.to(device).parameters()]

    def training_loss(self, model, batch, loss, config: HintDistillationConfig, ctx):
        hints: HintState = ctx.state["hints"]
        teacher_logits, teacher_features = hints.teacher_forward(batch.inputs)
        if config.alpha < 1.0:
            kd = kl_term(batch.outputs, teacher_logits, config.temperature)
            loss = config.alpha * loss + (1.0 - config.alpha) * kd
        if not hints.points:
            return loss
        terms = []
        for point in hints.points:
            student = hints.features.pop(point.student, None)
            if student is None:
                raise SlimforgeError(f"hint_distillation: the student's forward never reached {point.student!r} "
                                     "in training mode; was recovery run with grad disabled?")
            terms.append(normalised_error(point.regressor(student), teacher_features[point.teacher], point.dim,
                                          batch.targets))
        return loss + config.beta * torch.stack(terms).mean()


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(HintDistillation)
