"""Bad input: every case exits with code 2 and one line, ``slimforge: error: ...``, naming the field
and, for a name, the valid choices.  The README's "Bad input" table is checked against what the
command really prints, row by row, so the documentation cannot drift (``python tests/test_bad_input.py``
prints the rows as they are now).  A "…" in a README message stands for a list of choices that
grows with the installed plugins and settings.

Also here: artifacts and cached teachers load without unpickling, and a crafted artifact cannot make
slimforge run code (``core/trust.py`` has the threat model).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import sf_hostile_artifacts as hostile
import sf_testing_models
from sf_hostile_artifacts import Pwn, rewrite_header, tiny_artifact
from slimforge.app.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TESTS = sf_testing_models.TESTS_DIR.as_posix()
SEARCH = ["search", "--out", "out", "--no-tracking", "--no-progress"]


def config(model="sf_testing_models:trained_tiny_cnn", data="sf_testing_models:tiny_splits", task="", extra="",
           python_path=f'["{TESTS}"]') -> str:
    """A task config for the tiny task, with parts swapped for bad ones."""
    return (f'[task]\nname = "tiny"\nmodel = "{model}"\ndata = "{data}"\npython_path = {python_path}\n{task}\n'
            f'{extra}')


# --- artifacts, good and crafted --------------------------------------------------------------------

EVIL_TASK = {"config": {"name": "evil", "model": "subprocess:getoutput", "data": "subprocess:getoutput",
                        "data_kwargs": {"cmd": "touch pwned"}, "python_path": ["."]}, "base_dir": "."}


def _evil_architecture(target: str, kwargs: dict):
    def change(header):
        header["meta"]["architecture"] = {"target": target, "kwargs": kwargs}
        header["meta"]["task"] = EVIL_TASK
    return change


def _dtype(name: str):
    def change(header):
        header["tensors"][0]["dtype"] = name
    return change


def write_artifacts(root: Path) -> None:
    good = tiny_artifact(root / "good.slim")
    (root / "truncated.slim").write_bytes(good[:len(good) // 2])
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    (root / "corrupted.slim").write_bytes(bytes(flipped))
    newer = bytearray(good)
    newer[8] = 3  # the format version byte: one past the newest this slimforge reads (2, aliases)
    (root / "newer.slim").write_bytes(bytes(newer))
    (root / "model.slim").write_bytes(pickle.dumps(Pwn()))
    (root / "evil.slim").write_bytes(rewrite_header(good, _evil_architecture("subprocess:getoutput", {"cmd": "touch pwned"})))
    (root / "system.slim").write_bytes(rewrite_header(good, _evil_architecture("os:system", {"command": "touch pwned"})))
    (root / "dtype.slim").write_bytes(rewrite_header(good, _dtype("os.system")))
    (root / "bomb.slim").write_bytes(hostile.bomb_header(good))
    (root / "huge.slim").write_bytes(hostile.huge_declared_tensor(good))
    (root / "rank.slim").write_bytes(hostile.huge_low_rank(good))
    (root / "pickled.slim").write_bytes(hostile.pickle_behind_magic())
    for name, source in hostile.BAD_BUILTIN_SOURCES.items():
        (root / name).write_bytes(hostile.bad_builtin_source(good, source))
    (root / "artifacts").mkdir()
    os.mkfifo(root / "pipe.slim")


# --- the cases ----------------------------------------------------------------------------------------

@dataclass
class Case:
    input: str  # the README's first column
    shown: str  # what the user did (README's second column, inside backticks unless it has them)
    argv: list[str]
    files: dict[str, str] = field(default_factory=dict)  # written to the working directory first

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.input.lower()).strip("-")


def _cfg_case(input: str, shown: str, text: str) -> Case:
    return Case(input, shown, [*SEARCH, "--config", "task.toml"], {"task.toml": text})


CASES = [
    # budgets
    Case("size budget without a valid unit", 'slimforge search --max-size "60 kilobytes"',
         [*SEARCH, "--max-size", "60 kilobytes"]),
    Case("size budget of zero", "slimforge search --max-size 0", [*SEARCH, "--max-size", "0"]),
    Case("latency budget that is not a number", "slimforge search --max-latency fast", [*SEARCH, "--max-latency", "fast"]),
    Case("negative latency budget", "slimforge search --max-latency -1", [*SEARCH, "--max-latency=-1"]),
    Case("negative size budget", "slimforge search --max-size -5", [*SEARCH, "--max-size=-5"]),
    _cfg_case("infinite size budget in the config", "[budgets] max_size = inf", config(extra="[budgets]\nmax_size = inf\n")),
    _cfg_case("NaN size budget in the config", "[budgets] max_size = nan", config(extra="[budgets]\nmax_size = nan\n")),
    Case("accuracy floor over 100%", "slimforge search --min-accuracy 150%", [*SEARCH, "--min-accuracy", "150%"]),
    Case("accuracy drop without a number", "slimforge search --max-accuracy-drop lots",
         [*SEARCH, "--max-accuracy-drop", "lots"]),
    Case("registration floor without a number", "slimforge search --register-max-accuracy-drop lots",
         [*SEARCH, "--register-max-accuracy-drop", "lots"]),
    _cfg_case("size budget of the wrong type in the config", "[budgets] max_size = true", config(extra="[budgets]\nmax_size = true\n")),
    _cfg_case("misspelt budget in the config", "[budgets] max_sise = '60KB'", config(extra="[budgets]\nmax_sise = '60KB'\n")),
    # techniques, commands, options
    Case("unknown technique", "slimforge search --config task.toml --techniques prune_everything",
         [*SEARCH, "--config", "task.toml", "--techniques", "prune_everything"], {"task.toml": config()}),
    Case("technique that needs fine-tuning in a search without it",
         "slimforge search --config task.toml --no-finetune --techniques magnitude_pruning",
         [*SEARCH, "--config", "task.toml", "--no-finetune", "--techniques", "magnitude_pruning"],
         {"task.toml": config()}),
    Case("unknown command", "slimforge compress", ["compress"]),
    Case("unknown option", "slimforge search --max-sizes 60KB", [*SEARCH, "--max-sizes", "60KB"]),
    Case("option value of the wrong type", "slimforge search --trials many", [*SEARCH, "--trials", "many"]),
    Case("zero trials", "slimforge search --trials 0", [*SEARCH, "--trials", "0"]),
    Case("negative seed", "slimforge search --seed -1", [*SEARCH, "--seed=-1"]),
    Case("seed past the samplers' range", "slimforge search --seed 99999999999", [*SEARCH, "--seed", "99999999999"]),
    Case("output folder that is a file", "slimforge search --out results.txt", [*SEARCH, "--out", "results.txt"],
         {"results.txt": "not a folder\n"}),
    Case("output folder that cannot be created", "slimforge search --out /proc/slimforge-out",
         [*SEARCH, "--out", "/proc/slimforge-out"]),
    Case("unknown device", "slimforge search --device tpu", [*SEARCH, "--device", "tpu"]),
    Case("CUDA-graph timing on the CPU", "slimforge search --latency-cuda-graph", [*SEARCH, "--latency-cuda-graph"]),
    Case("zero workers", "slimforge search --workers 0", [*SEARCH, "--workers", "0"]),
    Case("negative trial timeout", "slimforge search --trial-timeout -5", [*SEARCH, "--trial-timeout=-5"]),
    Case("memory limit without a valid unit", "slimforge search --trial-memory-limit lots",
         [*SEARCH, "--trial-memory-limit", "lots"]),
    Case("unknown built-in task", "slimforge search --task mnist", [*SEARCH, "--task", "mnist"]),
    # the config file
    Case("config file that does not exist", "slimforge search --config nowhere.toml", [*SEARCH, "--config", "nowhere.toml"]),
    _cfg_case("config file that is not TOML", "[task", "[task\nmodel = 1\n"),
    _cfg_case("misspelt table in the config", "[serach]", config(extra="[serach]\ntrials = 3\n")),
    _cfg_case("misspelt [search] key", "[search] trails = 3", config(extra="[search]\ntrails = 3\n")),
    _cfg_case("misspelt [task] key", "[task] modle = ...", config(task='modle = "x:y"')),
    _cfg_case("[search] value of the wrong type", '[search] trials = "many"', config(extra='[search]\ntrials = "many"\n')),
    _cfg_case("[search] list of the wrong type", "[search] techniques = 5", config(extra="[search]\ntechniques = 5\n")),
    _cfg_case("[search] flag of the wrong type", "[search] tracking = 'yes'", config(extra="[search]\ntracking = 'yes'\n")),
    _cfg_case("factory that is not a string", "[task] model = 5", config().replace('model = "sf_testing_models:trained_tiny_cnn"', "model = 5")),
    _cfg_case("factory without module:function", '[task] model = "sf_testing_models"', config(model="sf_testing_models")),
    _cfg_case("factory keyword arguments that are not a table", '[task] model_kwargs = "pretrained"',
              config(task='model_kwargs = "pretrained"')),
    _cfg_case("python_path that is not a list", '[task] python_path = "src"', config(python_path='"src"')),
    # the user's model, data and metric
    _cfg_case("model factory that cannot be imported", '[task] model = "no_such_module:build"', config(model="no_such_module:build")),
    _cfg_case("model factory that raises", '[task] model = "sf_testing_models:broken_model"',
              config(model="sf_testing_models:broken_model")),
    _cfg_case("model factory that returns a state_dict, not a module", '[task] model = "sf_bad_tasks:not_a_module"',
              config(model="sf_bad_tasks:not_a_module")),
    _cfg_case("data factory that returns a list", '[task] data = "sf_bad_tasks:splits_as_a_list"',
              config(data="sf_bad_tasks:splits_as_a_list")),
    _cfg_case("data without a test split", '[task] data = "sf_bad_tasks:splits_without_test"',
              config(data="sf_bad_tasks:splits_without_test")),
    _cfg_case("empty dataset", '[task] data = "sf_bad_tasks:empty_val_splits"', config(data="sf_bad_tasks:empty_val_splits")),
    _cfg_case("images with the wrong shape", '[task] data = "sf_bad_tasks:three_channel_splits"',
              config(data="sf_bad_tasks:three_channel_splits")),
    _cfg_case("targets with the wrong shape", '[task] data = "sf_bad_tasks:one_hot_splits"',
              config(data="sf_bad_tasks:one_hot_splits")),
    _cfg_case("class labels stored as floats", '[task] data = "sf_bad_tasks:float_label_splits"',
              config(data="sf_bad_tasks:float_label_splits")),
    _cfg_case("class label the model has no score for", '[task] data = "sf_bad_tasks:label_out_of_range_splits"',
              config(data="sf_bad_tasks:label_out_of_range_splits")),
    _cfg_case("metric that returns NaN", '[task] metric = "sf_bad_tasks:nan_metric"', config(task='metric = "sf_bad_tasks:nan_metric"')),
    _cfg_case("metric that raises", '[task] metric = "sf_bad_tasks:raising_metric"', config(task='metric = "sf_bad_tasks:raising_metric"')),
    # artifacts
    Case("artifact that does not exist", "slimforge evaluate trial-0003.slim", ["evaluate", "trial-0003.slim"]),
    Case("truncated artifact", "slimforge evaluate truncated.slim", ["evaluate", "truncated.slim"]),
    Case("corrupted artifact (one flipped byte)", "slimforge evaluate corrupted.slim", ["evaluate", "corrupted.slim"]),
    Case("artifact from a newer format version", "slimforge evaluate newer.slim", ["evaluate", "newer.slim"]),
    Case("pickle file renamed .slim", "slimforge evaluate model.slim", ["evaluate", "model.slim"]),
    Case("artifact whose header names a dtype like os.system", "slimforge evaluate dtype.slim", ["evaluate", "dtype.slim"]),
    Case("artifact whose header names code to run (subprocess:getoutput)", "slimforge evaluate evil.slim",
         ["evaluate", "evil.slim"]),
    Case("artifact whose architecture factory is os:system", "slimforge evaluate system.slim", ["evaluate", "system.slim"]),
    Case("pickle behind slimforge's magic bytes", "slimforge evaluate pickled.slim", ["evaluate", "pickled.slim"]),
    Case("artifact whose header inflates to 1 GiB (zlib bomb)", "slimforge evaluate bomb.slim", ["evaluate", "bomb.slim"]),
    Case("artifact declaring a 10^9-element tensor", "slimforge evaluate huge.slim", ["evaluate", "huge.slim"]),
    Case("artifact asking low_rank for rank 10^6", "slimforge evaluate rank.slim", ["evaluate", "rank.slim"]),
    Case("built-in task source with an unknown argument", "slimforge evaluate bogus-kwargs.slim",
         ["evaluate", "bogus-kwargs.slim"]),
    Case("built-in task source with arguments that are a string", "slimforge evaluate string-kwargs.slim",
         ["evaluate", "string-kwargs.slim"]),
    Case("built-in torchvision task source without arguments", "slimforge evaluate torchvision-no-kwargs.slim",
         ["evaluate", "torchvision-no-kwargs.slim"]),
    Case("evaluate a folder", "slimforge evaluate artifacts", ["evaluate", "artifacts"]),
    Case("evaluate a named pipe", "slimforge evaluate pipe.slim", ["evaluate", "pipe.slim"]),
    Case("unknown split", "slimforge evaluate good.slim --split dev", ["evaluate", "good.slim", "--split", "dev"]),
    Case("reproduce a run that does not exist", "slimforge reproduce 0123abcd --tracking-uri sqlite:///mlflow.db",
         ["reproduce", "0123abcd", "--tracking-uri", "sqlite:///mlflow.db"]),
]


def run_case(case: Case, root: Path) -> tuple[int, str, str]:
    for name, text in case.files.items():
        (root / name).write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case.argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The single error line, which must be the last line of stderr, with no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("slimforge: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# --- the README table -----------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme_row(case: Case, message: str) -> str:
    return f"| {_cell(case.input)} | `{_cell(case.shown)}` | `{_cell(message)}` |"


def readme_table() -> dict[str, tuple[str, str]]:
    """input -> (shown, message) from the rows of the README's "Bad input" table."""
    text = README.read_text()
    section = text[text.index("### Bad input"):]
    section = section[:section.index("\n#", 1)] if "\n#" in section[1:] else section
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3 and cells[2].startswith("`slimforge: error:"):
            rows[cells[0]] = (cells[1].strip("`"), cells[2].strip("`"))
    return rows


