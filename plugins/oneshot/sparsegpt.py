"""SparseGPT: one-shot pruning with the Optimal-Brain-Surgeon weight update, per weight site.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot".  With the Hessian ``H = 2 X^T X`` of the layer-wise squared error on calibration
inputs (``plugins.oneshot.calibration``, block by block), the columns of ``W`` are visited in
order; within each block of 128 columns the weights to prune are the ones with the smallest OBS
saliency ``w^2 / [H^-1]_jj^2`` (unstructured: the lowest fraction over the block, the paper's
adaptive mask selection; N:M: the ``m - n`` lowest of every ``m`` consecutive inputs), and the
error each pruned (zeroed) column leaves is spread over the columns not yet visited through the
upper Cholesky factor of ``(H + lambda I)^-1`` -- GPTQ's update with "round to zero" as the
quantizer.  ``damping`` is lambda as a fraction of the mean diagonal of H (the paper's 1 %).
What it acts on and notes: ``plugins.oneshot.pruning``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimforge.core.errors import ConfigError
from slimforge.core.hookspecs import hookimpl
from slimforge.plugins.oneshot.gptq import BLOCK_COLUMNS, inverse_hessian_factor, without_dead_inputs
from slimforge.plugins.oneshot.pruning import OneShotPruning, OneShotPruningConfig


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(OneShotPruningConfig):
    technique = "sparsegpt"
    damping: float = 0.01  # fraction of the mean Hessian diagonal added to it

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0.0 < self.damping <= 1.0:
            raise ConfigError(f"sparsegpt.damping: must be in (0, 1] (a fraction of the mean Hessian diagonal), "
                              f"got {self.damping!r}")


def sparsegpt_prune(matrix: torch.Tensor, hessian: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None,
                    damping: float, block_columns: int = BLOCK_COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(updated matrix with zeros, keep mask)`` of one ``out x in`` matrix."""
    W = matrix.detach().to(torch.float32).clone()
    columns = W.shape[1]
    inverse, _ = inverse_hessian_factor(without_dead_inputs(W, hessian), damping)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    if n_m:
        n, m = n_m
        block_columns = max(m, block_columns // m * m)  # N:M groups never straddle two blocks
    for start in range(0, columns, block_columns):
        end = min(start + block_columns, columns)
        block, block_inverse = W[:, start:end].clone(), inverse[start:end, start:end]
        diagonal = torch.diag(block_inverse)
        errors = torch.zeros_like(block)
        mask = torch.zeros(block.shape, dtype=torch.bool, device=block.device)  # True: pruned
        if not n_m:
            saliency = block.square() / diagonal[None, :].square()
            count = int(saliency.numel() * sparsity)
            if count:
                mask.view(-1)[torch.argsort(saliency.flatten(), stable=True)[:count]] = True
        for i in range(end - start):
            if n_m and i % m == 0:
                width = min(m, end - start - i)
                if width > n:
                    saliency = block[:, i:i + width].square() / diagonal[None, i:i + width].square()
                    lowest = torch.topk(saliency, width - n, dim=1, largest=False).indices
                    mask[:, i:i + width].scatter_(1, lowest, True)
            w = block[:, i]
            q = w.masked_fill(mask[:, i], 0.0)
            error = (w - q) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            block[:, i] = q
            errors[:, i] = error
        W[:, start:end] = block
        W[:, end:] -= errors @ inverse[start:end, end:]
        pruned[:, start:end] = mask
    return W.to(matrix.dtype), ~pruned


class SparseGPT(OneShotPruning):
    name = "sparsegpt"
    Config = SparseGPTConfig
    description = ("SparseGPT one-shot pruning with the OBS weight update from calibration Hessians, "
                   "unstructured or N:M; layer by layer; no fine-tuning.")

    def prune(self, matrix, stats, sparsity, n_m, config):
        return sparsegpt_prune(matrix, stats.hessian, sparsity, n_m, config.damping)


@hookimpl
def slimforge_register_techniques(registry):
    registry.add(SparseGPT)
