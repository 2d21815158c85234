"""Third-party plugins found through the ``slimforge`` entry-point group: the failure policy
(name it on stderr and skip it, or fail with strict), disabling, autoload off, composition rules,
and the example package of examples/third_party_plugin installed for real.

Fake distributions are a ``*.dist-info`` folder (``METADATA`` + ``entry_points.txt``) and a module
in a temporary folder put on ``sys.path``: ``importlib.metadata`` finds them exactly as it finds an
installed package, with no pip and no network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

import sf_testing_models
from slimforge.app.cli import main
from slimforge.core.errors import PluginError
from slimforge.core.manager import Plugins
from slimforge.core.technique import Stage, Technique
from slimforge.core.planner import Planner
from slimforge.core.space import FixedSuggester

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "third_party_plugin"
EXAMPLE_DIST = "slimforge-example-plugins"

BROKEN = """raise RuntimeError("boom at import")\n"""

# A well-formed third-party plugin with a family and a stage the built-ins do not have.
GOOD = """
from dataclasses import dataclass
from slimforge.core.hookspecs import hookimpl
from slimforge.core.technique import Stage, Technique

@dataclass(frozen=True, kw_only=True)
class Config:
    level: int = 1

class Polish(Technique):
    name = "polish"
    family = "finishing"
    stage = Stage.QUANTIZATION + 5
    Config = Config
    description = "A third-party technique."

@hookimpl
def slimforge_register_techniques(registry):
    registry.add(Polish)
"""

UNKNOWN_HOOK = GOOD.replace('"polish"', '"typo_plugin_technique"') + """
@hookimpl
def slimforge_trial_finished(record):  # a typo of slimforge_trial_end
    return None
