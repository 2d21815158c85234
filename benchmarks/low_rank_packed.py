"""Packed weights under low_rank: factorize the whole packed matrix, or each packed block on its own?

A packed q/k/v projection (``nn.MultiheadAttention.in_proj_weight``, GPT-2's ``c_attn``) and an RNN's
gate-stacked ``weight_ih`` / ``weight_hh`` can be factorized as one ``(k*E) x in`` matrix (the blocks
share one right factor) or block by block (each gets its own).  At rank r the whole matrix costs
``r * (k*E + in)`` parameters, block i at rank r_i costs ``r_i * (E + in)``.  This trains three tiny
character-level language models on text that ships with Python (the source of a few stdlib modules),
then compares, per packed site and at equal parameter counts, the fraction of the squared Frobenius
norm each choice loses (Eckart-Young: the discarded squared singular values):

- ``whole``: the packed matrix at the largest rank within the budget;
- ``blocks``: each block's rank chosen greedily by the energy one more rank buys per parameter
  (the best the block form can do at that budget);
- ``blocks@e``: every block at the same energy threshold, as ``low_rank``'s per-site energy applies
  it, with the threshold raised until the budget is used (what the technique actually does).

    python benchmarks/low_rank_packed.py            # ~1 min on one CPU core

Result (seed 0; fraction of the energy lost, budgets 1/8, 1/4, 1/2 of the dense parameters):
``blocks@e`` lost more than ``whole`` in 10 of 18 (site, budget) pairs -- all six on GPT-2's
``c_attn`` (by 0.01-0.08) and on the GRU's ``weight_hh`` (0.03-0.06) -- and less on the torch
encoder's ``in_proj_weight`` (by 0.01-0.02); ``blocks`` lost less in 14 of 18, by 0.03 or less
except GPT-2's ``c_attn`` at 1/8 (0.06-0.07), and more on ``weight_hh``.  So ``low_rank``
factorizes a packed matrix whole.
"""

from __future__ import annotations

import inspect
import json
import sys

import torch
from torch import nn

BUDGETS = (0.125, 0.25, 0.5)  # parameters as a fraction of the dense packed matrix
SEQ, STEPS, BATCH = 32, 300, 32


def corpus() -> torch.Tensor:
    import argparse
    import json as json_module
    import typing
    text = "".join(inspect.getsource(m) for m in (argparse, json_module.decoder, typing))
    ids = torch.tensor([min(ord(c), 127) % 64 for c in text])  # 64 symbols: the tiny models' vocabulary
    return ids


class TorchLM(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.pos = nn.Parameter(torch.randn(1, SEQ, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 64)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.encoder(self.embed(x) + self.pos[:, : x.shape[1]], mask=mask, is_causal=True))


class GRULM(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.rnn = nn.GRU(32, width, batch_first=True)
        self.head = nn.Linear(width, 64)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


def gpt2_lm(width=64):
    import transformers
    config = transformers.GPT2Config(vocab_size=64, n_embd=width, n_layer=2, n_head=4, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def train(model, ids, seed=0) -> float:
    from slimforge.core.outputs import logits_of
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        start = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=generator)
        window = torch.stack([ids[s: s + SEQ + 1] for s in start.tolist()])
        logits = logits_of(model(window[:, :-1]))
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def lost_whole(matrix: torch.Tensor, budget: int) -> float:
    s2 = torch.linalg.svdvals(matrix.double()) ** 2
    rank = min(budget // sum(matrix.shape), len(s2))
    return float(s2[rank:].sum() / s2.sum())


def block_spectra(matrix, blocks):
    return [torch.linalg.svdvals(b.double()) ** 2 for b in matrix.split(list(blocks))]


def lost_blocks_greedy(matrix, blocks, budget: int) -> float:
    spectra, cols = block_spectra(matrix, blocks), matrix.shape[1]
    ranks, spent = [0] * len(blocks), 0
    while True:  # the next singular value with the most energy per parameter that still fits
        options = [(float(s[r]) / (b + cols), i) for i, (s, r, b) in enumerate(zip(spectra, ranks, blocks))
                   if r < len(s) and spent + b + cols <= budget]
        if not options:
            break
        _, i = max(options)
        ranks[i] += 1
        spent += blocks[i] + cols
    total = sum(float(s.sum()) for s in spectra)
    return sum(float(s[r:].sum()) for s, r in zip(spectra, ranks)) / total


def lost_blocks_energy(matrix, blocks, budget: int) -> float:
    from slimforge.plugins.factorization.low_rank import rank_for_energy
    spectra, cols = block_spectra(matrix, blocks), matrix.shape[1]
    best = None
    for step in range(1, 1000):  # the highest shared threshold whose ranks fit the budget
        energy = step / 1000
        ranks = [rank_for_energy(s.sqrt(), energy) for s in spectra]
        if sum(r * (b + cols) for r, b in zip(ranks, blocks)) <= budget:
            best = ranks
    if best is None:
        return 1.0
    total = sum(float(s.sum()) for s in spectra)
    return sum(float(s[r:].sum()) for s, r in zip(spectra, best)) / total


def main() -> int:
    from slimforge.core.sites import weight_sites
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ids = corpus()
    rows = []
    for label, factory in (("torch_transformer", TorchLM), ("gpt2", gpt2_lm), ("gru", GRULM)):
        torch.manual_seed(0)
        model = factory()
        loss = train(model, ids)
        for name, site in weight_sites(model).items():
            if not site.row_blocks:
                continue
            matrix = site.matrix(model).detach()
            for fraction in BUDGETS:
                budget = int(fraction * matrix.numel())
                rows.append({"model": label, "site": name, "train_loss": round(loss, 3), "budget": fraction,
                             "whole": lost_whole(matrix, budget),
                             "blocks": lost_blocks_greedy(matrix, site.row_blocks, budget),
                             "blocks@e": lost_blocks_energy(matrix, site.row_blocks, budget)})
    print("| model (train loss, nats/char) | site | params | whole lost | blocks lost | blocks@e lost |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} ({r['train_loss']:.2f}) | {r['site']} | {r['budget']:.3f} | {r['whole']:.3f} | "
              f"{r['blocks']:.3f} | {r['blocks@e']:.3f} |")
    for kind in ("blocks", "blocks@e"):
        wins = sum(r[kind] < r["whole"] for r in rows)
        print(f"\n{kind} loses less energy than whole in {wins} of {len(rows)} (site, budget) pairs", end="")
    print()
    json.dump(rows, sys.stderr)
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
