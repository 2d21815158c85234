"""The technique contract: what a compression plugin implements.

A technique is a class, not an instance with state: its configuration is a frozen dataclass, and
everything a trial learns while applying it (masks, calibration statistics) lives in the
per-trial ``TechniqueContext``.  That keeps techniques safe to reuse across trials and processes.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimforge.core.errors import ConfigError, PluginError, UnknownNameError

if typing.TYPE_CHECKING:  # torch is heavy; keep `import slimforge.core.technique` cheap
    import torch
    from torch import nn

    from slimforge.core.task import Task
    from slimforge.core.space import Suggester


REQUIREMENTS = frozenset({"teacher", "training_data", "calibration_data", "gpu"})


class Family(str, enum.Enum):
    """What kind of compression a technique does.  A plan holds at most one technique per family.

    The built-in vocabulary: a third-party technique of a new kind sets ``family`` to a plain
    string instead (``"correction"``), which is its own family; a string equal to a member's value
    is that family (``"quantization"`` competes with the built-in quantizers)."""

    QUANTIZATION = "quantization"
    PRUNING = "pruning"
    SPARSITY = "sparsity"
    FACTORIZATION = "factorization"
    SHARING = "sharing"
    DISTILLATION = "distillation"  # changes how recovery trains (knowledge distillation)
    STUDENT = "student"  # builds a smaller student from the teacher's parameters


class Stage(enum.IntEnum):
    """Order of techniques in a plan.  Stages below ``RECOVERY`` change structure and run before
    recovery training; stages above it finish the trained model (sharing, quantization)."""

    STUDENT_INIT = 10
    PRUNING = 20
    FACTORIZATION = 30
    SPARSITY = 40
    SHARING = 45  # before recovery: shared centroids / merged filters are fine-tuned
    TRAINING = 48  # changes only how recovery trains (distillation losses); structure untouched
    RECOVERY = 50
    QUANTIZATION = 70


def retrains_before_sharing(stages) -> bool:
    """Whether a plan with steps at these stages has a phase to retrain before sharing: a sharing
    step (clustering, merging) after an earlier structural one (student, pruning, factorization,
    sparsity), as in Deep Compression's prune -> retrain -> cluster."""
    stages = list(stages)
    return any(s < Stage.SHARING for s in stages) and any(Stage.SHARING <= s < Stage.TRAINING for s in stages)


def family_name(family: Family | str) -> str:
    """``Family.PRUNING`` and ``"pruning"`` both -> ``"pruning"`` (third-party families are strings)."""
    return family.value if isinstance(family, Family) else str(family)


def stage_label(stage: Stage | int) -> str:
    """``"70 (quantization)"`` for a built-in stage; a third-party stage between two built-in ones
    (e.g. ``Stage.QUANTIZATION + 5``, a plain int) says what it runs after: ``"75 (after quantization)"``."""
    if isinstance(stage, Stage):
        return f"{stage.value} ({stage.name.lower()})"
    earlier = [s for s in Stage if s < stage]
    return f"{int(stage)} (after {max(earlier).name.lower()})" if earlier else f"{int(stage)} (first)"


@dataclass
class TechniqueContext:
    """Per-trial, per-technique scratch space handed to every technique method."""

    task: Task
    device: str = "cpu"
    seed: int = 0
    notes: list[str] = field(default_factory=list)  # layers skipped and why: shown in trial records
    state: dict[str, Any] = field(default_factory=dict)  # e.g. pruning masks kept for training
    # JSON-serialisable facts ``restore_structure`` needs that the config alone does not fix, e.g.
    # the ranks an energy threshold chose or the channels structured pruning kept.  Saved in the
    # artifact header next to the plan step.
    structure: dict[str, Any] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.notes.append(message)