"""

BAD_FAMILY = GOOD.replace('family = "finishing"', "family = 3").replace('"polish"', '"bad_family"')


def _make_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str],
                       version: str = "1.0") -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[slimforge]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path to put fake distributions in; modules imported from it are forgotten
    afterwards, so the next test imports its own."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield root
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(root)):
            del sys.modules[name]


@pytest.fixture
def broken_plugin(site) -> Path:
    _make_distribution(site, "slimforge-broken", {"broken": "sf_broken_plugin"}, {"sf_broken_plugin": BROKEN})
    return site


BROKEN_REASON = "slimforge-broken 1.0: failed to load: RuntimeError: boom at import"


# --- (a) a plugin that fails to import --------------------------------------------------------------

def test_a_plugin_that_fails_to_import_is_named_on_stderr_and_skipped(broken_plugin, capsys):
    plugins = Plugins()
    assert plugins.skipped == [("broken", BROKEN_REASON)]
    assert capsys.readouterr().err == f"slimforge: warning: skipping plugin 'broken': {BROKEN_REASON}\n"
    assert "int8_ptq" in plugins.registry  # the built-ins are all there


def test_strict_mode_raises_naming_the_plugin(broken_plugin):
    with pytest.raises(PluginError) as info:
        Plugins(strict=True)
    assert str(info.value) == f"plugin 'broken' ({BROKEN_REASON}); run without --strict-plugins to skip it"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_plugins_list_shows_the_skipped_plugin_and_strict_exits_2(broken_plugin, capsys):
    assert main(["plugins", "list"]) == 0
    captured = capsys.readouterr()
    assert f"skipped plugin broken: {BROKEN_REASON}" in captured.out.splitlines()
    assert main(["plugins", "list", "--strict-plugins"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"slimforge: error: plugin 'broken' ({BROKEN_REASON}); run without --strict-plugins to skip it")


def test_strict_plugins_on_the_installed_command_exits_2(broken_plugin, subprocess_env, slimforge_cmd):
    env = {**subprocess_env, "PYTHONPATH": os.pathsep.join([str(broken_plugin), subprocess_env["PYTHONPATH"]])}
    env.pop("SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run([*slimforge_cmd, "plugins", "list", "--strict-plugins"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"slimforge: error: plugin 'broken' ({BROKEN_REASON}); run without --strict-plugins to skip it\n"
    assert proc.stdout == ""


# --- (b) a plugin that loads but breaks the contract ------------------------------------------------

def test_a_plugin_implementing_an_unknown_hook_is_skipped(site, capsys):
    _make_distribution(site, "slimforge-typo", {"typo": "sf_typo_plugin"}, {"sf_typo_plugin": UNKNOWN_HOOK})
    plugins = Plugins()
    reason = "slimforge-typo 1.0: implements unknown hook 'slimforge_trial_finished'"
    assert plugins.skipped == [("typo", reason)]
    assert capsys.readouterr().err == f"slimforge: warning: skipping plugin 'typo': {reason}\n"
    assert "typo_plugin_technique" not in plugins.registry  # unregistered before techniques are collected
    assert not plugins.pm.has_plugin("typo")
    with pytest.raises(PluginError, match=re.escape(f"plugin 'typo' ({reason})")):
        Plugins(strict=True)


def test_a_plugin_whose_technique_breaks_the_contract_is_skipped(site, capsys):
    _make_distribution(site, "slimforge-badfamily", {"badfamily": "sf_badfamily_plugin"},
                       {"sf_badfamily_plugin": BAD_FAMILY})
    plugins = Plugins()
    reason = ("slimforge-badfamily 1.0: failed to register techniques: PluginError: technique 'bad_family': "
              "family must be a Family or a non-empty string, got 3")
    assert plugins.skipped == [("badfamily", reason)]
    assert "bad_family" not in plugins.registry
    assert capsys.readouterr().err == f"slimforge: warning: skipping plugin 'badfamily': {reason}\n"


# A hook implementation with an argument the hookspec does not have: pluggy refuses it at registration.
WRONG_SIGNATURE = GOOD.replace('"polish"', '"h1_ternary"').replace(
    "def slimforge_register_techniques(registry):", "def slimforge_register_techniques(registry, task):")
WRONG_SIGNATURE_REASON = ("slimforge-h1 0.3: failed to load: PluginValidationError: Plugin 'h1' for hook "
                          "'slimforge_register_techniques'; hookimpl definition: slimforge_register_techniques"
                          "(registry, task); Argument(s) {'task'} are declared in the hookimpl but can not be found "
                          "in the hookspec")


def test_a_hook_signature_error_is_one_startup_line_and_the_answer_when_its_technique_is_asked_for(site, capsys):
    _make_distribution(site, "slimforge-h1", {"h1": "sf_h1_plugin"}, {"sf_h1_plugin": WRONG_SIGNATURE}, "0.3")
    plugins = Plugins()
    assert capsys.readouterr().err == f"slimforge: warning: skipping plugin 'h1': {WRONG_SIGNATURE_REASON}\n"
    expected = f"technique 'h1_ternary': installed but failed to load: plugin 'h1' ({WRONG_SIGNATURE_REASON})"
    with pytest.raises(LookupError) as info:  # still an UnknownNameError for callers that catch one
        plugins.registry.get("h1_ternary")
    assert str(info.value) == expected
    with pytest.raises(LookupError, match=re.escape(expected)):
        Planner(plugins.registry, ["h1_ternary", "magnitude_pruning"])
    # A name no plugin is known to provide still lists the valid ones, and says which plugin failed.
    with pytest.raises(LookupError) as info:
        plugins.registry.get("h2_binary")
    assert str(info.value).startswith("technique: unknown 'h2_binary'; valid choices: awq, cosine_merge, ")
    assert str(info.value).endswith(f"; plugins that failed to load: 'h1' ({WRONG_SIGNATURE_REASON})")


def test_the_search_command_answers_failed_to_load_before_any_work(site, capsys, tmp_path):
    _make_distribution(site, "slimforge-h1", {"h1": "sf_h1_plugin"}, {"sf_h1_plugin": WRONG_SIGNATURE}, "0.3")
    config = tmp_path / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    assert main(["search", "--config", str(config), "--techniques", "h1_ternary", "--trials", "1", "--no-tracking",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"slimforge: warning: skipping plugin 'h1': {WRONG_SIGNATURE_REASON}",
                   f"slimforge: error: technique 'h1_ternary': installed but failed to load: plugin 'h1' "
                   f"({WRONG_SIGNATURE_REASON})"], err
    assert not (tmp_path / "out" / "baseline.slim").exists()  # refused before the baseline was measured


def test_a_plugin_passed_explicitly_and_installed_too_is_registered_once(site, capsys):
    _make_distribution(site, "slimforge-polish", {"polish": "sf_polish_plugin"}, {"sf_polish_plugin": GOOD}, "2.0")
    import sf_polish_plugin

    plugins = Plugins(extra_plugins=(sf_polish_plugin,))
    assert capsys.readouterr().err == ""
    assert plugins.registry.source_of("polish") == "slimforge-polish 2.0"  # the entry point's, not "extra"
    assert [p for p in plugins.pm.get_plugins() if p is sf_polish_plugin] == [sf_polish_plugin]


# --- a working third-party plugin, and (c) disabling by name ----------------------------------------

def test_a_third_party_technique_is_listed_with_its_package_family_and_stage(site):
    _make_distribution(site, "slimforge-polish", {"polish": "sf_polish_plugin"}, {"sf_polish_plugin": GOOD}, "2.0")
    plugins = Plugins()
    assert plugins.skipped == []
    rows = {row["technique"]: row for row in plugins.plugin_rows()}
    assert rows["polish"] == {"technique": "polish", "family": "finishing", "stage": "75 (after quantization)",
                              "one-shot": "yes", "source": "slimforge-polish 2.0", "description": "A third-party technique."}


def test_disabling_a_plugin_by_its_entry_point_name_never_imports_it(broken_plugin, capsys):
    plugins = Plugins(disabled=("broken",))
    assert plugins.skipped == [("broken", "slimforge-broken 1.0: disabled by configuration")]
    assert capsys.readouterr().err == ""  # not imported, so nothing failed
    assert main(["plugins", "list", "--strict-plugins", "--disable-plugins", "broken"]) == 0


def test_disabling_by_technique_name_leaves_the_technique_out(site, capsys):
    _make_distribution(site, "slimforge-polish", {"polish": "sf_polish_plugin"}, {"sf_polish_plugin": GOOD}, "2.0")
    assert "polish" in Plugins().registry
    registry = Plugins(disabled=("polish", "int8_ptq")).registry
    assert "polish" not in registry and "int8_ptq" not in registry and "weight_only_quant" in registry
    assert main(["plugins", "list", "--disable-plugins", "polish, int8_ptq"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert "polish" not in listed and "int8_ptq" not in listed and "weight_only_quant" in listed


# --- (d) autoload off --------------------------------------------------------------------------------

def test_disable_plugin_autoload_skips_every_entry_point(broken_plugin, monkeypatch, capsys):
    _make_distribution(broken_plugin, "slimforge-polish", {"polish": "sf_polish_plugin"}, {"sf_polish_plugin": GOOD})
    monkeypatch.setenv("SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins = Plugins(strict=True)  # the broken plugin is never imported, so strict has nothing to fail on
    assert plugins.skipped == [] and capsys.readouterr().err == ""
    assert "polish" not in plugins.registry and "int8_ptq" in plugins.registry
    assert "sf_broken_plugin" not in sys.modules and "sf_polish_plugin" not in sys.modules


# --- (e) composition rules ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _LevelConfig:
    level: int = 1


def _technique(name, family, stage, **rules):
    def suggest(self, space, task):
        return _LevelConfig(level=space.suggest_int("level", 1, 3))

    return type(name, (Technique,), {"name": name, "family": family, "stage": stage, "Config": _LevelConfig,
                                     "description": name, "suggest": suggest, **rules})


# Third-party families and stages; two pairs that must never share a plan, each forbidden by only
# one side: ``early`` may not precede ``late``, and ``middle`` may not follow ``early``.
_COMPOSERS = (_technique("early", "alpha", Stage.PRUNING, cannot_precede=frozenset({"late"})),
              _technique("middle", "beta", Stage.SPARSITY + 2, cannot_follow=frozenset({"early"})),
              _technique("late", "omega", Stage.QUANTIZATION + 5))


def test_the_planner_never_samples_a_forbidden_composition():
    registry = Plugins(load_entry_points=False, extra_plugins=(sf_testing_models.Registers(*_COMPOSERS),)).registry
    planner = Planner(registry, ["late", "middle", "early"])
    task = sf_testing_models.tiny_task()
    seen = set()
    for seed in range(200):
        names = planner.sample(FixedSuggester(seed=seed), task, seed).technique_names
        assert not {"early", "late"} <= set(names), names
        assert not {"early", "middle"} <= set(names), names
        assert names == sorted(names, key=lambda n: registry.get(n).stage)
        seen.add(tuple(names))
    # Every allowed plan turns up, so the rules are honoured by construction, not by luck.
    assert seen == {("early",), ("middle",), ("late",), ("middle", "late")}


# --- (f) the example package, installed for real -----------------------------------------------------

def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def _is_installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def example_package(tmp_path):
    """Install examples/third_party_plugin into this environment; uninstalled at teardown whatever
    the test did.  Built from a copy, so no build/ or *.egg-info lands in the repository."""
    if _is_installed(EXAMPLE_DIST):
        pytest.skip(f"{EXAMPLE_DIST} is already installed here; this test would uninstall it")
    source = tmp_path / EXAMPLE_DIST
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                                   ".pytest_cache"))
    try:
        proc = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source))
        assert proc.returncode == 0, proc.stderr
        yield source
    finally:
        _pip("uninstall", "-y", EXAMPLE_DIST)


def _listed(slimforge_cmd, env) -> dict[str, list[str]]:
    proc = subprocess.run([*slimforge_cmd, "plugins", "list", "--strict-plugins"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line, maxsplit=5) for line in proc.stdout.splitlines()[1:])}


@pytest.mark.slow
def test_the_example_plugin_installs_searches_and_uninstalls(example_package, tmp_path, subprocess_env, slimforge_cmd):
    env = dict(subprocess_env)
    env.pop("SLIMFORGE_DISABLE_PLUGIN_AUTOLOAD", None)
    env["OMP_NUM_THREADS"] = "1"
    rows = _listed(slimforge_cmd, env)
    # technique, family, stage, one-shot (joins --no-finetune: neither needs fine-tuning), source
    assert rows["bias_correction"][:5] == ["bias_correction", "correction", "75 (after quantization)", "yes",
                                           f"{EXAMPLE_DIST} 0.2.0"]
    assert rows["ternary"][:5] == ["ternary", "quantization", "70 (quantization)", "yes", f"{EXAMPLE_DIST} 0.2.0"]

    config = tmp_path / "task.toml"
    config.write_text(sf_testing_models.task_toml())
    out = tmp_path / "out"
    proc = subprocess.run([*slimforge_cmd, "search", "--config", str(config), "--techniques",
                           "weight_only_quant,bias_correction", "--trials", "3", "--no-tracking", "--no-progress",
                           "--strict-plugins", "--latency-repeats", "5", "--seed", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads((out / "summary.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 3, [t.get("failure_reason") for t in trials]
    plans = [[step["technique"] for step in t["plan"]["steps"]] for t in trials]
    # Seed 1's three trials include the plan the plugin is for: quantize, then correct.
    assert ["weight_only_quant", "bias_correction"] in plans, plans
    assert all(plan.index("bias_correction") == len(plan) - 1 for plan in plans if "bias_correction" in plan)
    notes = trials[plans.index(["weight_only_quant", "bias_correction"])]["notes"]
    # The shift's size depends on the bit widths the sampler drew (global knobs: down to 2 bits).
    assert any(re.fullmatch(r"bias_correction: corrected 3 layer\(s\); largest channel shift \d+\.\d+ in '\w+'", note)
               for note in notes), notes

    proc = _pip("uninstall", "-y", EXAMPLE_DIST)
    assert proc.returncode == 0, proc.stderr
    listed = _listed(slimforge_cmd, env)
    assert "bias_correction" not in listed and "ternary" not in listed
