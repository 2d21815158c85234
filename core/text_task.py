"""The embedded sequence task: a character-level GPT on the Python documentation's topic texts.

- ``text-chargpt``: a GPT-2-shaped causal language model over 96 characters (newline plus printable
  ASCII), built from the torch layers users really have: a token ``nn.Embedding`` plus a learned
  position ``nn.Embedding``, pre-norm ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention``,
  GELU feed-forward) under a causal mask, a final ``LayerNorm`` and a linear language-model head.
- ``text-chargpt-tiny``: the same code at toy size on a slice of the text, for smoke runs and tests
  (its teacher trains in about a second).

The text is ``pydoc_data.topics.topics``, which ships with CPython itself (the texts behind
``help("assert")``), so nothing is downloaded.  It is cut into contiguous blocks that a seeded
shuffle assigns to train / val / test (80/10/10), so held-out windows are text the model never saw,
not neighbours of training windows.  Each block holds whole windows of ``window`` tokens; targets
are the inputs shifted by one character (next-token prediction).  The metric is next-token accuracy
on held-out text (the default ``accuracy`` scores every position of ``(N, T, V)`` logits).

The corpus differs between Python versions, so its SHA-256 is part of the teacher's cache key:
another interpreter trains (and caches) its own teacher on its own split.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimforge.core.task import FactoryRef, Task

# Newline plus the 95 printable ASCII characters: a fixed vocabulary, whatever the text holds.
VOCAB = "\n" + "".join(chr(code) for code in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
# The docs use a few typographic characters; their ASCII spellings keep the words intact.  Anything
# else outside VOCAB (a handful of characters in the whole text) is dropped.
_TO_ASCII = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2013": "-",
                           "\u2014": "--", "\u2026": "...", "\t": "    "})
SPLIT_SEED = 20260401  # fixed: every run of every user sees the same split (for one corpus)
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
WINDOWS_PER_BLOCK = 16  # a block is 16 windows + 1 character (the last target)

PRESETS = {
    # 826K parameters (3.3 MB as fp32).  Sized so the teacher trains in a few minutes on two idle
    # CPU cores (measured: 0.30 s per step of 64 windows, 546 steps) and one recovery epoch of a
    # trial (91 steps) costs about half a minute there.
    "text-chargpt": {
        "model": {"vocab_size": len(VOCAB), "block_size": 64, "d_model": 128, "n_layer": 4, "n_head": 4,
                  "d_ff": 512, "dropout": 0.0},
        "data": {"window": 64, "max_chars": None},
        "recipe": {"epochs": 6, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.01,
                   "seed": 0, "version": 1},
    },
    # For tests and smoke runs: one small block on 48,000 characters.
    "text-chargpt-tiny": {
        "model": {"vocab_size": len(VOCAB), "block_size": 32, "d_model": 32, "n_layer": 1, "n_head": 2,
                  "d_ff": 64, "dropout": 0.0},
        "data": {"window": 32, "max_chars": 48_000},
        # One thread: batches this small spend more time in thread hand-offs than in arithmetic
        # (measured: 4 s on one thread, 20 s on two busy cores).
        "recipe": {"epochs": 5, "batch_size": 64, "lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.0,
                   "seed": 0, "threads": 1, "version": 1},
    },
}


class CharGPT(nn.Module):
    """GPT-2-shaped decoder from torch layers: token + learned position embeddings, pre-norm
    transformer blocks under a causal mask, final LayerNorm, linear head over the vocabulary.

    The head is *not* tied to the token embedding: with 96 symbols tying would save 1.5 % of the
    parameters, and today's artifact codec would store a tied tensor under both names anyway."""

    def __init__(self, vocab_size: int = len(VOCAB), block_size: int = 64, d_model: int = 128, n_layer: int = 4,
                 n_head: int = 4, d_ff: int = 512, dropout: float = 0.0):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, d_ff, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # enable_nested_tensor only applies to padding masks of post-norm stacks; off, it stays quiet.
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        # A buffer sliced per call (not a mask built from the input's length): torch.fx can trace a
        # slice, and the mask is rebuilt by the factory, so it never takes space in an artifact.
        mask = torch.triu(torch.full((block_size, block_size), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation (normal, std 0.02), as GPT-2 implementations use for this shape.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` token ids (T <= block_size) -> ``(N, T, vocab)`` next-token logits."""
        length = idx.shape[1]
        positions = torch.arange(length, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        x = self.blocks(x, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(self.ln_f(x))


def char_gpt(**kwargs) -> CharGPT:
    """Architecture factory (untrained); artifacts of the sequence tasks rebuild through it."""
    return CharGPT(**kwargs)


def corpus() -> str:
    """The Python docs' topic texts in a fixed order, restricted to ``VOCAB``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).translate(_TO_ASCII)
    return "".join(ch for ch in text if ch in _INDEX)


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_INDEX[ch] for ch in text], dtype=torch.int64)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def corpus_sha256(max_chars: int | None = None) -> str:
    return hashlib.sha256(corpus()[:max_chars].encode()).hexdigest()


def text_splits(window: int = 64, max_chars: int | None = None) -> dict[str, TensorDataset]:
    """Seeded train / val / test split of the corpus by contiguous blocks, as
    ``(inputs (window,), next-token targets (window,))`` int64 pairs."""
    ids = encode(corpus()[:max_chars])
    block = WINDOWS_PER_BLOCK * window + 1
    n_blocks = len(ids) // block
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(SPLIT_SEED))
    counts = {name: round(n_blocks * fraction) for name, fraction in SPLIT_FRACTIONS.items()}
    counts["train"] = n_blocks - counts["val"] - counts["test"]
    splits, start = {}, 0
    for name in SPLIT_FRACTIONS:
        chosen = order[start:start + counts[name]].sort().values  # text order inside a split
        start += counts[name]
        inputs, targets = [], []
        for b in chosen.tolist():
            chunk = ids[b * block:(b + 1) * block]
            for w in range(WINDOWS_PER_BLOCK):
                inputs.append(chunk[w * window:(w + 1) * window])
                targets.append(chunk[w * window + 1:(w + 1) * window + 1])
        splits[name] = TensorDataset(torch.stack(inputs), torch.stack(targets))
    return splits


def train_teacher(model: nn.Module, train: TensorDataset, recipe: dict, log=print) -> nn.Module:
    """AdamW with linear warm-up then cosine decay, over fixed windows in a seeded order."""
    import math

    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    # Weight decay on matrices only (GPT-2's convention): not on biases, LayerNorms or embeddings.
    decayed = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": recipe["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}], lr=recipe["lr"])
    x_all, y_all = train.tensors
    steps_per_epoch = math.ceil(len(x_all) / recipe["batch_size"])
    total, warmup = recipe["epochs"] * steps_per_epoch, recipe["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.get("threads") or previous_threads)
    try:
        _train_epochs(model, optimizer, scheduler, x_all, y_all, recipe, generator, log)
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval()


def _train_epochs(model, optimizer, scheduler, x_all, y_all, recipe, generator, log) -> None:
    from slimforge.core.outputs import task_loss

    model.train()
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(x_all), generator=generator)
        running = 0.0
        for start in range(0, len(order), recipe["batch_size"]):
            batch = order[start:start + recipe["batch_size"]]
            loss = task_loss(model(x_all[batch]), y_all[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(batch)
        log(f"  teacher epoch {epoch + 1}/{recipe['epochs']}  loss {running / len(x_all):.4f}")


def cached_teacher(name: str, splits: dict[str, TensorDataset], cache: Path | None = None, log=None) -> nn.Module:
    """Load the cached teacher of preset ``name`` or train and cache it (tensor-only file, no pickle).
    The cache key covers the architecture, the recipe, the split and the corpus text."""
    from slimforge.core.artifact import read_artifact, write_artifact
    from slimforge.core.embedded import cache_dir

    log = log or (lambda msg: print(msg, file=sys.stderr))
    preset = PRESETS[name]
    key_fields = {**preset, "split": [SPLIT_SEED, SPLIT_FRACTIONS, WINDOWS_PER_BLOCK],
                  "corpus": corpus_sha256(preset["data"]["max_chars"])}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
    path = (cache or cache_dir()) / "teachers" / f"{name}-{key}.slim"
    model = char_gpt(**preset["model"])
    if path.exists():
        model.load_state_dict(read_artifact(path)[1])
        log(f"teacher: loaded cached character GPT from {path}")
        return model.eval()
    params = sum(p.numel() for p in model.parameters())
    log(f"teacher: training a {params:,}-parameter character GPT on {splits['train'].tensors[0].numel():,} "
        f"characters of Python's docs (first run only); cache: {path}")
    started = time.perf_counter()
    model = train_teacher(model, splits["train"], preset["recipe"], log=log)
    log(f"teacher: trained in {time.perf_counter() - started:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_artifact(path, model.state_dict(), {"kind": "teacher", "task": name, "recipe": preset["recipe"],
                                              "model": preset["model"]})
    return model


def chargpt_task(name: str = "text-chargpt", cache: str | None = None) -> Task:
    preset = PRESETS[name]
    splits = text_splits(**preset["data"])
    cache_path = Path(cache) if cache else None
    return Task(
        name=name,
        architecture=FactoryRef("slimforge.core.text_task:char_gpt", dict(preset["model"])),
        teacher_factory=lambda: cached_teacher(name, splits, cache_path),
        splits=splits,
        metric_name="next_token_accuracy",
        source={"builtin": name},
    )


def text_chargpt_task(cache: str | None = None) -> Task:
    return chargpt_task("text-chargpt", cache)


def text_chargpt_tiny_task(cache: str | None = None) -> Task:
    return chargpt_task("text-chargpt-tiny", cache)
