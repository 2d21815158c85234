"""The technique contract: what a compression plugin implements.

A technique is a class, not an instance with state: its configuration is a frozen dataclass, and
everything a trial learns while applying it (masks, calibration statistics) lives in the
per-trial ``TechniqueContext``.  That keeps techniques safe to reuse across trials and processes.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
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
    SCALING = "scaling"  # function-preserving per-channel rescaling before a quantizer (AWQ)


class Stage(enum.IntEnum):
    """Order of techniques in a plan; what each range of stages triggers is ``stage_phase``.

    - below ``SHARING`` (45): structural steps (student, pruning, factorization, sparsity), applied
      to the teacher's copy before recovery training;
    - ``SHARING`` .. 47: sharing steps (clustering, merging); after an earlier structural step the
      planner may add a retrain-before-sharing phase (``retrains_before_sharing``);
    - ``TRAINING`` .. 49: steps that change only how recovery trains (distillation losses);
    - ``RECOVERY`` (50) and above: finishing steps, applied to the trained model; nothing
      fine-tunes after them, so such a technique may not declare ``needs_recovery``.

    A plan is fine-tuned (``recovery.epochs`` searched) only when one of its techniques declares
    ``needs_recovery = True``."""

    STUDENT_INIT = 10
    PRUNING = 20
    FACTORIZATION = 30
    SPARSITY = 40
    SHARING = 45  # before recovery: shared centroids / merged filters are fine-tuned
    TRAINING = 48  # changes only how recovery trains (distillation losses); structure untouched
    RECOVERY = 50
    SCALING = 65  # finishing: rescales the trained weights for the quantizer that follows
    QUANTIZATION = 70


def retrains_before_sharing(stages) -> bool:
    """Whether a plan with steps at these stages has a phase to retrain before sharing: a sharing
    step (clustering, merging) after an earlier structural one (student, pruning, factorization,
    sparsity), as in Deep Compression's prune -> retrain -> cluster."""
    stages = list(stages)
    return any(s < Stage.SHARING for s in stages) and any(Stage.SHARING <= s < Stage.TRAINING for s in stages)


def stage_phase(stage: int) -> str:
    """What a step at ``stage`` takes part in (see ``Stage``): ``"structural"``, ``"sharing"``,
    ``"training"`` or ``"finishing"``."""
    if stage < Stage.SHARING:
        return "structural"
    if stage < Stage.TRAINING:
        return "sharing"
    return "training" if stage < Stage.RECOVERY else "finishing"


def needs_fine_tuning(technique: type[Technique] | Technique) -> bool:
    """Whether ``technique`` is useful only in a plan that fine-tunes: it declares
    ``needs_recovery`` (it leaves the model needing recovery training), or its stage is a
    training-only one (it changes only how recovery trains, e.g. a distillation loss).  A search
    without fine-tuning (``--no-finetune``) plans only the techniques for which this is False, so a
    third-party one-shot technique joins it by its declarations alone."""
    return bool(technique.needs_recovery) or stage_phase(technique.stage) == "training"


