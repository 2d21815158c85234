"""The command line on bad input: exit code 2, one 'slimforge: error: ...' line, no traceback
unless --debug."""

from __future__ import annotations

import json
import subprocess

import pytest

import sf_testing_models
from slimforge.app.cli import main
from slimforge.search.settings import config_keys
from slimforge.core.compressed import save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.measure import evaluate
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext

SIZE_ERROR = ("--max-size: cannot parse '60 kilobytes'; give bytes or a number with one of "
              "B, KB, KiB, MB, MiB, GB, GiB (e.g. 60KB)")


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The single error line, checked to be the last line of stderr, with no traceback anywhere."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("slimforge: error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    return errors[0].removeprefix("slimforge: error: ")


@pytest.fixture
def write_config(tmp_path):
    def write(model="sf_testing_models:trained_tiny_cnn", extra=""):
        path = tmp_path / "task.toml"
        path.write_text(sf_testing_models.task_toml(model, extra))
        return path
    return write


def search_args(tmp_path, *extra):
    return ["search", "--out", tmp_path / "out", "--no-tracking", "--no-progress", *extra]


# --- search: each bad input names its field and the valid choices ----------------------------------

def test_unknown_technique(capsys, tmp_path, write_config):
    code, out, err = run_main(capsys, *search_args(tmp_path, "--config", write_config(),
                                                   "--techniques", "magnitude_pruning,int4_ptq"))
    assert code == 2
    names = ", ".join(Plugins().registry.names())
    assert error_line(err) == f"technique: unknown 'int4_ptq'; valid choices: {names}"
    assert out == ""
    assert not (tmp_path / "out").exists()  # rejected before any work


def test_malformed_size_budget(capsys, tmp_path):
    code, out, err = run_main(capsys, *search_args(tmp_path, "--max-size", "60 kilobytes"))
    assert code == 2
    assert err == f"slimforge: error: {SIZE_ERROR}\n"  # nothing else is printed
    assert out == ""


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "task.toml"
    code, _, err = run_main(capsys, *search_args(tmp_path, "--config", missing))
    assert code == 2
    assert error_line(err) == f"config file not found: {missing}"


def test_model_factory_that_raises(capsys, tmp_path, write_config):
    code, _, err = run_main(capsys, *search_args(tmp_path, "--config", write_config("sf_testing_models:broken_model")))
    assert code == 2
    assert error_line(err) == ("[task] model: sf_testing_models:broken_model raised RuntimeError: "
                               "checkpoint weights.pt not found")


def test_unknown_search_key_in_config(capsys, tmp_path, write_config):
    code, _, err = run_main(capsys, *search_args(tmp_path, "--config", write_config(extra="[search]\ntrails = 3\n")))
    assert code == 2
    assert error_line(err) == f"[search] key: unknown 'trails'; valid choices: {', '.join(config_keys())}"


@pytest.mark.parametrize("extra, expected", [
    ("[budgets]\nmax_sise = '60KB'\n", "[budgets] key: unknown 'max_sise'; valid choices: max_accuracy_drop, "
                                       "max_latency, max_size, min_accuracy"),
    ("[serach]\ntrials = 3\n", "table: unknown 'serach'; valid choices: budgets, search, task"),
    ("[budgets]\nmax_size = '60 kilobytes'\n", "cannot parse '60 kilobytes'"),
    ("[search]\nregister_min_accuracy = '150%'\n",
     "[search] register_min_accuracy: must be between 0 and 1 (or 0% and 100%), got '150%'"),
    ("[search]\nregister_max_accuracy_drop = true\n",
     "[search] register_max_accuracy_drop: expected points like \"10pt\" or a fraction like 0.1, got True"),
])
def test_bad_config_tables(capsys, tmp_path, write_config, extra, expected):
    code, _, err = run_main(capsys, *search_args(tmp_path, "--config", write_config(extra=extra)))
    assert code == 2
    assert expected in error_line(err)


