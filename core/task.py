"""Tasks: what to compress.  Built-in and user tasks are the same type.

A user task is a TOML file whose ``[task]`` table points at ``module:function`` factories::

    [task]
    name = "my-digits"
    model = "mypkg.models:trained_model"   # -> trained nn.Module (the teacher)
    architecture = "mypkg.models:net"      # optional: -> untrained module of the same architecture
    data = "mypkg.data:splits"             # -> {"train", "val", "test"[, "calibration"]} datasets
    metric = "mypkg.metrics:accuracy"      # optional: (outputs, targets) -> float, higher is better

An artifact rebuilds the architecture before loading its tensors through ``architecture`` (default:
the ``model`` factory, which may retrain); it must be importable wherever the artifact is loaded.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimforge.core.errors import ConfigError, SlimforgeError, TaskError, UnknownNameError

REQUIRED_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FactoryRef:
    """An importable ``module:function`` with keyword arguments; JSON-serialisable."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolve(self, field_name: str = "factory") -> Callable[..., Any]:
        module_name, sep, attr = self.target.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(f"{field_name}: expected 'module:function', got {self.target!r}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TaskError(f"{field_name}: cannot import module {module_name!r} ({exc})") from None
        try:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(f"{field_name}: module {module_name!r} has no attribute {attr!r}") from None
        return obj

    def call(self, field_name: str = "factory") -> Any:
        factory = self.resolve(field_name)
        try:
            return factory(**self.kwargs)
        except Exception as exc:  # user code: report it on one line, keep the type name
            raise TaskError(f"{field_name}: {self.target} raised {type(exc).__name__}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": self.kwargs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactoryRef:
        return cls(data["target"], dict(data.get("kwargs", {})))


def accuracy(outputs, targets) -> float:
    """The default metric: top-1 accuracy of class scores ``(N, C)`` against targets ``(N,)``, or per
    token for sequence scores ``(N, T, V)`` against ``(N, T)`` (``core.outputs.accuracy``)."""
    from slimforge.core.outputs import accuracy as top1  # torch stays unimported until a metric runs

    return top1(outputs, targets)


@dataclass
class Task:
    """A model to compress with its data, metric and the inputs latency is timed on.

    ``architecture`` rebuilds the (untrained) model structure when an artifact is loaded;
    ``teacher`` is the trained original that compression starts from.
    """

    name: str
    architecture: FactoryRef
    teacher_factory: Callable[[], Any]
    splits: dict[str, Any]
    metric: Callable[[Any, Any], float] = accuracy
    metric_name: str = "accuracy"
    source: dict[str, Any] = field(default_factory=dict)  # how to rebuild this task (for artifacts)
    _teacher: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        missing = [s for s in REQUIRED_SPLITS if s not in self.splits]
        if missing:
            raise TaskError(f"task {self.name!r}: data is missing split(s) {missing}; need {list(REQUIRED_SPLITS)}")
        for split, dataset in self.splits.items():
            try:
                size = len(dataset)
            except TypeError:
                raise TaskError(f"task {self.name!r}: split {split!r} has no len(); give a map-style Dataset") from None
            if size == 0:
                raise TaskError(f"task {self.name!r}: split {split!r} is empty")

    @property
    def teacher(self):
        """The trained original model, built once on first use."""
        if self._teacher is None:
            from torch import nn

            model = self.teacher_factory()
            if not isinstance(model, nn.Module):
                raise TaskError(f"task {self.name!r}: model factory returned {type(model).__name__}, not a torch.nn.Module")
            self._teacher = model.eval()
        return self._teacher

    def split(self, name: str):
        if name not in self.splits:
            raise UnknownNameError("split", name, self.splits)
        return self.splits[name]

    @property
    def calibration(self):
        """Data for post-training calibration: a dedicated split if given, else training data."""
        return self.splits.get("calibration", self.splits["train"])

    def check_batch(self, split: str = "train", size: int = 8) -> None:
        """Check the data against the model on one batch of ``split``, before any work: the model
        runs on it, and its targets are what the training loss (cross-entropy,
        ``core.outputs.task_loss``) needs: integer class indices of the scores' shape without the
        class dimension, each a class the model scores (or ``IGNORE_INDEX``).  Float labels would
        otherwise pass the baseline's accuracy and fail every trial's fine-tuning."""
        import torch
        from torch.utils.data import default_collate

        from slimforge.core.outputs import IGNORE_INDEX, flat_scores, logits_of

        dataset = self.split(split)
        where = f"task {self.name!r}: split {split!r}"
        try:
            inputs, targets = default_collate([dataset[i] for i in range(min(size, len(dataset)))])[:2]
            device = next(self.teacher.parameters(), torch.empty(0)).device
            with torch.no_grad():
                outputs = self.teacher(inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs)
            logits = logits_of(outputs)
            targets = targets.to(logits.device) if isinstance(targets, torch.Tensor) else targets
        except SlimforgeError:
            raise
        except Exception as exc:
            raise TaskError(f"{where}: the uncompressed model fails on a batch of it: {_one_line(exc)}") from exc
        if not isinstance(targets, torch.Tensor):
            raise TaskError(f"{where}: targets are {type(targets).__name__}; give class indices as tensors")
        try:
            scores, flat = flat_scores(logits, targets)
        except ValueError as exc:
            raise TaskError(f"{where}: {exc}") from None
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise TaskError(f"{where}: targets are {targets.dtype}; the training loss needs integer class indices "
                            "(torch.long), e.g. labels.long()")
        classes, given = scores.shape[-1], flat[flat != IGNORE_INDEX]
        if given.numel() and (int(given.min()) < 0 or int(given.max()) >= classes):
            bad = int(given.min()) if int(given.min()) < 0 else int(given.max())
            raise TaskError(f"{where}: target {bad} is no class of the model, which scores {classes} classes "
                            f"(0 to {classes - 1}; {IGNORE_INDEX} marks a position to ignore)")
        try:
            self.metric(outputs, targets)  # a metric that returns NaN says so itself (``_checked_metric``)
        except SlimforgeError:
            raise
        except Exception as exc:
            raise TaskError(f"{where}: the metric {self.metric_name!r} fails on a batch of it: {_one_line(exc)}") from exc

    def example_inputs(self, batch_size: int = 1):
        """A batch of real inputs from the validation split, used for tracing and latency timing."""
        import torch

        dataset = self.splits["val"]
        items = [dataset[i][0] for i in range(min(batch_size, len(dataset)))]
        return (torch.stack(items),)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0]


# --- loading ------------------------------------------------------------------------------------

# Every built-in task: its name -> the ``module:function`` that builds it (keyword arguments: the
# flags that apply to it, e.g. ``cache``).  A new built-in task is one entry here.  The factories
# are named, not imported: the modules that define tasks import this one (``Task``), and the type
# must not depend on its instances.  ``torchvision:MODEL:DATASET`` specs go to ``TORCHVISION``.
BUILTIN_TASKS = {
    "mnist-lenet5": "slimforge.core.embedded:mnist_lenet5_task",
    "mnist-lenet300": "slimforge.core.embedded:mnist_lenet300_task",
    "text-chargpt": "slimforge.core.text_task:text_chargpt_task",
    "text-chargpt-tiny": "slimforge.core.text_task:text_chargpt_tiny_task",
}
DEFAULT_TASK = "mnist-lenet5"
TORCHVISION = {"spec": "slimforge.core.presets:parse_preset", "source": "slimforge.core.presets:torchvision_task"}


def builtin_tasks() -> dict[str, Callable[..., Task]]:
    """``BUILTIN_TASKS`` with each factory imported."""
    return {name: FactoryRef(target).resolve(f"task {name!r}") for name, target in BUILTIN_TASKS.items()}


def load_task(spec: str | Path | None = None, **builtin_kwargs: Any) -> Task:
    """Resolve ``spec``: None -> the embedded default; a built-in name; or a TOML config path."""
    spec = str(spec if spec is not None else DEFAULT_TASK)
    if spec in BUILTIN_TASKS:
        return builtin_tasks()[spec](**builtin_kwargs)
    if spec.startswith("torchvision:"):
        return FactoryRef(TORCHVISION["spec"]).resolve("task")(spec, **builtin_kwargs)
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return task_from_config(path)
    raise UnknownNameError("task", spec, [*BUILTIN_TASKS, "torchvision:MODEL:DATASET", "<path to a task .toml>"])


def read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def task_from_config(path: Path) -> Task:
    path = Path(path)
    config = read_toml(path)
    section = config.get("task")
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: missing [task] table with 'model' and 'data' factories")
    return task_from_table(section, base_dir=path.resolve().parent, origin=str(path))


def task_from_table(section: dict[str, Any], base_dir: Path, origin: str,
                    hf_config: dict[str, Any] | None = None) -> Task:
    """``hf_config``: the Hugging Face config a task source recorded (``core.hf``), if any."""
    allowed = {"name", "model", "model_kwargs", "architecture", "architecture_kwargs", "data", "data_kwargs",
               "metric", "metric_name", "python_path", "hf_model", "hf_class"}
    for key in section:
        if key not in allowed:
            raise UnknownNameError("[task] key", key, allowed)
    hf = "hf_model" in section or "hf_class" in section
    for key in ("data",) if hf else ("model", "data"):
        if not isinstance(section.get(key), str):
            raise ConfigError(f"[task] {key}: required, a 'module:function' string")
    for key in ("architecture", "metric", "name", "metric_name"):
        if key in section and not isinstance(section[key], str):
            raise ConfigError(f"[task] {key}: expected a string, got {section[key]!r}")
    for key in ("model_kwargs", "architecture_kwargs", "data_kwargs"):
        if not isinstance(section.get(key, {}), dict):
            raise ConfigError(f"[task] {key}: expected a table of keyword arguments, got {section[key]!r}")
    paths = section.get("python_path", [])
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        raise ConfigError(f"[task] python_path: expected a list of folders, got {paths!r}")
    # Factories usually live next to the config file; make them importable without installing.
    for entry in [base_dir, *(base_dir / p for p in section.get("python_path", []))]:
        if str(entry) not in sys.path:
            sys.path.insert(0, str(entry))
    source: dict[str, Any] = {"config": {k: v for k, v in section.items()}, "base_dir": str(base_dir)}
    if hf:  # a save_pretrained folder: core.hf builds both references (and records the HF config)
        from slimforge.core import hf as hf_support

        model, architecture, source["hf_config"] = hf_support.model_refs(section, base_dir, hf_config)
        model_ref, architecture_ref = FactoryRef(*model), FactoryRef(*architecture)
    else:
        model_ref = FactoryRef(section["model"], dict(section.get("model_kwargs", {})))
        architecture_ref = (FactoryRef(section["architecture"], dict(section.get("architecture_kwargs", {})))
                            if "architecture" in section else model_ref)
    data_ref = FactoryRef(section["data"], dict(section.get("data_kwargs", {})))
    splits = data_ref.call("[task] data")
    if not isinstance(splits, dict):
        raise TaskError(f"[task] data: {data_ref.target} returned {type(splits).__name__}, expected a dict of splits")
    metric, metric_name = accuracy, "accuracy"
    if "metric" in section:
        metric = _checked_metric(FactoryRef(section["metric"]).resolve("[task] metric"))
        metric_name = section.get("metric_name", section["metric"].rpartition(":")[2])
    return Task(
        name=section.get("name", Path(origin).stem),
        architecture=architecture_ref,
        teacher_factory=lambda: _checked_model(model_ref),
        splits=splits,
        metric=metric,
        metric_name=metric_name,
        source=source,
    )


def _checked_model(ref: FactoryRef):
    from torch import nn

    model = ref.call("[task] model")
    if not isinstance(model, nn.Module):
        raise TaskError(f"[task] model: {ref.target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _checked_metric(metric: Callable[[Any, Any], float]) -> Callable[[Any, Any], float]:
    def checked(outputs, targets) -> float:
        value = float(metric(outputs, targets))
        if not math.isfinite(value):
            raise TaskError(f"metric {getattr(metric, '__name__', metric)!r} returned {value}; it must be a finite number")
        return value

    checked.__name__ = getattr(metric, "__name__", "metric")
    return checked


def task_from_source(source: dict[str, Any]) -> Task:
    """Rebuild a task from ``Task.source`` as recorded in an artifact header.  The header may come
    from anywhere, so every field is checked like user input: one line naming it, no traceback."""
    if not isinstance(source, dict):
        raise TaskError(f"artifact task source: expected a table, got {type(source).__name__}")
    if "builtin" in source:
        name = source["builtin"]
        targets = {**BUILTIN_TASKS, "torchvision": TORCHVISION["source"]}
        if not isinstance(name, str) or name not in targets:
            raise UnknownNameError("artifact task source: builtin", name, targets)
        return _call_builtin(name, FactoryRef(targets[name]).resolve(f"task {name!r}"), source.get("kwargs", {}))
    if "config" in source:
        config, base_dir = source["config"], source.get("base_dir")
        if not isinstance(config, dict) or not isinstance(base_dir, str):
            raise TaskError("artifact task source: 'config' must be a [task] table and 'base_dir' a folder name")
        return task_from_table(config, Path(base_dir), origin=str(config.get("name", "task")),
                               hf_config=source.get("hf_config"))
    raise TaskError("artifact does not record how to rebuild its task; pass the task explicitly")


def _call_builtin(name: str, factory: Callable[..., Task], kwargs: Any) -> Task:
    """A built-in task factory called with keyword arguments read from a header: they must be a
    table of plain values naming the factory's own parameters, with every required one given."""
    import inspect

    field_name = f"artifact task source: kwargs of built-in task {name!r}"
    if not isinstance(kwargs, dict):
        raise TaskError(f"{field_name}: expected a table of keyword arguments, got {kwargs!r}")
    parameters = inspect.signature(factory).parameters
    for key, value in kwargs.items():
        if key not in parameters:
            raise UnknownNameError(field_name, key, parameters)
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise TaskError(f"{field_name}: {key} must be a plain value, got {type(value).__name__}")
    missing = [key for key, p in parameters.items() if p.default is inspect.Parameter.empty and key not in kwargs]
    if missing:
        raise TaskError(f"{field_name}: missing {', '.join(missing)}")
    try:
        return factory(**kwargs)
    except SlimforgeError:
        raise
    except Exception as exc:  # a value of the wrong type deep inside the factory: still one line
        raise TaskError(f"{field_name}: {name} raised {type(exc).__name__}: {exc}") from exc
