"""torchvision task presets for the GPU-sized work users bring: ``--task torchvision:MODEL:DATASET``.

Models: resnet18 and mobilenet_v3_small, adapted to small images (3x3 stride-1 stem, no early
max-pool; first conv accepts the dataset's channel count).  Datasets: mnist, fashionmnist, cifar10
read from ``--data-dir``; ``fakedata`` (torchvision's FakeData, for tests and smoke runs).  The
official training split is divided 90/10 (seeded) into train/val; the official test split is test.

Nothing is downloaded unless ``download=True`` (``--download``); when the files are missing the error
says where torchvision expects them.  The teacher is trained on first use for ``teacher_epochs``
and cached like the embedded task's (tensor-only file, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from slimforge.core.errors import TaskError, UnknownNameError
from slimforge.core.outputs import task_loss
from slimforge.core.task import FactoryRef, Task

DATASETS = {  # name -> (torchvision class name, channels, image size, classes, mean, std)
    "mnist": ("MNIST", 1, 28, 10, (0.1307,), (0.3081,)),
    "fashionmnist": ("FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fakedata": ("FakeData", 3, 16, 10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # tiny: smoke runs and tests
}
MODELS = ("resnet18", "mobilenet_v3_small")
VAL_FRACTION, SPLIT_SEED = 0.1, 1234


def preset_model(model: str, dataset: str) -> nn.Module:
    """Architecture factory (untrained); artifacts of preset tasks rebuild through it."""
    import torchvision

    if model not in MODELS:
        raise UnknownNameError("preset model", model, MODELS)
    if dataset not in DATASETS:
        raise UnknownNameError("preset dataset", dataset, DATASETS)
    _, channels, _, classes, _, _ = DATASETS[dataset]
    if model == "resnet18":
        net = torchvision.models.resnet18(num_classes=classes)
        # Small images: a 7x7 stride-2 stem plus max-pool would leave 1x1 maps before layer4.
        net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net = torchvision.models.mobilenet_v3_small(num_classes=classes)
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return net


def _dataset(name: str, data_dir: Path, train: bool, download: bool):
    import torchvision
    from torchvision import transforms

    cls_name, channels, size, classes, mean, std = DATASETS[name]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    if name == "fakedata":
        return torchvision.datasets.FakeData(size=128 if train else 32, image_size=(channels, size, size),
                                             num_classes=classes, transform=transform, random_offset=0 if train else 10_000)
    try:
        return getattr(torchvision.datasets, cls_name)(str(data_dir), train=train, download=download, transform=transform)
    except RuntimeError as exc:
        hint = "pass --download where the network allows it" if not download else "the download failed (no network?)"
        raise TaskError(f"dataset {name!r}: not found under {data_dir} ({exc}); place torchvision's {cls_name} "
                        f"files there or {hint}") from None
    except OSError as exc:
        raise TaskError(f"dataset {name!r}: could not be downloaded into {data_dir}: {exc}") from None


def _train(model: nn.Module, dataset, epochs: int, device: str, log) -> nn.Module:
    torch.manual_seed(0)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loader = DataLoader(dataset, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=max(1, epochs * len(loader)))
    for epoch in range(epochs):
        for x, y in loader:
            loss = task_loss(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        log(f"  teacher epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}")
    return model.to("cpu").eval()


def torchvision_task(model: str, dataset: str, data_dir: str = "data", download: bool = False,
                     teacher_epochs: int = 5, device: str = "cpu") -> Task:
    from slimforge.core.artifact import read_artifact, write_artifact
    from slimforge.core.embedded import cache_dir

    preset_model(model, dataset)  # validates both names before touching data
    root = Path(data_dir).expanduser()
    full_train = _dataset(dataset, root, True, download)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val = max(1, int(len(order) * VAL_FRACTION))
    splits = {"train": Subset(full_train, order[n_val:]), "val": Subset(full_train, order[:n_val]),
              "test": _dataset(dataset, root, False, download)}
    kwargs = {"model": model, "dataset": dataset, "data_dir": str(root), "download": download,
              "teacher_epochs": teacher_epochs}

    def teacher() -> nn.Module:
        log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        key = hashlib.sha256(json.dumps([model, dataset, teacher_epochs, len(full_train), SPLIT_SEED]).encode()).hexdigest()[:12]
        path = cache_dir() / "teachers" / f"{model}-{dataset}-{key}.slim"
        net = preset_model(model, dataset)
        if path.exists():
            net.load_state_dict(read_artifact(path)[1])
            log(f"teacher: loaded cached {model} from {path}")
            return net.eval()
        log(f"teacher: training {model} on {dataset} for {teacher_epochs} epoch(s) on {device}; cache: {path}")
        net = _train(net, splits["train"], teacher_epochs, device, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_artifact(path, net.state_dict(), {"kind": "teacher", "task": f"torchvision:{model}:{dataset}"})
        return net

    return Task(name=f"{model}-{dataset}",
                architecture=FactoryRef("slimforge.core.presets:preset_model", {"model": model, "dataset": dataset}),
                teacher_factory=teacher, splits=splits, source={"builtin": "torchvision", "kwargs": kwargs})


def parse_preset(spec: str, **kwargs) -> Task:
    """``torchvision:MODEL:DATASET`` -> task (kwargs: data_dir, download, teacher_epochs, device)."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise TaskError(f"task {spec!r}: expected torchvision:MODEL:DATASET with MODEL in {', '.join(MODELS)} "
                        f"and DATASET in {', '.join(DATASETS)}")
    return torchvision_task(parts[1], parts[2], **{k: v for k, v in kwargs.items() if v is not None})
