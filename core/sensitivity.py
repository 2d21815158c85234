"""Per-site sensitivity, measured once per task, and the allocators that spread a few global knobs
over the sites by it.

Why: a per-site knob for every weight (``density.conv1``, ``density.fc1`` ... ``bits.fc2``) makes
the search space wide and flat, and the sampler learns slowly in it.  What the sampler really has
to decide is *how much* to compress (a target density, a mean bit width) and *how unevenly*
(an allocation temperature); which sites can take more is a property of the model that can be
measured before any trial.  Mixed-precision allocators (HAWQ, ModelOpt's AutoQuantize) work the
same way.

``sensitivity_of(task)``: for every weight site of the teacher, the validation drop when that
site *alone* is magnitude-pruned to each of ``PRUNE_DENSITIES`` or round-to-nearest quantized
(symmetric, per output channel) to each of ``QUANT_BITS``, everything else untouched and no
fine-tuning.  A few dozen evaluations on at most ``MAX_SAMPLES`` validation samples; cached on
disk under the cache folder, keyed by the task's name and a hash of the teacher's weights and of
the samples, so it is paid once per teacher.

``allocate_density`` and ``allocate_bits`` turn ``(target, temperature)`` into per-site values:
temperature 0 is uniform, larger temperatures give sensitive sites more (density or bits) and
insensitive ones less, always meeting the element-weighted target.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from slimforge.core.sites import weight_sites

PRUNE_DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.02)
QUANT_BITS = (8, 4, 3, 2)
MAX_SAMPLES = 1000
# A site whose every measured drop is zero still gets this much sensitivity, so that allocation
# weights stay finite and an insensitive site is "less sensitive than all others", not "free".
SENSITIVITY_FLOOR = 1e-4
FORMAT = 1


@dataclass(frozen=True)
class SiteSensitivity:
    """Validation drops (baseline - score, >= 0) of one site, pruned or quantized alone."""

    key: str  # the site's setting_key, what per-site settings are keyed by
    numel: int
    prune: dict[str, float]  # str(density) -> drop
    quant: dict[str, float]  # str(bits) -> drop

    @property
    def prune_score(self) -> float:
        """Mean drop over the measured densities: how much pruning this site costs."""
        return max(SENSITIVITY_FLOOR, sum(self.prune.values()) / max(1, len(self.prune)))

    @property
    def quant_score(self) -> float:
        return max(SENSITIVITY_FLOOR, sum(self.quant.values()) / max(1, len(self.quant)))


@dataclass(frozen=True)
class Sensitivity:
    baseline: float
    sites: dict[str, SiteSensitivity]  # by setting_key
    seconds: float
    samples: int

    def to_dict(self) -> dict:
        return {"format": FORMAT, "baseline": self.baseline, "seconds": self.seconds, "samples": self.samples,
                "sites": {key: asdict(site) for key, site in self.sites.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        return cls(baseline=data["baseline"], seconds=data["seconds"], samples=data["samples"],
                   sites={key: SiteSensitivity(**site) for key, site in data["sites"].items()})


def _pruned(matrix: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, int(round(density * matrix.numel())))
    threshold = matrix.abs().flatten().kthvalue(matrix.numel() - keep + 1).values if keep < matrix.numel() else None
    return matrix if threshold is None else matrix * (matrix.abs() >= threshold)


def _quantized(matrix: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row round-to-nearest: what weight-only quantization does before any tuning."""
    levels = 2 ** (bits - 1) - 1
    scale = matrix.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
    return (matrix / scale).round().clamp(-levels, levels) * scale


def measure_sensitivity(model: nn.Module, dataset, metric, device: str = "cpu", log=None) -> Sensitivity:
    """Each site pruned or quantized alone, validation drop measured (no fine-tuning).  ``model``
    is modified in place and restored exactly (its stored tensors are copied back)."""
    from slimforge.core.measure import BrokenOutputsError, evaluate

    started = time.perf_counter()
    samples = min(len(dataset), MAX_SAMPLES)
    subset = torch.utils.data.Subset(dataset, range(samples)) if samples < len(dataset) else dataset
    model = model.to(device).eval()
    baseline = evaluate(model, subset, metric, device=device)
    sites: dict[str, SiteSensitivity] = {}
    for site in weight_sites(model).values():
        if site.is_derived(model) or site.setting_key in sites:
            continue
        original = site.tensor(model).detach().clone()
        matrix = site.matrix(model).detach().clone()

        def drop(changed: torch.Tensor, site=site, original=original) -> float:
            site.set_matrix(model, changed)
            try:
                return round(max(0.0, baseline - evaluate(model, subset, metric, device=device)), 6)
            except BrokenOutputsError:  # non-finite outputs: the site cannot take this level at all
                return round(max(0.0, baseline), 6)
            finally:
                with torch.no_grad():
                    site.tensor(model).copy_(original)

        sites[site.setting_key] = SiteSensitivity(
            key=site.setting_key, numel=matrix.numel(),
            prune={str(d): drop(_pruned(matrix, d)) for d in PRUNE_DENSITIES},
            quant={str(b): drop(_quantized(matrix, b)) for b in QUANT_BITS})
    result = Sensitivity(baseline=baseline, sites=sites, seconds=round(time.perf_counter() - started, 3),
                         samples=samples)
    if log:
        log(f"sensitivity: {len(sites)} weight site(s), each pruned to {len(PRUNE_DENSITIES)} densities and "
            f"quantized to {len(QUANT_BITS)} widths alone, on {samples} validation samples, in {result.seconds:.1f} s")
    return result


