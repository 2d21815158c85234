"""A Hugging Face model the way its users hold it: a folder written by ``save_pretrained``.

This file plays the user's side: it builds a tiny BERT sequence classifier from a ``BertConfig``
(no hub download), trains it briefly, and saves it with ``save_pretrained``.  slimforge then
compresses that folder through ``examples/hf_task.toml``::

    python examples/hf_model.py                     # writes examples/hf-bert/ (about a minute on 2 cores)
    slimforge search --config examples/hf_task.toml
    slimforge evaluate slimforge-out/artifacts/<study>/trial-0001.slim

The task: is a 48-character snippet English prose from the Python documentation
(``pydoc_data.topics``, shipped with Python) or Python source code (a few standard-library modules,
also shipped with Python)?  Characters are token ids (``ord``, capped at 127), so no tokenizer is
needed.  ``build_data`` is the ``data`` factory the TOML names: seeded, balanced, and split by
contiguous blocks of snippets so held-out snippets do not overlap training text.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

WINDOW = 48
BLOCK = 16  # snippets per block; whole blocks go to one split
SEED = 0
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
CODE_MODULES = ("argparse", "textwrap", "json.decoder", "json.encoder", "string", "shlex", "fractions",
                "statistics", "dataclasses", "difflib")
CONFIG = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 128, "max_position_embeddings": WINDOW, "num_labels": 2,
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
DEFAULT_DIR = Path(__file__).resolve().parent / "hf-bert"


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(ch), 127) for ch in text], dtype=torch.int64)


@functools.cache
def _texts() -> tuple[str, str]:
    import importlib

    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[key] for key in sorted(topics))
    code = "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)
    return prose, code


def build_data(max_blocks_per_class: int = 200) -> dict[str, TensorDataset]:
    """``{"train", "val", "test"}`` of ``(input_ids (48,), label)``: label 0 prose, 1 code."""
    generator = torch.Generator().manual_seed(SEED)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in SPLIT_FRACTIONS}
    for label, text in enumerate(_texts()):
        ids = _ids(text)
        n_blocks = min(len(ids) // (WINDOW * BLOCK), max_blocks_per_class)
        blocks = ids[:n_blocks * WINDOW * BLOCK].reshape(n_blocks, BLOCK, WINDOW)
        order = torch.randperm(n_blocks, generator=generator)
        start = 0
        for i, (name, fraction) in enumerate(SPLIT_FRACTIONS.items()):
            count = n_blocks - start if i == len(SPLIT_FRACTIONS) - 1 else round(n_blocks * fraction)
            chosen = blocks[order[start:start + count]].reshape(-1, WINDOW)
            parts[name].append((chosen, torch.full((len(chosen),), label, dtype=torch.int64)))
            start += count
    splits = {}
    for name, pieces in parts.items():
        x, y = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
        order = torch.randperm(len(x), generator=generator)
        splits[name] = TensorDataset(x[order], y[order])
    return splits


def train_and_save(out_dir: str | Path = DEFAULT_DIR, epochs: int = 2, max_blocks_per_class: int = 200,
                   lr: float = 1e-3, log=print) -> Path:
    """Train the tiny BERT on ``build_data``'s training split and ``save_pretrained`` it."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    train = build_data(max_blocks_per_class)["train"]
    x, y = train.tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]).logits, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder to save_pretrained into")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    path = train_and_save(args.out, args.epochs)
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    with torch.inference_mode():
        for split in ("val", "test"):
            xs, ys = build_data()[split].tensors
            accuracy = (reloaded(xs).logits.argmax(dim=1) == ys).float().mean().item()
            print(f"{split}: accuracy {accuracy:.4f} on {len(ys)} snippets")
    print(f"saved to {path}")
