"""Budgets: parsing the limits users type, and the violations the sampler sees."""

from __future__ import annotations

import re

import pytest

from slimforge.core.errors import ConfigError
from slimforge.search.budgets import Budgets, parse_accuracy, parse_positive_float, parse_size

UNITS = "B, KB, KiB, MB, MiB, GB, GiB"


@pytest.mark.parametrize("text, expected", [
    ("150KB", 150_000),
    ("150kb", 150_000),
    ("60KiB", 61_440),
    ("1.5MB", 1_500_000),
    ("1.5MiB", 1_572_864),
    ("2 GB", 2_000_000_000),
    ("512B", 512),
    ("60000", 60_000),
    (" 60 KB ", 60_000),
    (60_000, 60_000),
    (1.5e6, 1_500_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["60 kilobytes", "60KBs", "KB", "1,5MB", "sixty", ""])
def test_malformed_size_names_the_flag_and_the_units(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    message = str(info.value)
    assert message.startswith(f"--max-size: cannot parse {text!r};")
    assert UNITS in message


@pytest.mark.parametrize("text", ["0KB", "0", 0, -3, "-5", "-5KB"])
def test_size_must_be_positive(text):
    with pytest.raises(ConfigError, match=re.escape("--max-size: must be > 0")):
        parse_size(text)


def test_size_errors_use_the_given_field_name():
    with pytest.raises(ConfigError, match=r"^\[budgets\] max_size: cannot parse"):
        parse_size("60 kilobytes", field="[budgets] max_size")


@pytest.mark.parametrize("text, expected", [
    ("97%", 0.97), ("97", 0.97), (97, 0.97), (0.97, 0.97), ("0.97", 0.97), ("100%", 1.0), ("0%", 0.0),
    ("99.5%", 0.995),
])
def test_parse_min_accuracy_as_fraction_or_percentage(text, expected):
    assert parse_accuracy(text) == pytest.approx(expected, abs=1e-12)


def test_percent_and_fraction_forms_agree_exactly():
    assert parse_accuracy("97%") == parse_accuracy(0.97) == 0.97


@pytest.mark.parametrize("text, fragment", [
    ("high", "--min-accuracy: expected a fraction like 0.97 or a percentage like 97%, got 'high'"),
    ("101%", "--min-accuracy: must be between 0 and 1 (or 0% and 100%), got '101%'"),
    (-0.5, "--min-accuracy: must be between 0 and 1"),
])
def test_bad_min_accuracy(text, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_accuracy(text)


@pytest.mark.parametrize("text", ["0", "-1", "fast", "nan", "inf"])
def test_latency_must_be_a_positive_finite_number(text):
    with pytest.raises(ConfigError, match=re.escape("--max-latency: ")):
        parse_positive_float(text, "--max-latency")
    assert parse_positive_float("0.5", "--max-latency") == 0.5


def test_budgets_parse_all_limits():
    budgets = Budgets.parse(max_size="60KiB", max_latency="0.5", min_accuracy="97%")
    assert (budgets.max_size_bytes, budgets.max_latency_ms, budgets.min_accuracy) == (61_440, 0.5, 0.97)
    assert budgets.active
    assert budgets.describe() == "size <= 61.4 KB, latency <= 0.5 ms, accuracy >= 0.9700"
    assert not Budgets().active
    assert Budgets().describe() == "no budgets"


def test_budgets_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        Budgets(60_000)  # noqa  (positional on purpose)
    with pytest.raises(AttributeError):
        Budgets(max_size_bytes=1).max_size_bytes = 2


def test_violations_are_measured_minus_limit():
    budgets = Budgets(max_size_bytes=150_000, max_latency_ms=0.5, min_accuracy=0.97)
    assert budgets.violations(size_bytes=160_000, latency_ms=0.25, accuracy=0.96) == pytest.approx(
        {"size": 10_000.0, "latency": -0.25, "accuracy": 0.01})
    # only budgets whose measurement is known appear (e.g. size before training)
    assert budgets.violations(size_bytes=140_000) == {"size": -10_000.0}
    assert Budgets().violations(size_bytes=1, latency_ms=1.0, accuracy=0.1) == {}


def test_feasible_when_every_violation_is_at_most_zero():
    assert Budgets.feasible({"size": -1.0, "latency": 0.0, "accuracy": -0.2})
    assert not Budgets.feasible({"size": -1.0, "latency": 0.001})
    assert Budgets.feasible({})


def test_normalized_violations_are_relative_to_their_limit():
    budgets = Budgets(max_size_bytes=60_000, max_latency_ms=0.5, min_accuracy=0.97)
    normalized = budgets.normalized({"size": 1_000.0, "latency": 0.01, "accuracy": -0.0097})
    # a 1 KB overshoot of 60 KB weighs like 0.01 ms over 0.5 ms
    assert normalized == pytest.approx({"size": 1 / 60, "latency": 0.02, "accuracy": -0.01})
    assert budgets.normalized({}) == {}


def test_budgets_to_dict_keeps_the_parsed_values():
    budgets = Budgets.parse(max_size="150KB", min_accuracy=0.97)
    data = budgets.to_dict()
    assert (data["max_size_bytes"], data["max_latency_ms"], data["min_accuracy"]) == (150_000, None, 0.97)


def test_an_accuracy_drop_finer_than_the_split_warns_with_its_resolution():
    # 39 validation examples: one error costs 2.56 pt, so a 2 pt drop allows none.
    warning = Budgets.parse(max_accuracy_drop="2pt").resolution_warning(39, "balanced_accuracy")
    assert warning is not None and "\n" not in warning
    assert "2 pt" in warning and "balanced_accuracy over 39 predictions" in warning and "2.56 pt" in warning
    assert Budgets.parse(max_accuracy_drop="3pt").resolution_warning(39) is None  # one error allowed
    assert Budgets.parse(max_accuracy_drop="0pt").resolution_warning(39) is None  # "no extra error" is meant
    assert Budgets.parse(min_accuracy="0.9").resolution_warning(39) is None


def test_scored_predictions_count_examples_or_scored_tokens():
    import torch
    from torch.utils.data import TensorDataset

    from slimforge.core.outputs import IGNORE_INDEX
    from slimforge.search.budgets import scored_predictions

    images = TensorDataset(torch.zeros(39, 1, 8, 8), torch.zeros(39, dtype=torch.int64))
    assert scored_predictions(images) == 39
    tokens = torch.ones(4, 16, dtype=torch.int64)
    tokens[0, :6] = IGNORE_INDEX  # padding is not scored
    assert scored_predictions(TensorDataset(tokens, tokens)) == 4 * 16 - 6
    assert scored_predictions([(torch.zeros(3), torch.tensor(1)), (torch.zeros(3), torch.tensor(0))]) == 2


def test_a_search_warns_at_start_when_the_drop_budget_is_finer_than_its_split(tiny_task, tmp_path, capsys):
    from slimforge.app.api import SearchSettings, run_search
    from slimforge.core.measure import LatencySettings

    settings = SearchSettings(trials=1, seed=0, techniques=("int8_ptq",), study="fine", out_dir=tmp_path / "out",
                              tracking=False, progress=False, latency=LatencySettings(warmup=1, repeats=3))
    run_search(tiny_task, Budgets.parse(max_accuracy_drop="0.5pt"), settings)  # 128 examples: 0.781 pt each
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "finer than the validation split resolves" in line]
    assert len(lines) == 1 and "accuracy over 128 predictions moves in steps of 0.781 pt" in lines[0]
    printed = err.splitlines()
    baseline = next(i for i, line in enumerate(printed) if line.startswith("baseline (uncompressed)"))
    assert printed[baseline + 1] == lines[0]  # at start: right under the baseline and budgets
