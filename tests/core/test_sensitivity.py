"""Per-site sensitivity (measured once, cached) and the allocators that spread global knobs by it."""

import json

import pytest
import torch

from slimforge.core.sensitivity import (PRUNE_DENSITIES, QUANT_BITS, Sensitivity, SiteSensitivity, allocate_bits,
                                        allocate_density, sensitivity_of)
from slimforge.core.space import FixedSuggester
from slimforge.core.testing import tiny_task
from slimforge.plugins.common import suggest_site_bits, suggest_site_sparsity
from slimforge.core.sites import weight_sites


def _sensitivity(**scores) -> Sensitivity:
    """Sites named by keyword: (numel, prune drop, quant drop) at every measured level."""
    sites = {key: SiteSensitivity(key=key, numel=numel, prune={str(d): p for d in PRUNE_DENSITIES},
                                  quant={str(b): q for b in QUANT_BITS}) for key, (numel, p, q) in scores.items()}
    return Sensitivity(baseline=0.9, sites=sites, seconds=0.0, samples=10)


def test_measurement_restores_the_model_and_is_cached(tmp_path):
    task = tiny_task("slimforge.core.testing:tiny_mlp")
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    result = sensitivity_of(task, cache=tmp_path, log=lambda _m: None)
    assert all(torch.equal(before[k], v) for k, v in task.teacher.state_dict().items())  # restored exactly
    keys = {site.setting_key for site in weight_sites(task.teacher).values()}
    assert set(result.sites) == keys
    for site in result.sites.values():
        assert set(site.prune) == {str(d) for d in PRUNE_DENSITIES} and set(site.quant) == {str(b) for b in QUANT_BITS}
        assert all(drop >= 0 for drop in [*site.prune.values(), *site.quant.values()])
    # Pruning a site to 2 % costs at least as much as to 50 % somewhere: the measurement sees damage.
    assert any(s.prune["0.02"] > s.prune["0.5"] for s in result.sites.values())
    files = list((tmp_path / "sensitivity").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["sites"].keys() == keys
    # A fresh task object with the same teacher loads the file instead of measuring again.
    messages = []
    again = sensitivity_of(tiny_task("slimforge.core.testing:tiny_mlp"), cache=tmp_path, log=messages.append)
    assert again.sites == result.sites and messages and messages[0].startswith("sensitivity: loaded")


def test_density_allocation_meets_the_target_and_favours_sensitive_sites():
    sens = _sensitivity(big=(1000, 0.001, 0.0), small=(10, 0.2, 0.0))
    uniform = allocate_density(sens, ["big", "small"], 0.1, temperature=0.0)
    assert uniform == {"big": pytest.approx(0.1, abs=1e-3), "small": pytest.approx(0.1, abs=1e-3)}
    for temperature in (0.5, 1.0, 2.0):
        allocated = allocate_density(sens, ["big", "small"], 0.1, temperature)
        kept = (1000 * allocated["big"] + 10 * allocated["small"]) / 1010
        assert kept == pytest.approx(0.1, abs=2e-3)  # the element-weighted target holds
        assert allocated["small"] > allocated["big"]
    # Water filling: a capped site (density 1) hands its share to the others.
    assert allocate_density(sens, ["big", "small"], 0.1, temperature=2.0)["small"] == 1.0


def test_bit_allocation_gives_sensitive_sites_wider_codes():
    sens = _sensitivity(big=(1000, 0.0, 0.001), small=(10, 0.0, 0.3))
    bits = allocate_bits(sens, ["big", "small"], 4.0, temperature=1.0, choices=(2, 3, 4, 5, 6, 8))
    assert bits["small"] > bits["big"] == 4  # the big site carries the mean
    assert allocate_bits(sens, ["big", "small"], 4.0, temperature=0.0, choices=(2, 4, 8)) == {"big": 4, "small": 4}


def test_global_knobs_ask_a_few_parameters_per_technique(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORGE_CACHE_DIR", str(tmp_path))
    task = tiny_task("slimforge.core.testing:tiny_mlp")
    space = FixedSuggester({"density": 0.1, "allocation": 1.0, "bits": 4.0}, per_layer=False)
    sparsity = suggest_site_sparsity(space, task)
    bits = suggest_site_bits(space, task, weight_sites(task.teacher), (2, 3, 4, 5, 6, 8))
    assert set(space.asked) == {"density", "allocation", "bits"}
    assert set(sparsity) == set(bits) == {site.setting_key for site in weight_sites(task.teacher).values()}
    assert len(set(sparsity.values())) > 1  # spread by sensitivity, not uniform
    # Per-layer knobs (hand configs, --per-layer-knobs) still ask one parameter per site.
    per_site = FixedSuggester(seed=0)
    suggest_site_sparsity(per_site, task)
    assert {name.split(".")[0] for name in per_site.asked} == {"density"} and len(per_site.asked) == len(sparsity)
