"""The search without fine-tuning (``--no-finetune`` / ``[search] finetune = false``): plans hold
only techniques that need no recovery training, decided by their declarations; no trial trains;
naming a technique that needs fine-tuning is a one-line error; the same front and summary as
every search."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from slimforge.app.api import SearchSettings, run_search
from slimforge.app.cli import build_parser
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.core.planner import Planner
from slimforge.core.sensitivity import allocate_bits, sensitivity_of
from slimforge.core.sites import weight_sites
from slimforge.core.space import FixedSuggester
from slimforge.core.task import load_task
from slimforge.core.technique import Family, Stage, Technique, needs_fine_tuning
from slimforge.search.budgets import Budgets
from slimforge.search.seeds import seed_params
from slimforge.search.settings import settings_from

TINY_TEXT = "text-chargpt-tiny"


@dataclass(frozen=True, kw_only=True)
class _NoConfig:
    pass


class _Plugin(Technique):
    """A third-party technique; subclasses declare what it needs."""

    Config = _NoConfig

    def suggest(self, space, task):
        return _NoConfig()


class OneShotCorrection(_Plugin):  # a calibration-only technique of a new family: joins by declaration
    name, family, stage = "one_shot_correction", "correction", Stage.QUANTIZATION + 5


class NeedsRecovery(_Plugin):
    name, family, stage, needs_recovery = "needs_recovery_pruning", Family.PRUNING, Stage.PRUNING, True


class TrainingOnly(_Plugin):  # changes only how recovery trains: useless without it
    name, family, stage = "training_only_loss", Family.DISTILLATION, Stage.TRAINING


@pytest.fixture(scope="module")
def registry():
    registry = Plugins(load_entry_points=False).registry
    for cls in (OneShotCorrection, NeedsRecovery, TrainingOnly):
        registry.add(cls)
    return registry


@pytest.fixture(scope="module")
def text_task(slimforge_cache_dir):
    task = load_task(TINY_TEXT)
    _ = task.teacher  # trains once into the session cache (seconds)
    return task


def test_the_planner_keeps_exactly_the_techniques_whose_declarations_need_no_training(registry, tiny_task):
    planner = Planner(registry, fine_tune=False)
    kept = {t.name for t in planner.techniques}
    assert kept == {cls.name for cls in registry.classes() if not cls.needs_recovery and cls.stage != Stage.TRAINING}
    assert {"gptq", "sparsegpt", "wanda", "weight_only_quant", "int8_ptq", "int8_dynamic", "one_shot_correction"} <= kept
    assert not kept & {"magnitude_pruning", "knowledge_distillation", "needs_recovery_pruning", "training_only_loss"}
    assert all(not needs_fine_tuning(t) for t in planner.techniques)
    assert Planner(registry).fine_tune and {"magnitude_pruning", "training_only_loss"} <= {
        t.name for t in Planner(registry).techniques}  # the default search still has them


def test_its_plans_never_train(registry, tiny_task):
    planner = Planner(registry, fine_tune=False)
    used = set()
    for seed in range(25):
        space = FixedSuggester(seed=seed)
        plan = planner.sample(space, tiny_task, seed=seed)
        assert plan.recovery.epochs == 0 and plan.recovery.before_sharing_epochs == 0
        assert not any(name.startswith("recovery.") for name in space.asked)
        used |= {step.technique for step in plan.steps}
    assert {"weight_only_quant", "one_shot_correction"} <= used  # both families are really searched


@pytest.mark.parametrize("named", ["magnitude_pruning", "knowledge_distillation", "training_only_loss"])
def test_naming_a_technique_that_needs_fine_tuning_is_one_line_naming_it_and_the_valid_choices(registry, named):
    with pytest.raises(ConfigError) as caught:
        Planner(registry, ["int8_ptq", named], fine_tune=False)
    message = str(caught.value)
    assert "\n" not in message and f"{named!r} needs fine-tuning" in message and "--no-finetune" in message
    valid = message.split("valid choices: ")[1].split(", ")
    assert valid == sorted(cls.name for cls in registry.classes() if not needs_fine_tuning(cls))


def test_the_flag_and_the_config_key():
    def parsed(*argv):
        return build_parser().parse_args(["search", *argv])

    assert SearchSettings().finetune is True
    assert settings_from(parsed("--no-finetune"), {}).finetune is False
    assert settings_from(parsed(), {"finetune": False}).finetune is False
    assert settings_from(parsed("--no-finetune"), {"finetune": True}).finetune is False  # the flag wins
    assert settings_from(parsed(), {"finetune": True}).finetune is True
    with pytest.raises(ConfigError, match=r"\[search\] finetune: expected true or false, got 'no'"):
        settings_from(parsed(), {"finetune": "no"})
    with pytest.raises(ConfigError, match="--scheduler: asha compares trials between recovery epochs"):
        SearchSettings(finetune=False, backend="ray", scheduler="asha")
    stored = SearchSettings(finetune=False).to_dict()  # how workers and resumes see it
    assert SearchSettings.from_dict(json.loads(json.dumps(stored))).finetune is False


def test_only_one_shot_seeds_are_queued(registry, tiny_task):
    one_shot = seed_params(Planner(registry, fine_tune=False), tiny_task, 100_000, Budgets(), limit=10)
    labels = [label for label, _ in one_shot]
    assert labels == ["GPTQ 4-bit, groups of 128", "SparseGPT 2:4 > GPTQ 4-bit",
                      "4-bit weight-only round-to-nearest (widths spread by sensitivity)",
                      "int8 post-training quantization"]
    assert all(not any(name.startswith("recovery.") for name in params) for _, params in one_shot)
    params = dict(one_shot)["SparseGPT 2:4 > GPTQ 4-bit"]
    assert params["use.pruning"] == "sparsegpt" and params["sparsegpt.pattern"] == "2:4"
    assert params["use.quantization"] == "gptq" and params["gptq.bits"] == 4.0 and params["gptq.group_size"] == 128
    tight = seed_params(Planner(registry, fine_tune=False), tiny_task, 100_000, Budgets(max_size_bytes=10_000), 10)
    assert len(tight) == 3 and all(p.get("gptq.bits", p.get("weight_only_quant.bits")) == 2.5 for _, p in tight)
    # int8 cannot meet 10x, so its seed is left out
    fine_tuned = [label for label, _ in seed_params(Planner(registry), tiny_task, 100_000, Budgets(), limit=10)]
    assert "Deep Compression (prune > retrain > 5-bit k-means > fine-tune)" in fine_tuned


def test_sensitivity_allocates_bits_over_the_sequence_models_sites(text_task):
    """The global bit-width knob is spread by sensitivity measured on the character GPT (embeddings,
    packed attention projections, feed-forward, head), not only on LeNet."""
    sensitivity = sensitivity_of(text_task)
    keys = {site.setting_key for site in weight_sites(text_task.teacher).values()
            if not site.is_derived(text_task.teacher)}
    assert set(sensitivity.sites) == keys and len(keys) >= 6
    for site in sensitivity.sites.values():
        assert all(math.isfinite(d) and d >= 0 for d in (*site.prune.values(), *site.quant.values()))
    # 2-bit codes alone cost some site a measurable drop on this teacher: the allocation has a signal.
    assert max(site.quant["2"] for site in sensitivity.sites.values()) > 0.01
    bits = allocate_bits(sensitivity, sorted(keys), 4.0, 1.5, tuple(range(2, 9)))
    numel = {key: sensitivity.sites[key].numel for key in keys}
    assert abs(sum(bits[k] * numel[k] for k in keys) / sum(numel.values()) - 4.0) < 0.5
    assert len(set(bits.values())) > 1  # sensitive sites got wider codes than the others


def test_a_one_shot_search_trains_nothing_and_writes_its_front(text_task, tmp_path):
    settings = SearchSettings(trials=6, seed=0, finetune=False, study="one-shot", out_dir=tmp_path / "out",
                              tracking=False, progress=False, latency=LatencySettings(warmup=1, repeats=3))
    result = run_search(text_task, Budgets(), settings)
    assert len(result.trials) == 6 and all(r.state == "complete" for r in result.trials)
    for record in result.trials:
        assert record.plan["recovery"]["epochs"] == 0 and record.training_seconds == 0
        assert record.epoch_scores == [] and record.epoch_losses == []
        assert all(not needs_fine_tuning(Plugins().registry.get(s["technique"])) for s in record.plan["steps"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["finetune"] is False
    assert summary["pareto"] and {m["number"] for m in summary["pareto"]} == {r.number for r in result.pareto}
    for member in summary["pareto"]:
        assert member["measurements"]["size_bytes"] < result.baseline.size_bytes
        assert member["test_measurements"]["accuracy"] > 0
