"""The technique registry and the plugin manager that fills it."""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from importlib import metadata

import pytest

from slimforge.app.cli import main
from slimforge.core.errors import ConfigError, PluginError, UnknownNameError
from slimforge.core.hookspecs import hookimpl, hookspec
from slimforge.core.manager import Plugins
from slimforge.core.technique import Family, Stage, Technique, TechniqueRegistry
from slimforge.plugins import BUILTIN_PLUGINS
from slimforge.plugins.pruning.magnitude import MagnitudePruning
from slimforge.plugins.quantization.int8_ptq import Int8PTQ
from sf_testing_models import Registers

BUILTIN_SOURCE = f"slimforge {metadata.version('slimforge')}"


def plugins(*extra) -> Plugins:
    # Entry points off: a third-party package installed in the venv must not change these results.
    return Plugins(load_entry_points=False, extra_plugins=extra)


@dataclass(frozen=True, kw_only=True)
class _FrozenConfig:
    level: int = 1


def _technique(name: str, *, family=Family.SPARSITY, stage=Stage.SPARSITY, config=_FrozenConfig, **attrs):
    return type(f"T_{name}", (Technique,), {"name": name, "family": family, "stage": stage, "Config": config, **attrs})


# --- built-ins ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, family, stage", [
    (MagnitudePruning, Family.PRUNING, Stage.PRUNING),
    (Int8PTQ, Family.QUANTIZATION, Stage.QUANTIZATION),
])
def test_builtin_techniques_are_registered_with_family_stage_and_source(cls, family, stage):
    registry = plugins().registry
    assert cls.name in registry
    technique = registry.get(cls.name)
    assert type(technique) is cls
    assert (technique.family, technique.stage) == (family, stage)
    assert registry.source_of(cls.name) == BUILTIN_SOURCE


def test_every_builtin_module_registers_its_techniques_through_the_hook():
    registry = plugins().registry
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        collected = TechniqueRegistry()
        module.slimforge_register_techniques(registry=collected)
        assert len(collected) >= 1, module_name
        for name in collected.names():
            assert registry.source_of(name) == BUILTIN_SOURCE
            assert isinstance(registry.get(name).family, Family)
            assert isinstance(registry.get(name).stage, Stage)
    assert registry.names() == sorted(registry.names())


def test_get_returns_a_fresh_instance_each_time():
    registry = plugins().registry
    assert registry.get("int8_ptq") is not registry.get("int8_ptq")


# --- lookups and registration errors -------------------------------------------------------------

def test_unknown_technique_lists_every_valid_name():
    registry = plugins().registry
    with pytest.raises(UnknownNameError) as info:
        registry.get("int4_ptq")
    assert isinstance(info.value, LookupError)
    assert str(info.value) == f"technique: unknown 'int4_ptq'; valid choices: {', '.join(registry.names())}"
    assert info.value.choices == registry.names()


def test_registering_a_second_class_under_a_taken_name_is_an_error():
    clash = _technique("int8_ptq", family=Family.QUANTIZATION, stage=Stage.QUANTIZATION)
    with pytest.raises(PluginError, match=re.escape(f"technique name 'int8_ptq' registered twice ({BUILTIN_SOURCE} and extra)")):
        plugins(Registers(clash))


def test_registering_the_same_class_twice_is_harmless():
    cls = _technique("twice")
    registry = plugins(Registers(cls, cls)).registry
    assert type(registry.get("twice")) is cls
    assert registry.source_of("twice") == "extra"


def test_extra_plugin_techniques_are_listed_with_their_source():
    registry = plugins(Registers(_technique("extra_one"))).registry
    assert "extra_one" in registry.names()
    assert registry.source_of("extra_one") == "extra"


@dataclass(kw_only=True)
class _MutableConfig:
    level: int = 1


class _PlainConfig:
    level = 1


@pytest.mark.parametrize("config", [_MutableConfig, _PlainConfig], ids=["unfrozen-dataclass", "not-a-dataclass"])
def test_config_must_be_a_frozen_dataclass(config):
    registry = TechniqueRegistry()
    with pytest.raises(PluginError, match=re.escape("technique 'loose': Config must be a frozen dataclass")):
        registry.add(_technique("loose", config=config))
    assert "loose" not in registry


# --- the rules a plugin author could once only find in the source: checked when a class registers ---

@dataclass(frozen=True, kw_only=True)
class _TupleConfig:
    layers: tuple = ("fc1", "fc2")  # JSON has no tuple: a plan's config would come back with a list


@dataclass(frozen=True, kw_only=True)
class _SetConfig:
    layers: frozenset = frozenset({"fc1"})


@pytest.mark.parametrize("attrs, message", [
    ({"stage": Stage.QUANTIZATION, "needs_recovery": True},
     "technique 'late': needs_recovery is True but stage 70 runs after recovery training (stages >= 50 are "
     "finishing steps), so nothing would fine-tune its result; use a stage below 50 or needs_recovery = False"),
    ({"stage": Stage.QUANTIZATION + 5, "needs_recovery": True}, "technique 'late': needs_recovery is True but stage 75"),
    ({"config": _TupleConfig},
     "technique 'late': default config field 'layers' = ('fc1', 'fc2') comes back from JSON as ['fc1', 'fc2']; "
     "use a JSON type (list, dict, str, number, bool, None) or convert it in __post_init__"),
    ({"config": _SetConfig}, "technique 'late': default config field 'layers' is not JSON (Object of type frozenset"),
    ({"suggest": lambda self, space: None}, "technique 'late': suggest must take (self, space, task), got suggest(self, space)"),
], ids=["needs-recovery-at-70", "needs-recovery-at-75", "tuple-field", "set-field", "suggest-signature"])
def test_a_rule_broken_at_registration_is_one_line_naming_the_field(attrs, message):
    registry = TechniqueRegistry()
    with pytest.raises(PluginError) as info:
        registry.add(_technique("late", **attrs))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert "late" not in registry