# A technique's name is a parameter prefix (``magnitude_pruning.sparsity.fc1``) and an item of
# comma-separated flags (``--techniques a,b``), so it may hold neither dots nor commas.
TECHNIQUE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def json_round_trip_problem(technique: type[Technique], config: Any) -> str | None:
    """Why ``config`` does not come back equal from a JSON round trip of ``config_to_dict`` (plans
    and artifact headers are JSON: a tuple comes back as a list, a set not at all), naming the
    first field at fault; None when it does."""
    values = technique.config_to_dict(config)
    for name, value in values.items():
        try:
            again = json.loads(json.dumps(value))
        except (TypeError, ValueError) as exc:
            return f"config field {name!r} is not JSON ({exc})"
        if again != value or type(again) is not type(value):
            return (f"config field {name!r} = {value!r} comes back from JSON as {again!r}; use a JSON type "
                    "(list, dict, str, number, bool, None) or convert it in __post_init__")
    try:
        rebuilt = technique.config_from_dict(json.loads(json.dumps(values)))
    except Exception as exc:
        return f"config does not rebuild from its JSON ({type(exc).__name__}: {exc})"
    if rebuilt != config:
        fields = [f.name for f in dataclasses.fields(config) if getattr(rebuilt, f.name) != getattr(config, f.name)]
        return f"config field {fields[0] if fields else '?'!r} differs after a JSON round trip"
    return None


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
    """Per-trial, per-technique scratch space handed to every technique method.

    ``device`` is the search's device (``--device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``).  Structural
    and training-stage steps get the model there; finishing steps (stage >= ``Stage.RECOVERY``) get
    it on the CPU, where the artifact is written.  A technique that computes with its own tensors
    (calibration batches, a regressor) puts them on the model's device, not on ``ctx.device``."""

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
    # True when the technique leaves the model in need of recovery training (e.g. pruning): the
    # planner then searches recovery epochs for the plan.  Only for stages below Stage.RECOVERY
    # (checked at registration): nothing trains after a finishing step.
    needs_recovery: ClassVar[bool] = False
    # Composition rules the planner honours: technique names this one may not come after / before
    # in a plan (e.g. int8 quantization cannot follow k-means clustering: the clustered layers are
    # no longer plain Linear/Conv modules).
    cannot_follow: ClassVar[frozenset[str]] = frozenset()
    cannot_precede: ClassVar[frozenset[str]] = frozenset()
    # Non-empty: the technique is only useful after one of these (e.g. bias correction after a
    # weight quantizer); the planner never samples it without one of them earlier in the plan.
    must_follow: ClassVar[frozenset[str]] = frozenset()
    # Non-empty: the technique is only useful before one of these (e.g. activation-aware scaling
    # before a weight quantizer, which alone compresses nothing); the planner samples it only
    # together with one of them later in the plan.
    must_precede: ClassVar[frozenset[str]] = frozenset()
    # (low, high) recovery epochs the search should consider when this technique is in a plan;
    # None keeps the planner's default range.
    recovery_epochs: ClassVar[tuple[int, int] | None] = None
    # What the technique needs from the search, a subset of REQUIREMENTS; the planner leaves it
    # out where that is not available (e.g. "gpu" on a CPU search).
    requires: ClassVar[frozenset[str]] = frozenset()

    # --- search ----------------------------------------------------------------------------------
    def suggest(self, space: Suggester, task: Task) -> Any:
        """Return a ``Config`` built from define-by-run suggestions on ``space`` (a ``Suggester``):
        ``space.suggest_int(name, low, high, *, step=1, log=False)``, ``space.suggest_float(name,
        low, high, *, step=None, log=False)`` (``step`` and ``log`` exclusive, as in Optuna),
        ``space.suggest_categorical(name, choices)`` with JSON-scalar choices.  ``space`` prefixes
        every name with the technique's name (``"sparsity"`` is searched as
        ``magnitude_pruning.sparsity``), so names only need to be unique within the technique, and
        the same name must keep the same range every time.  The returned config must survive a
        JSON round trip of ``config_to_dict`` (``json_round_trip_problem``): plans are JSON."""
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


def _check_suggest(cls: type[Technique]) -> None:
    """``suggest`` is called as ``technique.suggest(space, task)``: say so at registration rather
    than with a TypeError in the first trial."""
    try:
        inspect.signature(cls.suggest).bind(None, None, None)
    except TypeError:
        raise PluginError(f"technique {cls.name!r}: suggest must take (self, space, task), "
                          f"got suggest{inspect.signature(cls.suggest)}") from None
    except ValueError:  # no signature to inspect (a builtin): nothing to check
        pass


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
        """Register ``cls`` after checking the rules the search relies on; a broken rule is a
        one-line ``PluginError`` naming the technique and the attribute or config field."""
        missing = [attr for attr in self._REQUIRED if not hasattr(cls, attr)]
        if missing:
            raise PluginError(f"technique class {cls.__qualname__} lacks {', '.join(missing)}")
        if not (isinstance(cls.name, str) and TECHNIQUE_NAME.fullmatch(cls.name)):
            raise PluginError(f"technique class {cls.__qualname__}: name must be lower-case letters, digits and "
                              f"underscores, starting with a letter (it prefixes parameter names), got {cls.name!r}")
        if not (isinstance(cls.family, str) and cls.family):
            raise PluginError(f"technique {cls.name!r}: family must be a Family or a non-empty string, got {cls.family!r}")
        if isinstance(cls.stage, bool) or not isinstance(cls.stage, int):
            raise PluginError(f"technique {cls.name!r}: stage must be a Stage or an int, got {cls.stage!r}")
        if not (dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen):
            raise PluginError(f"technique {cls.name!r}: Config must be a frozen dataclass")
        if cls.needs_recovery and cls.stage >= Stage.RECOVERY:
            raise PluginError(f"technique {cls.name!r}: needs_recovery is True but stage {cls.stage} runs after "
                              f"recovery training (stages >= {int(Stage.RECOVERY)} are finishing steps), so nothing "
                              "would fine-tune its result; use a stage below 50 or needs_recovery = False")
        _check_suggest(cls)
        try:
            default = cls.Config()
        except Exception:  # a config without defaults for every field: the kit checks suggested ones
            default = None
        problem = default is not None and json_round_trip_problem(cls, default)
        if problem:
            raise PluginError(f"technique {cls.name!r}: default {problem}")
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
