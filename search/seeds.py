"""Expert seeds: the plans a careful engineer would try first, enqueued before the sampler draws.

A search should start at least where a person with the literature at hand would.  These plans
are queued as the study's first trials (``optuna.Study.enqueue_trial``), scaled to the size
budget, and then the sampler learns from them like from any trial:

- **Deep Compression** (Han et al. 2016): magnitude pruning -> retrain -> k-means weight sharing
  -> fine-tune the centroids, at 5 bits and sparser at 4 bits (with knowledge distillation where
  the search has it);
- **pruning + weight-only quantization**: the same, with a uniform grid instead of a codebook;
- **int8 post-training quantization** (only where int8's ~3.5x can meet the size budget);
- **structured pruning + int8**: fewer channels, then int8;
- **a distilled student**: a narrower copy of the teacher initialised from it, trained with
  knowledge distillation, weight-only quantized; and, for budgets under ~1/80 of the teacher,
  Deep Compression applied to such a student.

A search without fine-tuning (``--no-finetune``) starts from ``one_shot_plans`` instead: plans that
never train (GPTQ, SparseGPT 2:4 + GPTQ and weight-only round-to-nearest at the width the budget
allows, int8 post-training quantization).

Each seed names techniques and a few knob values; ``SeedSuggester`` answers the planner's
questions from them, so the enqueued parameters are exactly the names and ranges the planner
asks for (a seed whose techniques are not all enabled, or that the composition rules refuse, is
left out).  Knobs a seed does not name get the middle of their range.

Scaling to the budget uses a rough bytes model of our artifact, measured on LeNet-5: a pruned and
5-bit-shared weight costs ``SPARSE_BYTES_PER_KEPT`` of a dense fp32 weight's deflated bytes
(index gaps and codes, entropy coded).  Seeds that still overshoot are rejected untrained by the
size check (cheaply), so the model only needs to be roughly right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimforge.core.planner import Planner
from slimforge.search.budgets import Budgets

# Deep Compression's LeNet-5 (8 % density, 5-bit fc / 8-bit conv codes) measured 29.5x smaller
# than our dense artifact: a kept weight costs 1 / (29.5 * 0.08) = 0.42 of a dense one.
SPARSE_BYTES_PER_KEPT = 0.42
CODE_BITS_OVERHEAD = 3.5  # index-gap bits per kept weight, on top of its code bits
INT8_RATIO = 3.5  # int8 artifacts of small CNNs/MLPs: 3.1-3.8x (benchmarks/compression.py)
MARGIN = 0.85  # aim under the budget: estimates are rough, and a rejected seed teaches little
SEED_ATTR = "slimforge_expert_seed"  # the trial's user attr naming the seed it was queued as


class NotSeedable(Exception):
    """The planner cannot build this seed here (a technique missing or refused)."""


@dataclass(frozen=True)
class Seed:
    label: str
    techniques: dict[str, dict[str, Any]]  # technique -> knob values (unscoped names)
    recovery: dict[str, Any]
    # Techniques of ``techniques`` the seed may do without: used where the search has them, dropped
    # where it does not (knowledge distillation helps every fine-tuned seed, but a search without
    # it should still start from Deep Compression).
    optional: frozenset[str] = frozenset()

    def for_techniques(self, enabled: set[str]) -> Seed | None:
        """This seed with the optional techniques ``enabled`` lacks dropped; None when a required
        one is missing."""
        if not set(self.techniques) - self.optional <= enabled:
            return None
        kept = {name: knobs for name, knobs in self.techniques.items() if name in enabled}
        return Seed(self.label, kept, self.recovery, self.optional & set(kept))


class SeedSuggester:
    """Answers the planner from a seed and records every answer (the params to enqueue)."""

    per_layer = False

    def __init__(self, seed: Seed):
        self.seed, self.params = seed, {}

    def _knob(self, name: str):
        scope, _, knob = name.partition(".")
        knobs = self.seed.recovery if scope == "recovery" else self.seed.techniques.get(scope, {})
        return knobs.get(knob.split("[")[0])

    def suggest_categorical(self, name, choices):
        choices = list(choices)
        if name.startswith("use."):
            wanted = [c for c in choices if c in self.seed.techniques]
            if not wanted and "none" not in choices:
                raise NotSeedable(name)
            value = wanted[0] if wanted else "none"
        else:
            value = self._knob(name)
            value = value if value in choices else choices[0]
        self.params[name] = value
        return value

    def suggest_float(self, name, low, high, *, step=None, log=False):
        value = self._knob(name)
        if value is None:
            value = math.sqrt(low * high) if log and low > 0 else (low + high) / 2
        value = min(high, max(low, float(value)))
        if step:
            value = round(low + step * round((value - low) / step), 10)
        self.params[name] = value
        return value

    def suggest_int(self, name, low, high, *, step=1, log=False):
        value = self._knob(name)
        value = (low + high) // 2 if value is None else int(round(value))
        value = min(high, max(low, low + step * ((value - low) // step)))
        self.params[name] = value
        return value


def _budget_fraction(dense_bytes: int, budgets: Budgets) -> float | None:
    """The size budget as a fraction of the dense artifact, None without one."""
    return min(1.0, budgets.max_size_bytes / dense_bytes) if budgets.max_size_bytes else None


def _int8_fits(fraction: float | None) -> bool:
    return fraction is None or fraction * INT8_RATIO >= 1 / MARGIN


INT8_PTQ_SEED = Seed("int8 post-training quantization", {"int8_ptq": {"calibration_batches": 8}}, {})


def expert_plans(dense_bytes: int, budgets: Budgets) -> list[Seed]:
    """The seeds, scaled to ``budgets.max_size_bytes`` (a fraction of ``dense_bytes``)."""
    fraction = _budget_fraction(dense_bytes, budgets)

    def density(bits: int, unbudgeted: float) -> float:
        """Overall density whose sparse ``bits``-bit codes fit the budget (``unbudgeted`` without one)."""
        if fraction is None:
            return unbudgeted
        per_kept = SPARSE_BYTES_PER_KEPT * (bits + CODE_BITS_OVERHEAD) / (5 + CODE_BITS_OVERHEAD)
        return round(min(0.5, max(0.01, MARGIN * fraction / per_kept)), 4)

    # Deep Compression's recipe: 6 epochs of retraining the pruned weights, then the shared ones
    # are fine-tuned, here with the teacher's logits as a second target where the search has
    # knowledge distillation.  Allocation spreads the overall density over sites by sensitivity:
    # 0.5 gives LeNet-5's 8 % as conv1 35 %, conv2 28 %, fc1 6 %, fc2 33 % (the paper's hand
    # allocation: 66 / 12 / 8 / 19 %); 1.0 leans harder on the insensitive fc1 (conv1 60 %, conv2
    # 42 %, fc1 1.4 %, fc2 58 % at 4.5 %).  Measured on the embedded LeNet-5 (2026-12-04, one run
    # each): 4.5 % density with 4-bit codes reached 54.0x at -0.2 pt validation with allocation 1.0
    # and distillation, against 48.7x at -0.6 pt for 5 % at allocation 0.5 without it.
    fine_tune = {"epochs": 4, "lr": 1e-3, "before_sharing_epochs": 6}
    distill = {"knowledge_distillation": {"alpha": 0.7, "temperature": 4.0}}
    optional_kd = frozenset(distill)
    seeds = [
        Seed("Deep Compression at 4 bits, sparser",
             {"magnitude_pruning": {"density": density(4, 0.045), "allocation": 1.0},
              "kmeans_clustering": {"bits": 4.0, "allocation": 1.0}, **distill}, fine_tune, optional_kd),
        Seed("Deep Compression (prune > retrain > 5-bit k-means > fine-tune)",
             {"magnitude_pruning": {"density": density(5, 0.08), "allocation": 0.5},
              "kmeans_clustering": {"bits": 5.0, "allocation": 0.5}}, fine_tune),
        Seed("pruning > 5-bit weight-only quantization",
             {"magnitude_pruning": {"density": density(5, 0.08), "allocation": 0.5},
              "weight_only_quant": {"bits": 5.0, "allocation": 0.5, "symmetric": True}},
             {"epochs": 6, "lr": 1e-3}),
    ]
    if _int8_fits(fraction):
        seeds.append(INT8_PTQ_SEED)
    # Structured pruning keeps (1 - s) of each layer's channels, so inner layers keep (1 - s)^2 of
    # their weights; int8 divides by ~3.5 more.
    keep = 1.0 if fraction is None else min(1.0, MARGIN * fraction * INT8_RATIO)
    channel_sparsity = round(min(0.8, max(0.1, 1 - math.sqrt(keep)) if fraction else 0.5), 2)
    seeds.append(Seed("structured pruning > int8", {"structured_pruning": {"criterion": "magnitude",
                                                                           "channel_sparsity": channel_sparsity},
                                                    "int8_ptq": {"calibration_batches": 8}},
                      {"epochs": 3, "lr": 1e-3}))
    # A student of width w keeps ~w^2 of the weights; 4-bit codes are 1/8 of fp32.
    width = 0.25 if fraction is None else min(0.75, max(0.05, math.sqrt(MARGIN * fraction * 8)))
    seeds.append(Seed("distilled student (width-reduced copy > knowledge distillation > 4-bit)",
                      {"parameter_distillation": {"width": round(width, 3), "depth": 1.0},
                       "weight_only_quant": {"bits": 4.0, "allocation": 1.0, "symmetric": True}, **distill},
                      {"epochs": 10, "lr": 2e-3}))
    # Deep Compression on a distilled student, for budgets past what either reaches alone (about
    # 1/80 of the teacher and below).  Measured on LeNet-5: a 0.45-wide student, 7 % density,
    # 3-bit codes, distilled for 12 epochs: 154x at -0.9 pt validation.
    if fraction is None or fraction <= 1 / 80:
        dc_density = 0.07 if fraction is None else round(min(0.3, max(0.02, 0.07 * fraction * 154)), 4)
        seeds.append(Seed("distilled student > pruning > 3-bit k-means",
                          {"parameter_distillation": {"width": 0.45, "depth": 1.0},
                           "magnitude_pruning": {"density": dc_density, "allocation": 0.5},
                           "kmeans_clustering": {"bits": 3.0, "allocation": 0.5}, **distill},
                          {"epochs": 12, "lr": 3e-3, "before_sharing_epochs": 6}))
    return seeds


def one_shot_plans(dense_bytes: int, budgets: Budgets) -> list[Seed]:
    """The seeds of a search without fine-tuning (``--no-finetune``), whose plans never train, at
    the mean width the size budget allows (4 bits without one):
    - **GPTQ** (Frantar et al. 2022) at that width on every site, groups of 128, activation order,
      1 % damping: the setting the paper and its reference code report;
    - **SparseGPT 2:4 + GPTQ** (Frantar & Alistarh 2023: prune, then quantize the survivors);
    - weight-only round-to-nearest, the widths spread over the sites by their measured sensitivity;
    - int8 post-training quantization where its ~3.5x can meet the budget."""
    fraction = _budget_fraction(dense_bytes, budgets)
    # b-bit codes are about b/32 of the fp32 artifact (per-channel or group scales are a few percent more).
    bits = 4.0 if fraction is None else min(8.0, max(2.0, math.floor(2 * 32 * MARGIN * fraction) / 2))
    gptq = {"bits": bits, "allocation": 0.0, "group_size": 128, "act_order": True, "damping": 0.01,
            "symmetric": False}
    seeds = [Seed(f"GPTQ {bits:g}-bit, groups of 128", {"gptq": gptq}, {}),
             Seed(f"SparseGPT 2:4 > GPTQ {bits:g}-bit", {"sparsegpt": {"pattern": "2:4"}, "gptq": gptq}, {}),
             Seed(f"{bits:g}-bit weight-only round-to-nearest (widths spread by sensitivity)",
                  {"weight_only_quant": {"bits": bits, "allocation": 1.0, "symmetric": True}}, {})]
    if _int8_fits(fraction):
        seeds.append(INT8_PTQ_SEED)
    return seeds


def seed_params(planner: Planner, task, dense_bytes: int, budgets: Budgets, limit: int) -> list[tuple[str, dict]]:
    """``(label, params)`` of the seeds this planner can build, at most ``limit`` of them."""
    out, enabled = [], {technique.name for technique in planner.techniques}
    plans = expert_plans if planner.fine_tune else one_shot_plans
    for seed in plans(dense_bytes, budgets):
        if len(out) >= limit:
            break
        seed = seed.for_techniques(enabled)
        if seed is None:
            continue  # never plan it: a technique's suggest may have side effects (or cost: sensitivity)
        space = SeedSuggester(seed)
        try:
            plan = planner.sample(space, task, seed=0)
        except NotSeedable:
            continue
        if {step.technique for step in plan.steps} == set(seed.techniques):
            out.append((seed.label, space.params))
    return out
