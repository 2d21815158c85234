"""Tiny, importable models and data for the test suite.

Artifacts rebuild their model through a ``module:function`` reference (``FactoryRef``), so the
factories tests use must be importable by module path: ``tests/conftest.py`` puts this folder on
``sys.path``, which makes ``sf_testing_models:tiny_cnn`` resolve in the test process, and task
configs written by tests list this folder in ``python_path`` so subprocesses resolve it too.

Everything is seeded: every call, in every process, builds the same data and the same weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimforge.core.hookspecs import hookimpl
from slimforge.core.task import FactoryRef, Task

TESTS_DIR = Path(__file__).resolve().parent
NUM_CLASSES = 4
SPLIT_SIZES = {"train": 256, "val": 128, "test": 128}
DATA_SEED = 1234


class TinyCNN(nn.Module):
    """conv 8@3x3 -> ReLU -> fc 32 -> ReLU -> fc 4 on 1x8x8 inputs (about 10k parameters).

    Plain modules, no data-dependent control flow: torch.fx traces it, so int8_ptq applies.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.fc2(self.relu2(self.fc1(self.flatten(self.relu(self.conv(x))))))


def tiny_cnn() -> TinyCNN:
    """Architecture factory: untrained, seeded without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyCNN().eval()


@functools.cache
def _tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    out = {}
    for name, size in SPLIT_SIZES.items():
        x = torch.randn(size, 1, 8, 8, generator=generator)
        # The label is the brightest quadrant: learnable by a conv net, so accuracies are not noise.
        quadrants = torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 0, :4, 4:].mean((1, 2)),
                                 x[:, 0, 4:, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))], dim=1)
        out[name] = (x, quadrants.argmax(dim=1))
    return out


def tiny_splits() -> dict[str, TensorDataset]:
    """Fresh ``{"train", "val", "test"}`` TensorDatasets of seeded random images."""
    return {name: TensorDataset(x, y) for name, (x, y) in _tensors().items()}


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    # One thread: on a busy 2-core machine, extra threads make steps this small 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tiny_cnn().train()
            x, y = _tensors()["train"]
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(60):  # full-batch steps: a few milliseconds each
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_tiny_cnn() -> TinyCNN:
    """The teacher: ``tiny_cnn`` fitted to the training split (cached per process)."""
    model = tiny_cnn()
    model.load_state_dict(_trained_state())
    return model.eval()


def broken_model():
    """A model factory that fails the way user code does."""
    raise RuntimeError("checkpoint weights.pt not found")


def task_table(model: str = "sf_testing_models:trained_tiny_cnn") -> dict:
    """The ``[task]`` table of a config describing the tiny task."""
    return {"name": "tiny", "model": model, "data": "sf_testing_models:tiny_splits",
            "python_path": [str(TESTS_DIR)]}


def task_toml(model: str = "sf_testing_models:trained_tiny_cnn", extra: str = "") -> str:
    """TOML text of a task config for the tiny task (``extra`` is appended verbatim)."""
    table = task_table(model)
    return (f'[task]\nname = "{table["name"]}"\nmodel = "{table["model"]}"\ndata = "{table["data"]}"\n'
            f'python_path = ["{TESTS_DIR.as_posix()}"]\n{extra}')


def tiny_task() -> Task:
    """The tiny task as a Python object; its ``source`` lets ``slimforge evaluate`` rebuild it."""
    return Task(
        name="tiny",
        architecture=FactoryRef("sf_testing_models:tiny_cnn"),
        teacher_factory=trained_tiny_cnn,
        splits=tiny_splits(),
        source={"config": task_table(), "base_dir": str(TESTS_DIR)},
    )


class Registers:
    """A plugin object, as a third-party package would register, that adds the given technique
    classes (pass it to ``Plugins(extra_plugins=...)``)."""

    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def slimforge_register_techniques(self, registry):
        for cls in self.classes:
            registry.add(cls)