class Technique:
    """Base class of every compression technique, built-in or third-party.

    Subclasses set ``name``, ``family``, ``stage`` and ``Config`` (a frozen, keyword-only dataclass
    whose ``__post_init__`` validates), and implement ``suggest`` and ``apply``.  Optional
    recovery-training hooks: ``training_loss`` (change the loss), ``recovery_parameters`` (extra
    trainable tensors that are not part of the model, e.g. a distillation regressor) and
    ``after_optimizer_step`` (re-impose a constraint).
    """

    name: ClassVar[str]
    # A ``Family`` member, or a plain string for a kind of compression the built-ins lack.
    family: ClassVar[Family | str]
    # A ``Stage`` member, or any int between them to run between two built-in stages (stages
    # >= ``Stage.RECOVERY`` run after recovery training).
    stage: ClassVar[Stage | int]
    Config: ClassVar[type]
    description: ClassVar[str] = ""
    # True when the technique leaves the model in need of recovery training (e.g. pruning).
    needs_recovery: ClassVar[bool] = False
    # Composition rules the planner honours: technique names this one may not come after / before
    # in a plan (e.g. int8 quantization cannot follow k-means clustering: the clustered layers are
    # no longer plain Linear/Conv modules).
    cannot_follow: ClassVar[frozenset[str]] = frozenset()
    cannot_precede: ClassVar[frozenset[str]] = frozenset()
    # Non-empty: the technique is only useful after one of these (e.g. bias correction after a
    # weight quantizer); the planner never samples it without one of them earlier in the plan.
    must_follow: ClassVar[frozenset[str]] = frozenset()
    # (low, high) recovery epochs the search should consider when this technique is in a plan;
    # None keeps the planner's default range.
    recovery_epochs: ClassVar[tuple[int, int] | None] = None
    # What the technique needs from the search, a subset of REQUIREMENTS; the planner leaves it
    # out where that is not available (e.g. "gpu" on a CPU search).
    requires: ClassVar[frozenset[str]] = frozenset()

    # --- search ----------------------------------------------------------------------------------
    def suggest(self, space: Suggester, task: Task) -> Any:
        """Return a ``Config`` built from define-by-run suggestions on ``space``."""
        raise PluginError(f"technique {self.name!r} does not implement suggest()")

    # --- compression -----------------------------------------------------------------------------
    def apply(self, model: nn.Module, config: Any, ctx: TechniqueContext) -> nn.Module:
        """Compress ``model`` (in place or not) and return the module to continue with."""
        raise PluginError(f"technique {self.name!r} does not implement apply()")

    def after_optimizer_step(self, model: nn.Module, config: Any, ctx: TechniqueContext) -> None:
        """Re-impose the technique's constraint after each recovery-training step (e.g. masks)."""

    def training_loss(self, model: nn.Module, batch: Any, loss: torch.Tensor, config: Any,
                      ctx: TechniqueContext) -> torch.Tensor:
        """Return the recovery loss to optimise, given the loss so far (task cross-entropy, or
        what earlier techniques made of it).  ``batch`` is a ``core.recovery.TrainingBatch``.
        Distillation mixes in its term here.  Default: unchanged."""
        return loss

    def recovery_parameters(self, model: nn.Module, config: Any, ctx: TechniqueContext) -> Iterable[torch.Tensor]:
        """Extra tensors recovery training should optimise besides ``model.parameters()``, e.g.
        the feature regressors of hint distillation.  They live in ``ctx`` (never in the model),
        so they are trained but not saved: the artifact is the model's state_dict.  Called once
        per ``recover`` call, after the model is on the training device; a technique moves its
        tensors there itself.  Default: none."""
        return ()

    # --- artifact --------------------------------------------------------------------------------
    def restore_structure(
        self, model: nn.Module, config: Any, example_inputs: tuple[torch.Tensor, ...], structure: dict[str, Any]
    ) -> nn.Module:
        """Give an untrained copy of the base architecture the *structure* ``apply`` leaves
        (module types, shapes), so the artifact's tensors load into it.  Values are not needed:
        every tensor comes from the artifact.  ``structure`` is what ``apply`` put in
        ``ctx.structure``.  Default: the technique changes no structure."""
        return model

    @classmethod
    def conflicts_with(cls, earlier: type[Technique]) -> bool:
        """True when ``cls`` may not come after ``earlier`` in one plan (either side may say so)."""
        return earlier.name in cls.cannot_follow or cls.name in earlier.cannot_precede

    # --- config helpers --------------------------------------------------------------------------
    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = set(values) - known
        if unknown:
            raise UnknownNameError(f"{cls.name} option", sorted(unknown)[0], known)
        try:
            return cls.Config(**values)
        except TypeError as exc:  # missing or wrongly typed argument
            raise ConfigError(f"{cls.name}: {exc}") from None

    @staticmethod
    def config_to_dict(config: Any) -> dict[str, Any]:
        return dataclasses.asdict(config)