def _fingerprint(model: nn.Module, dataset, samples: int) -> str:
    digest = hashlib.sha256(f"{FORMAT}:{PRUNE_DENSITIES}:{QUANT_BITS}:{samples}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    for index in (0, samples // 2, samples - 1):  # the split it was measured on, cheaply
        x = dataset[index][0]
        digest.update(torch.as_tensor(x).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def sensitivity_of(task, cache: Path | None = None, device: str = "cpu", log=None) -> Sensitivity:
    """The task teacher's sensitivity: from memory, from the cache file, or measured and cached."""
    cached = getattr(task, "_sensitivity", None)
    if cached is not None:
        return cached
    from slimforge.core.embedded import cache_dir
    from slimforge.core.files import write_json_atomic

    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    val = task.split("val")
    samples = min(len(val), MAX_SAMPLES)
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in task.name)
    path = (cache or cache_dir()) / "sensitivity" / f"{safe_name}-{_fingerprint(task.teacher, val, samples)}.json"
    result = None
    if path.exists():
        try:
            result = Sensitivity.from_dict(json.loads(path.read_text()))
            log(f"sensitivity: loaded {len(result.sites)} site(s) from {path}")
        except (ValueError, KeyError, TypeError):
            result = None  # a damaged cache file is measured again, not trusted
    if result is None:
        result = measure_sensitivity(task.teacher, val, task.metric, device=device, log=log)
        task.teacher.cpu()
        try:
            write_json_atomic(path, result.to_dict())
        except OSError as exc:  # a read-only cache costs a re-measurement next time, nothing else
            log(f"sensitivity: not cached ({exc})")
    object.__setattr__(task, "_sensitivity", result)
    return result


# --- allocation -------------------------------------------------------------------------------------

def _weights(scores: dict[str, float], temperature: float) -> dict[str, float]:
    """score^temperature, normalised to a geometric mean of 1 (so temperature 0 is uniform)."""
    logs = {key: math.log(score) for key, score in scores.items()}
    mean = sum(logs.values()) / max(1, len(logs))
    return {key: math.exp(temperature * (value - mean)) for key, value in logs.items()}


def allocate_density(sensitivity: Sensitivity, keys: list[str], target: float, temperature: float,
                     low: float = 0.005) -> dict[str, float]:
    """Per-site density for ``keys`` whose element-weighted mean is ``target``: density_i =
    clip(c * w_i, low, 1) with w_i = sensitivity_i^temperature and c found by bisection (water
    filling: a site capped at 1 hands its share to the others).  Unmeasured keys get weight 1."""
    numel = {key: sensitivity.sites[key].numel if key in sensitivity.sites else 1 for key in keys}
    scores = {key: sensitivity.sites[key].prune_score if key in sensitivity.sites else 1.0 for key in keys}
    weights = _weights(scores, temperature)
    total = sum(numel.values())
    target = min(1.0, max(low, target))

    def kept(c: float) -> float:
        return sum(numel[k] * min(1.0, max(low, c * weights[k])) for k in keys) / total

    lo, hi = 0.0, 1.0 / min(weights.values())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
    return {k: round(min(1.0, max(low, hi * weights[k])), 4) for k in keys}


def allocate_bits(sensitivity: Sensitivity, keys: list[str], mean_bits: float, temperature: float,
                  choices: tuple[int, ...]) -> dict[str, int]:
    """Per-site bit width from ``choices`` whose element-weighted mean is about ``mean_bits``:
    bits_i = mean_bits + temperature * log2(w_i) - shift, rounded to the nearest choice, with the
    shift chosen so that the weighted mean hits the target (sensitive sites get more bits)."""
    numel = {key: sensitivity.sites[key].numel if key in sensitivity.sites else 1 for key in keys}
    scores = {key: sensitivity.sites[key].quant_score if key in sensitivity.sites else 1.0 for key in keys}
    offsets = {key: math.log2(w) for key, w in _weights(scores, 1.0).items()}
    total = sum(numel.values())
    ordered = sorted(choices)

    def assign(shift: float) -> dict[str, int]:
        return {k: min(ordered, key=lambda b: (abs(b - (mean_bits + temperature * offsets[k] - shift)), b))
                for k in keys}

    def mean(shift: float) -> float:
        bits = assign(shift)
        return sum(numel[k] * bits[k] for k in keys) / total

    lo, hi = -2.0 * (ordered[-1] - ordered[0]) - 10, 2.0 * (ordered[-1] - ordered[0]) + 10
    for _ in range(60):  # mean(shift) falls as shift grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) > mean_bits else (lo, mid)
    best = min((lo, hi), key=lambda s: abs(mean(s) - mean_bits))
    return assign(best)