@pytest.mark.parametrize("args, expected", [
    (["--trials", "0"], "--trials: must be >= 1, got 0"),
    (["--device", "tpu"], "--device: unknown 'tpu'; valid choices: cpu, cuda"),
    (["--min-accuracy", "150%"], "--min-accuracy: must be between 0 and 1 (or 0% and 100%), got '150%'"),
    (["--max-latency", "fast"], "--max-latency: expected a number, got 'fast'"),
    (["--register-min-accuracy", "150%"], "--register-min-accuracy: must be between 0 and 1 (or 0% and 100%), got '150%'"),
])
def test_bad_flags(capsys, tmp_path, args, expected):
    code, _, err = run_main(capsys, *search_args(tmp_path, *args))
    assert code == 2
    assert error_line(err) == expected


def test_unknown_task_name(capsys, tmp_path):
    from slimforge.core.task import builtin_tasks

    code, _, err = run_main(capsys, *search_args(tmp_path, "--task", "mnist"))
    assert code == 2
    message = error_line(err)
    assert message.startswith("task: unknown 'mnist'; valid choices: ")
    listed = set(message.partition("valid choices: ")[2].split(", "))
    assert {"mnist-lenet5", "<path to a task .toml>", *builtin_tasks()} <= listed


def test_argparse_type_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["search", "--trials", "many"])
    assert info.value.code == 2
    assert "argument --trials: invalid int value: 'many'" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run_main(capsys)
    assert code == 2
    assert "search" in out and "evaluate" in out and "plugins" in out


def test_debug_reraises_in_process(tmp_path):
    with pytest.raises(ConfigError, match="--max-size: cannot parse"):
        main(["--debug", *map(str, search_args(tmp_path, "--max-size", "60 kilobytes"))])


# --- evaluate -------------------------------------------------------------------------------------

@pytest.fixture
def tiny_artifact(tiny_task, tmp_path):
    path = tmp_path / "tiny.slim"
    plan = Plan(steps=(PlanStep("magnitude_pruning", {"sparsity": {}, "default_sparsity": 0.5}),))
    pruning = Plugins().registry.get("magnitude_pruning")
    model = pruning.apply(tiny_task.teacher, pruning.config_from_dict(plan.steps[0].config),
                          TechniqueContext(task=tiny_task))
    save_model(model, path, task=tiny_task, plan=plan)
    return path, evaluate(model, tiny_task.split("test"), tiny_task.metric)


def test_evaluate_reports_the_artifact_on_its_own(capsys, tiny_artifact):
    path, test_accuracy = tiny_artifact
    code, out, err = run_main(capsys, "evaluate", path, "--json")
    assert code == 0, err
    measured = json.loads(out)
    assert measured["accuracy"] == test_accuracy
    assert measured["size_bytes"] == path.stat().st_size
    assert measured["split"] == "test"


def test_evaluate_unknown_split(capsys, tiny_artifact):
    code, _, err = run_main(capsys, "evaluate", tiny_artifact[0], "--split", "dev")
    assert code == 2
    assert error_line(err) == "split: unknown 'dev'; valid choices: test, train, val"


def test_evaluate_missing_artifact(capsys, tmp_path):
    code, _, err = run_main(capsys, "evaluate", tmp_path / "trial-0003.slim")
    assert code == 2
    assert error_line(err) == f"artifact: file not found: {tmp_path / 'trial-0003.slim'}"


