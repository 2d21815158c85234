"""Settings and budgets are declared once (``SearchSettings`` / ``Budgets`` field metadata): the
flags, the config-file keys, the type errors and the README's tables all come from there."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimforge.app.cli import build_parser
from slimforge.core.errors import ConfigError, SlimforgeError
from slimforge.search import budgets, settings
from slimforge.search.settings import SearchSettings, settings_from

README = Path(__file__).resolve().parents[2] / "README.md"


def _search_args(*argv: str):
    return build_parser().parse_args(["search", *argv])


@pytest.mark.parametrize("table", [settings.docs_table, budgets.docs_table])
def test_the_readme_holds_the_generated_tables(table):
    assert table() in README.read_text(), f"README.md: paste the output of {table.__module__}.{table.__name__}()"


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    search = build_parser()._subparsers._group_actions[0].choices["search"]
    flags = {flag for action in search._actions for flag in action.option_strings if flag.startswith("--")}
    declared = {meta["flag"] for _, _, meta in settings._flat_options()} | {
        meta["flag"] for _, meta in budgets.budget_fields()}
    task_flags = {"--task", "--config", "--data-dir", "--download", "--teacher-epochs", "--cache-dir", "--help"}
    assert declared <= flags
    assert flags - declared - task_flags == set()


def test_a_config_file_and_the_flags_give_the_same_settings():
    table = {"trials": 7, "timeout": 30, "techniques": ["int8_ptq"], "disable_plugins": "a, b", "seed": 3,
             "trial_memory_limit": "2GB", "latency_repeats": 5, "tracking": False,
             "register_max_accuracy_drop": "5pt"}
    from_file = settings_from(_search_args(), table)
    from_flags = settings_from(_search_args("--trials", "7", "--timeout", "30", "--techniques", "int8_ptq",
                                            "--disable-plugins", "a,b", "--seed", "3", "--trial-memory-limit", "2GB",
                                            "--latency-repeats", "5", "--no-tracking",
                                            "--register-max-accuracy-drop", "5pt"), {})
    assert from_file == from_flags
    assert from_file.latency.repeats == 5 and from_file.trial_memory_limit == 2_000_000_000
    assert from_file.disabled_plugins == ("a", "b") and from_file.register_max_accuracy_drop == 0.05


def test_a_flag_overrides_the_file_and_the_file_is_still_type_checked():
    assert settings_from(_search_args("--trials", "4"), {"trials": 9}).trials == 4
    with pytest.raises(ConfigError, match=r"^\[search\] trials: expected an integer, got 'many'$"):
        settings_from(_search_args("--trials", "4"), {"trials": "many"})


@pytest.mark.parametrize("kwargs, message", [
    ({"trials": 0}, "--trials: must be >= 1, got 0"),
    ({"timeout_s": -1.0}, "--timeout: must be > 0 seconds, got -1.0"),
    ({"device": "tpu"}, "--device: unknown 'tpu'; valid choices: cpu, cuda"),
    ({"gpus_per_trial": 0.5}, "--gpus-per-trial: only applies to --backend ray (this search uses --backend optuna)"),
    ({"backend": "ray", "trial_timeout_s": 5.0}, "--trial-timeout: not supported with --backend ray"),
])
def test_validation_messages_name_the_flag(kwargs, message):
    with pytest.raises(SlimforgeError) as info:
        SearchSettings(**kwargs)
    assert str(info.value).startswith(message)


def test_settings_survive_the_round_trip_through_a_study():
    original = SearchSettings(trials=3, techniques=("int8_ptq",), disabled_plugins=("x",), out_dir="o")
    assert SearchSettings.from_dict(original.to_dict()) == original


def test_latency_warmup_is_a_flag_and_a_config_key():
    assert settings_from(_search_args("--latency-warmup", "3"), {}).latency.warmup == 3
    assert settings_from(_search_args(), {"latency_warmup": 0}).latency.warmup == 0
    with pytest.raises(ConfigError, match="latency warmup: must be >= 0, got -1"):
        settings_from(_search_args("--latency-warmup", "-1"), {})
