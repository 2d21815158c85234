"""The embedded sequence task (``core.text_task``): data, teacher cache, artifacts, and one short
search of its tiny version from the command line, evaluated in a fresh process and through MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from slimforge.core import text_task, trust
from slimforge.core.compressed import load_model, save_model
from slimforge.core.manager import Plugins
from slimforge.core.measure import evaluate
from slimforge.core.plan import Plan
from slimforge.core.task import load_task

TINY = "text-chargpt-tiny"


@pytest.fixture(scope="module")
def tiny_task(slimforge_cache_dir):
    task = load_task(TINY)
    _ = task.teacher  # trains once into the session cache (about 5 s on one thread)
    return task


def test_corpus_is_the_vocabulary_only_and_round_trips():
    text = text_task.corpus()
    assert len(text) > 400_000  # CPython's topic texts: hundreds of KB of English
    assert set(text) <= set(text_task.VOCAB)
    assert text_task.decode(text_task.encode(text[:5000])) == text[:5000]


def test_splits_are_seeded_disjoint_blocks_of_next_token_windows():
    first, second = text_task.text_splits(window=32, max_chars=48_000), text_task.text_splits(window=32, max_chars=48_000)
    for name in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(first[name].tensors, second[name].tensors, strict=True))
    x, y = first["train"].tensors
    assert x.shape[1] == y.shape[1] == 32 and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one character
    sizes = {name: len(split) for name, split in first.items()}
    assert sizes["val"] == sizes["test"] and abs(sizes["train"] / sum(sizes.values()) - 0.8) < 0.02
    train_windows = {bytes(row.to(torch.uint8).tolist()) for row in x}
    for name in ("val", "test"):
        held_out = {bytes(row.to(torch.uint8).tolist()) for row in first[name].tensors[0]}
        assert not held_out & train_windows


def test_teacher_is_cached_tensor_only_and_beats_the_most_frequent_character(tiny_task, slimforge_cache_dir):
    cached = list((slimforge_cache_dir / "teachers").glob(f"{TINY}-*.slim"))
    assert len(cached) == 1
    messages = []
    again = text_task.cached_teacher(TINY, tiny_task.splits, log=messages.append)
    assert messages and messages[0].startswith("teacher: loaded cached") and str(cached[0]) in messages[0]
    for a, b in zip(again.state_dict().values(), tiny_task.teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    targets = tiny_task.split("val").tensors[1]
    most_frequent = targets.flatten().bincount().max().item() / targets.numel()
    assert evaluate(tiny_task.teacher, tiny_task.split("val"), tiny_task.metric) > most_frequent + 0.03


def test_artifact_rebuilds_the_same_model_from_its_builtin_header(tiny_task, tmp_path):
    path = tmp_path / "dense.slim"
    save_model(tiny_task.teacher, path, task=tiny_task, plan=Plan())
    loaded = load_model(path, Plugins().registry)  # no task given: the header's factory is built in
    assert loaded.meta["architecture"]["target"] == "slimforge.core.text_task:char_gpt"
    assert loaded.meta["example_input"]["dtype"] == "int64"
    assert trust.is_trusted(loaded.meta)
    x = tiny_task.example_inputs(8)[0]
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), tiny_task.teacher(x))


def test_model_takes_shorter_sequences_and_is_causal(tiny_task):
    model = tiny_task.teacher
    x = tiny_task.example_inputs(2)[0]
    with torch.inference_mode():
        full, prefix = model(x), model(x[:, :10])
        changed = x.clone()
        changed[:, 20:] = 0
    assert prefix.shape == (2, 10, len(text_task.VOCAB))
    torch.testing.assert_close(full[:, :10], prefix)
    with torch.inference_mode():
        torch.testing.assert_close(model(changed)[:, :20], full[:, :20])  # no position sees the future


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_search_then_evaluate_and_pyfunc_in_fresh_processes(tiny_task, tmp_path, subprocess_env, slimforge_cmd,
                                                           monkeypatch):
    from slimforge.app.cli import main

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    # One thread, in-process and in subprocesses: on a busy 2-core machine torch's thread pool makes
    # steps this small many times slower, and latency is timed on one thread anyway.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request_env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            code = main(["search", "--task", TINY, "--trials", "3", "--seed", "1", "--out", str(tmp_path / "out"),
                         "--techniques", "magnitude_pruning,nm_sparsity,knowledge_distillation", "--tracking-uri", uri,
                         "--register-max-accuracy-drop", "50pt", "--no-progress"])
    finally:
        torch.set_num_threads(previous_threads)
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete"] * 3, [t.get("failure_reason") for t in summary["trials"]]
    member = summary["pareto"][0]
    out = subprocess.run([*slimforge_cmd, "evaluate", member["artifact_path"], "--json"], capture_output=True,
                         text=True, env=request_env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert measured["accuracy"] == member["test_measurements"]["accuracy"]
    assert measured["size_bytes"] == member["measurements"]["size_bytes"]
    # The registered MLflow model takes token ids (int64) and returns (N, T, vocab) logits.
    script = ("import json, sys, mlflow, numpy as np, torch\n"
              "from slimforge.core.task import load_task, accuracy\n"
              "mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])\n"
              "x, y = load_task('text-chargpt-tiny').split('test').tensors\n"
              "out = mlflow.pyfunc.load_model(sys.argv[2]).predict(x.numpy())\n"
              "print(json.dumps([list(np.asarray(out).shape), accuracy(torch.from_numpy(np.asarray(out)), y)]))\n")
    out = subprocess.run([sys.executable, "-c", script, uri, member["links"]["model_uri"]], capture_output=True,
                         text=True, env=request_env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    shape, accuracy = json.loads(out.stdout.strip().splitlines()[-1])
    assert shape == [len(tiny_task.split("test")), 32, len(text_task.VOCAB)]
    assert accuracy == member["test_measurements"]["accuracy"]