@pytest.mark.parametrize("name", ["Ternary", "h1.ternary", "a,b", "", "2bits", 5])
def test_a_name_that_cannot_prefix_parameters_or_sit_in_a_list_is_refused(name):
    with pytest.raises(PluginError, match="name must be lower-case letters, digits and underscores"):
        TechniqueRegistry().add(_technique(name))


def test_the_same_rules_admit_every_builtin_and_a_late_step_without_recovery():
    registry = TechniqueRegistry()
    registry.add(_technique("late_ok", stage=Stage.QUANTIZATION + 5, needs_recovery=False))
    registry.add(_technique("early_recovering", stage=Stage.PRUNING, needs_recovery=True))
    assert plugins().registry.names()  # every built-in passes the same checks (a failure would raise)


def test_stage_phases_say_what_each_range_triggers():
    from slimforge.core.technique import retrains_before_sharing, stage_phase

    assert [stage_phase(s) for s in (10, 44, 45, 47, 48, 49, 50, 70, 75)] == [
        "structural", "structural", "sharing", "sharing", "training", "training", "finishing", "finishing", "finishing"]
    assert retrains_before_sharing([20, 46]) and not retrains_before_sharing([20, 48]) and not retrains_before_sharing([45])


def test_technique_class_missing_required_attributes_is_rejected():
    incomplete = type("Incomplete", (Technique,), {"name": "incomplete", "Config": _FrozenConfig})
    with pytest.raises(PluginError, match="technique class Incomplete lacks family, stage"):
        TechniqueRegistry().add(incomplete)


def test_config_from_dict_rejects_unknown_options_and_bad_values():
    with pytest.raises(UnknownNameError, match=re.escape(
            "magnitude_pruning option: unknown 'sparsty'; valid choices: default_sparsity, sparsity")):
        MagnitudePruning.config_from_dict({"sparsty": {"fc1": 0.5}})
    with pytest.raises(ConfigError, match=re.escape("magnitude_pruning.sparsity['fc1']: must be in [0, 1), got 1.5")):
        MagnitudePruning.config_from_dict({"sparsity": {"fc1": 1.5}})
    config = MagnitudePruning.config_from_dict({"sparsity": {"fc1": 0.5}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default_sparsity = 0.3


# --- hooks ----------------------------------------------------------------------------------------

class _MarkedUnknownHook:
    @hookimpl
    def slimforge_trial_finished(self, record):  # typo of slimforge_trial_end
        return None


class _UnmarkedUnknownHook:
    def slimforge_trial_finished(self, record):
        return None


@pytest.mark.parametrize("plugin", [_MarkedUnknownHook(), _UnmarkedUnknownHook()], ids=["hookimpl", "plain-method"])
def test_plugin_implementing_an_unknown_hook_is_rejected(plugin):
    with pytest.raises(PluginError, match="implements unknown hook 'slimforge_trial_finished'"):
        plugins(plugin)


class _NewHookSpecs:
    @hookspec
    def slimforge_custom_event(self, payload):
        """A hook a plugin adds through slimforge_addhooks."""


class _AddsAndImplementsAHook:
    @hookimpl
    def slimforge_addhooks(self, pluginmanager):
        pluginmanager.add_hookspecs(_NewHookSpecs)

    @hookimpl
    def slimforge_custom_event(self, payload):
        return payload * 2


def test_hooks_added_through_addhooks_are_not_unknown():
    manager = plugins(_AddsAndImplementsAHook())
    assert manager.pm.hook.slimforge_custom_event(payload=21) == [42]


def test_measure_size_hook_prefers_a_plugin_over_the_core_default(tmp_path):
    path = tmp_path / "model.slim"
    path.write_bytes(b"x" * 123)
    assert plugins().measure_size(path) == 123

    class HalfSize:
        @hookimpl
        def slimforge_measure_size(self, path):
            return 7

    assert plugins(HalfSize()).measure_size(path) == 7


# --- plugins list ---------------------------------------------------------------------------------

def test_plugins_list_prints_one_row_per_technique(capsys):
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", out[0]) == ["technique", "family", "stage", "one-shot", "source", "description"]
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line, maxsplit=5) for line in out[1:])}
    assert sorted(rows) == plugins().registry.names()
    assert rows["int8_ptq"] == ["int8_ptq", "quantization", "70 (quantization)", "yes", BUILTIN_SOURCE,
                                Int8PTQ.description]
    assert rows["magnitude_pruning"] == ["magnitude_pruning", "pruning", "20 (pruning)", "no", BUILTIN_SOURCE,
                                         MagnitudePruning.description]


def test_plugin_rows_match_the_registry():
    manager = plugins(Registers(_technique("extra_one")))
    rows = {row["technique"]: row for row in manager.plugin_rows()}
    assert rows["extra_one"] == {"technique": "extra_one", "family": "sparsity", "stage": "40 (sparsity)",
                                 "one-shot": "yes", "source": "extra", "description": ""}
    assert rows["int8_ptq"]["source"] == BUILTIN_SOURCE