def test_evaluate_a_file_that_is_not_an_artifact(capsys, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04not a slimforge artifact")
    code, _, err = run_main(capsys, "evaluate", path)
    assert code == 2
    assert error_line(err) == f"not a slimforge artifact: {path}"


# --- the installed command, in a fresh process ----------------------------------------------------

def test_console_script_error_is_one_line_and_exit_2(tmp_path, subprocess_env, slimforge_cmd):
    proc = subprocess.run([*slimforge_cmd, "search", "--max-size", "60 kilobytes", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"slimforge: error: {SIZE_ERROR}\n"


def test_console_script_with_debug_shows_the_traceback(tmp_path, subprocess_env, slimforge_cmd):
    proc = subprocess.run([*slimforge_cmd, "--debug", "search", "--max-size", "60 kilobytes",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.rstrip().splitlines()[-1] == f"slimforge.core.errors.ConfigError: {SIZE_ERROR}"


def test_evaluate_never_builds_the_teacher(capsys, tmp_path, tiny_task):
    """Scoring an artifact needs its architecture and data, not the (possibly expensive) original
    model: here the task's model factory raises, and evaluate must not call it."""
    from slimforge.core.task import Task

    table = sf_testing_models.task_table("sf_testing_models:broken_model") | {"architecture": "sf_testing_models:tiny_cnn"}
    task = Task(name="tiny", architecture=tiny_task.architecture, teacher_factory=sf_testing_models.broken_model,
                splits=tiny_task.splits, source={"config": table, "base_dir": str(sf_testing_models.TESTS_DIR)})
    path = tmp_path / "model.slim"
    model = sf_testing_models.trained_tiny_cnn()
    save_model(model, path, task=task, plan=Plan())
    code, out, err = run_main(capsys, "evaluate", path, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == evaluate(model, tiny_task.split("test"), tiny_task.metric)


def test_bad_input_is_rejected_before_torch_is_imported():
    """A bad flag value answers in well under a second: nothing on the way to the check imports
    torch (several seconds cold).  A fresh interpreter, so no earlier test's imports count."""
    import subprocess
    import sys

    code = ("import sys\nfrom slimforge.app.cli import main\n"
            "try:\n    main(['search', '--max-size', '12XB'])\nexcept SystemExit as exc:\n    assert exc.code == 2\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


# --- packaging: what `pip install slimforge` users expect of a package ------------------------

def test_version_flag_prints_the_installed_version(capsys):
    from importlib import metadata

    import slimforge

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"slimforge {metadata.version('slimforge')}\n"
    assert slimforge.__version__ == metadata.version("slimforge")


def test_python_dash_m_slimforge_runs_the_command(subprocess_env, tmp_path):
    """`python -m slimforge` is the console script: the same version line, the same one-line
    error and exit code 2 on bad input."""
    import sys

    version = subprocess.run([sys.executable, "-m", "slimforge", "--version"], capture_output=True, text=True,
                             env=subprocess_env, cwd=tmp_path, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("slimforge ")
    bad = subprocess.run([sys.executable, "-m", "slimforge", "search", "--max-size", "60 kilobytes"],
                         capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=120)
    assert (bad.returncode, bad.stderr) == (2, f"slimforge: error: {SIZE_ERROR}\n")


def test_the_package_is_typed_and_licensed_as_its_metadata_says():
    """PEP 561's marker ships inside the package (package data), and the LICENSE file is the
    license the metadata names."""
    import tomllib
    from importlib import metadata, resources

    root = sf_testing_models.TESTS_DIR.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert resources.files("slimforge").joinpath("py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["slimforge"]
    assert pyproject["project"]["license"] == "Apache-2.0" == metadata.metadata("slimforge")["License-Expression"]
    assert "LICENSE" in metadata.metadata("slimforge").get_all("License-File")
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_a_search_whose_feasible_trials_are_all_under_the_floor_says_so():
    from slimforge.app.cli import format_result
    from slimforge.core.measure import Measurements
    from slimforge.search.records import COMPLETE, SearchResult, TrialRecord

    collapsed = TrialRecord(number=0, state=COMPLETE, plan={}, plan_text="p", feasible=True,
                            measurements=Measurements(accuracy=0.1, size_bytes=10, latency_ms=0.1))
    base = Measurements(accuracy=0.9, size_bytes=1000, latency_ms=0.1)
    result = SearchResult(study_name="s", task="t", budgets={}, baseline=base, baseline_test=base, trials=[collapsed],
                          pareto=[], registration_floor={"min_accuracy": 0.8, "rule": "baseline 0.9000 - 10 pt"})
    text = format_result(result)
    assert "no Pareto front: all 1 feasible trial(s) are below the registration floor 0.8000" in text
