"""A "bring your own model" task: a small CNN on scikit-learn's 8x8 digits.

Everything here is what a user would already have before trying slimforge: a trained model, their
data split, and the metric they report.  slimforge only needs three importable factories:

* ``build_model()``  -> the trained ``nn.Module`` to compress (the teacher)
* ``build_data()``   -> ``{"train", "val", "test"}`` map-style datasets of ``(input, label)``
* ``macro_f1(outputs, targets) -> float`` -> the metric, higher is better

The data is ``sklearn.datasets.load_digits`` (1,797 images), which ships inside scikit-learn, so
nothing is downloaded.  Training is seeded and takes about two seconds on one CPU core.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.data import TensorDataset

SEED = 0
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
TRAIN_RECIPE = {"epochs": 4, "batch_size": 64, "lr": 3e-3}


class DigitsCNN(nn.Module):
    """conv 16@3x3 -> conv 32@3x3 -> pool -> fc 128 -> fc 10 (about 72k parameters, ~290 KB fp32).

    Written with plain modules and no data-dependent control flow, so ``torch.fx`` can trace it
    (int8 quantization works on the traced graph).  The 512->128 Linear holds most of the
    weights, which is what pruning and int8 shrink.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    return x, y


@functools.cache
def _split_indices() -> dict[str, torch.Tensor]:
    """Stratified, seeded split: every call (and every process) gets the same examples."""
    from sklearn.model_selection import train_test_split

    _, y = _digits()
    index = torch.arange(len(y)).numpy()
    train, rest = train_test_split(index, train_size=SPLIT_FRACTIONS["train"], stratify=y.numpy(), random_state=SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=y.numpy()[rest], random_state=SEED)
    return {"train": torch.from_numpy(train), "val": torch.from_numpy(val), "test": torch.from_numpy(test)}


def _with_shifts(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images plus copies moved one pixel up, down, left and right (5x the examples)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    moved = [padded[..., dy:dy + 8, dx:dx + 8] for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2))]
    return torch.cat([x, *moved]), y.repeat(1 + len(moved))


def build_data() -> dict[str, TensorDataset]:
    """Seeded stratified 60/20/20 split; only the training split is augmented.

    1,078 training images are only 17 batches an epoch: too few steps for a heavily pruned model
    to recover in the few fine-tuning epochs a search trial gets.  Shifted copies give the
    teacher and every trial's fine-tuning five times the steps, and validation and test stay
    untouched real digits.
    """
    x, y = _digits()
    splits = {name: (x[idx], y[idx]) for name, idx in _split_indices().items()}
    splits["train"] = _with_shifts(*splits["train"])
    return {name: TensorDataset(*tensors) for name, tensors in splits.items()}


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    # Cached per process: the config loader also uses build_model to rebuild the architecture of
    # every artifact it loads, and retraining each time would be wasted work.
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    x, y = build_data()["train"].tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_RECIPE["lr"])
    # Batches this small run fastest on one thread; on a busy machine extra threads mostly wait
    # for each other (measured: about 2 s on one thread, 10 s or more with two threads on busy cores).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(TRAIN_RECIPE["epochs"]):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(order), TRAIN_RECIPE["batch_size"]):
                batch = order[start:start + TRAIN_RECIPE["batch_size"]]
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(previous_threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_model(pretrained: bool = True) -> DigitsCNN:
    """The trained model; ``pretrained=False`` gives the bare architecture (no training)."""
    model = DigitsCNN()
    if pretrained:
        model.load_state_dict(_trained_state())
    return model.eval()


def macro_f1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 scores: a rare class counts as much as a common one."""
    from sklearn.metrics import f1_score

    predictions = outputs.argmax(dim=1)
    return float(f1_score(targets.numpy(), predictions.numpy(), average="macro", zero_division=0))


if __name__ == "__main__":  # python examples/user_model.py: train once and print the baseline
    import time

    started = time.perf_counter()
    data = build_data()
    loaded = time.perf_counter()
    model = build_model()
    trained = time.perf_counter()
    with torch.inference_mode():
        for split in ("val", "test"):
            x, y = data[split].tensors
            print(f"{split}: macro-F1 {macro_f1(model(x), y):.4f} on {len(y)} digits")
    params = sum(p.numel() for p in model.parameters())
    print(f"{params} parameters ({params * 4 / 1000:.1f} KB as float32); data {loaded - started:.2f} s, "
          f"training on {len(data['train'])} examples {trained - loaded:.2f} s")