def matches(documented: str, actual: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in documented.split("…"))
    return re.fullmatch(pattern, actual) is not None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, slimforge_cache_dir):
    root = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        write_artifacts(root)
        yield root


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2_as_documented(case, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    code, out, err = run_case(case, workdir)
    assert code == 2, (code, err)
    message = error_line(err)
    documented = readme_table().get(case.input)
    assert documented is not None, f"README 'Bad input' table lacks this row:\n{readme_row(case, message)}"
    assert documented[0] == case.shown, f"README row should read:\n{readme_row(case, message)}"
    assert matches(documented[1], message), f"README row should read:\n{readme_row(case, message)}"
    assert not (workdir / "pwned").exists(), "a crafted input ran code"


@pytest.mark.parametrize("case", [c for c in CASES if c.argv[0] == "search"], ids=lambda c: c.id)
def test_bad_search_input_is_refused_before_anything_is_written(case, tmp_path, monkeypatch):
    """No output folder, study, MLflow store or baseline artifact: only the files the case wrote."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_case(case, tmp_path)
    assert code == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(case.files), err


def test_the_readme_table_lists_only_cases_that_are_tested():
    assert sorted(readme_table()) == sorted(c.input for c in CASES)


# --- safe loading -------------------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling, by pickle or torch.load, fails the test."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def test_artifacts_load_without_unpickling(no_unpickling, tmp_path):
    from slimforge.core.compressed import load_model
    from slimforge.core.manager import Plugins

    tiny_artifact(tmp_path / "good.slim")
    loaded = load_model(tmp_path / "good.slim", Plugins(load_entry_points=False).registry)
    assert isinstance(loaded.model, sf_testing_models.TinyCNN)


def test_cached_teachers_load_without_unpickling(monkeypatch, tmp_path):
    from torch.utils.data import TensorDataset

    from slimforge.core import embedded

    monkeypatch.setattr(embedded, "train_teacher", lambda train, recipe, log: embedded.lenet5())  # no real training
    splits = {"train": TensorDataset(*sf_testing_models.tiny_splits()["train"].tensors)}
    first = embedded.cached_teacher(splits, tmp_path, log=lambda m: None)
    (cached,) = (tmp_path / "teachers").glob("*.slim")
    assert cached.read_bytes().startswith(b"SLIMFRG1")  # the codec, not torch.save's zip of pickles

    def untrained(*args, **kwargs):
        raise AssertionError("the cached teacher was not used")

    monkeypatch.setattr(embedded, "train_teacher", untrained)
    with monkeypatch.context() as mp:
        import torch

        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            mp.setattr(module, name, untrained)
        again = embedded.cached_teacher(splits, tmp_path, log=lambda m: None)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert a.equal(b), name


@pytest.mark.parametrize("target, kwargs", [("subprocess:getoutput", {"cmd": "touch pwned"}),
                                            ("os:system", {"command": "touch pwned"})])
def test_a_crafted_factory_is_never_called(target, kwargs, tmp_path, monkeypatch):
    from slimforge.core.compressed import load_model
    from slimforge.core.manager import Plugins
    from slimforge.core.trust import UntrustedArtifactError

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.slim"
    path.write_bytes(rewrite_header(tiny_artifact(tmp_path / "good.slim"), _evil_architecture(target, kwargs)))
    with pytest.raises(UntrustedArtifactError, match=re.escape(f"names code this account has not trusted ('{target}'")):
        load_model(path, Plugins(load_entry_points=False).registry)
    assert not (tmp_path / "pwned").exists()
    # Passing the task (--config) uses the caller's factories: the header's is still never called.
    code, out, err = run_case(Case("", "", ["evaluate", "evil.slim", "--config", "task.toml", "--json"],
                                   {"task.toml": config()}), tmp_path)
    assert code == 0, err
    assert json.loads(out)["size_bytes"] == path.stat().st_size
    assert not (tmp_path / "pwned").exists()


def test_a_trusted_task_cannot_be_pointed_at_other_code(tmp_path):
    """Trust covers the whole task source: the same factory names with another import folder (where
    a file called sf_testing_models.py could wait) are a different, untrusted task."""
    from slimforge.core.artifact import read_artifact
    from slimforge.core.trust import is_trusted

    good = tiny_artifact(tmp_path / "good.slim")
    meta, _ = read_artifact(tmp_path / "good.slim")
    assert is_trusted(meta)  # saved by this account

    def elsewhere(header):
        header["meta"]["task"]["config"]["python_path"] = [str(tmp_path / "downloads")]

    (tmp_path / "moved.slim").write_bytes(rewrite_header(good, elsewhere))
    assert not is_trusted(read_artifact(tmp_path / "moved.slim")[0])


def test_trust_is_explicit_for_artifacts_from_elsewhere(tmp_path, monkeypatch):
    """An artifact this account never saved is refused until the user passes --trust; after that
    the account trusts it."""
    monkeypatch.chdir(tmp_path)

    def foreign(header):  # a task this account never saved (a different name)
        header["meta"]["task"]["config"]["name"] = "from-a-colleague"

    (tmp_path / "foreign.slim").write_bytes(rewrite_header(tiny_artifact(tmp_path / "good.slim"), foreign))
    code, _, err = run_case(Case("", "", ["evaluate", "foreign.slim", "--json"]), tmp_path)
    assert code == 2 and "not loaded: its header names code this account has not trusted" in error_line(err)
    code, out, err = run_case(Case("", "", ["evaluate", "foreign.slim", "--json", "--trust"]), tmp_path)
    assert code == 0, err
    code, out, err = run_case(Case("", "", ["evaluate", "foreign.slim", "--json"]), tmp_path)
    assert code == 0, err


def test_header_values_are_looked_up_never_imported():
    """Dtypes, codecs and layouts named in a header come from fixed tables."""
    from slimforge.core import artifact

    assert set(artifact.DTYPES) <= set(artifact._DTYPE_NAMES)
    with pytest.raises(artifact.ArtifactError, match="unknown dtype 'os.system'"):
        artifact._dtype("os.system")


if __name__ == "__main__":  # print the table rows as the messages are now
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.chdir(tmp)
        write_artifacts(Path(tmp))
        for case in CASES:
            code, _, err = run_case(case, Path(tmp))
            lines = [line for line in err.splitlines() if line.startswith("slimforge: error: ")]
            print(readme_row(case, lines[-1] if lines else f"(exit {code}) {err.strip()[-200:]}"))