@dataclass(frozen=True)
class RegisteredTechnique:
    cls: type[Technique]
    source: str  # distribution that provided it, e.g. "slimforge 0.1.0" or "slimforge-foo 1.2"


class TechniqueUnavailableError(UnknownNameError):
    """A technique name that is not registered, said together with why: the plugin that provides
    it is installed but failed to load, or (when the name is not known) which plugins did."""

    def __init__(self, name: str, choices, message: str):
        super().__init__("technique", name, choices)
        self.args = (message,)


class TechniqueRegistry:
    """Typed registry filled by the ``slimforge_register_techniques`` hook."""

    _REQUIRED = ("name", "family", "stage", "Config")

    def __init__(self) -> None:
        self._entries: dict[str, RegisteredTechnique] = {}
        self.current_source = "unknown"  # set by the plugin manager around each plugin's hook call
        # Set by the plugin manager: plugins that failed to load, ``{plugin: reason}``, and the
        # technique names each is known to provide, ``{technique: plugin}`` (the names its module
        # defines, or the entry-point name), so a request for one is answered with the cause.
        self.failed_plugins: dict[str, str] = {}
        self.failed_techniques: dict[str, str] = {}

    def add(self, cls: type[Technique]) -> None:
        missing = [attr for attr in self._REQUIRED if not hasattr(cls, attr)]
        if missing:
            raise PluginError(f"technique class {cls.__qualname__} lacks {', '.join(missing)}")
        if not (isinstance(cls.family, str) and cls.family):
            raise PluginError(f"technique {cls.name!r}: family must be a Family or a non-empty string, got {cls.family!r}")
        if isinstance(cls.stage, bool) or not isinstance(cls.stage, int):
            raise PluginError(f"technique {cls.name!r}: stage must be a Stage or an int, got {cls.stage!r}")
        if not (dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen):
            raise PluginError(f"technique {cls.name!r}: Config must be a frozen dataclass")
        unknown = set(cls.requires) - REQUIREMENTS
        if unknown:
            raise PluginError(f"technique {cls.name!r} requires unknown {sorted(unknown)}; valid: {sorted(REQUIREMENTS)}")
        if cls.name in self._entries and self._entries[cls.name].cls is not cls:
            other = self._entries[cls.name].source
            raise PluginError(f"technique name {cls.name!r} registered twice ({other} and {self.current_source})")
        self._entries[cls.name] = RegisteredTechnique(cls, self.current_source)

    def remove(self, names) -> None:
        for name in names:
            self._entries.pop(name, None)

    def get(self, name: str) -> Technique:
        try:
            return self._entries[name].cls()
        except KeyError:
            pass
        if name in self.failed_techniques:
            plugin = self.failed_techniques[name]
            raise TechniqueUnavailableError(name, self._entries, f"technique {name!r}: installed but failed to load: "
                                            f"plugin {plugin!r} ({self.failed_plugins[plugin]})")
        if self.failed_plugins:
            error = UnknownNameError("technique", name, self._entries)
            broken = ", ".join(f"{plugin!r} ({reason})" for plugin, reason in self.failed_plugins.items())
            raise TechniqueUnavailableError(name, self._entries, f"{error}; plugins that failed to load: {broken}")
        raise UnknownNameError("technique", name, self._entries) from None

    def source_of(self, name: str) -> str:
        return self._entries[name].source

    def names(self) -> list[str]:
        return sorted(self._entries)

    def classes(self) -> list[type[Technique]]:
        return [self._entries[n].cls for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
