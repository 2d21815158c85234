"""Hugging Face tasks (``core.hf``): a ``save_pretrained`` folder named in ``[task]``, loaded offline,
compressed by a short search, and evaluated in a fresh process *without* the folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from slimforge.core import hf  # noqa: E402
from slimforge.core.compressed import load_model, save_model  # noqa: E402
from slimforge.core.errors import ConfigError, MissingDependencyError, UnknownNameError  # noqa: E402
from slimforge.core.manager import Plugins  # noqa: E402
from slimforge.core.plan import Plan  # noqa: E402
from slimforge.core.task import task_from_config, task_from_source  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# 16 blocks of 16 snippets per class, 4 epochs at lr 3e-3: a BERT that scores about 0.83 (not chance,
# so a broken reload shows) after a few seconds of training on one idle core.
BLOCKS, EPOCHS, LR = 16, 4, 3e-3


def _toml(path: Path, lines: list[str]) -> Path:
    path.write_text("[task]\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import hf_model
    finally:
        sys.path.remove(str(EXAMPLES))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small: thread hand-offs cost more than they save
    try:
        return hf_model.train_and_save(tmp_path_factory.mktemp("hf") / "bert", epochs=EPOCHS,
                                       max_blocks_per_class=BLOCKS, lr=LR, log=lambda *_: None)
    finally:
        torch.set_num_threads(previous_threads)


@pytest.fixture
def bert_config(bert_dir, tmp_path):
    return _toml(tmp_path / "task.toml", [
        'name = "hf-bert-test"', f'hf_model = "{bert_dir}"', 'hf_class = "AutoModelForSequenceClassification"',
        'data = "hf_model:build_data"', f"data_kwargs = {{ max_blocks_per_class = {BLOCKS} }}",
        f'python_path = ["{EXAMPLES}"]'])


def test_task_loads_the_folder_offline_and_records_its_config(bert_config, bert_dir):
    task = task_from_config(bert_config)
    assert type(task.teacher).__name__ == "BertForSequenceClassification"
    ref = task.architecture
    assert ref.target == "slimforge.core.hf:from_config"
    assert ref.kwargs["auto_class_name"] == "AutoModelForSequenceClassification"
    assert ref.kwargs["config"]["model_type"] == "bert" and "_name_or_path" not in ref.kwargs["config"]
    assert task.source["hf_config"] == ref.kwargs["config"]
    json.dumps(task.source)  # the source goes into artifact headers as JSON


def test_artifact_reloads_as_the_same_class_without_the_folder(bert_config, bert_dir, tmp_path):
    task = task_from_config(bert_config)
    path = tmp_path / "dense.slim"
    save_model(task.teacher, path, task=task, plan=Plan())
    moved = tmp_path / "moved"
    shutil.move(str(bert_dir), moved)
    try:
        rebuilt = task_from_source(load_model(path, Plugins().registry).meta["task"])  # reads no folder
        loaded = load_model(path, Plugins().registry, task=rebuilt)
    finally:
        shutil.move(str(moved), bert_dir)
    assert type(loaded.model) is type(task.teacher)
    x = task.example_inputs(4)[0]
    with torch.inference_mode():
        assert torch.equal(loaded.model(x).logits, task.teacher(x).logits)


def test_causal_lm_with_tied_embeddings_round_trips(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "gpt2")
    config = _toml(tmp_path / "lm.toml", [
        f'hf_model = "{tmp_path / "gpt2"}"', 'hf_class = "AutoModelForCausalLM"',
        'data = "slimforge.core.text_task:text_splits"', "data_kwargs = { window = 32, max_chars = 20000 }"])
    task = task_from_config(config)
    path = tmp_path / "lm.slim"
    save_model(task.teacher, path, task=task, plan=Plan())
    loaded = load_model(path, Plugins().registry).model  # trusted: this account saved it
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    x = task.example_inputs(2)[0]
    with torch.inference_mode():
        assert torch.equal(loaded(x).logits, task.teacher(x).logits)
        assert loaded(x).logits.shape == (2, 32, 96)


def test_bad_hf_tables_are_one_line_errors(bert_dir, tmp_path):
    base = [f'hf_model = "{bert_dir}"', 'data = "hf_model:build_data"', f'python_path = ["{EXAMPLES}"]']
    with pytest.raises(UnknownNameError, match="hf_class: unknown 'AutoModelForSequenceClasification'; valid "
                                               "choices: .*AutoModelForSequenceClassification"):
        task_from_config(_toml(tmp_path / "a.toml", [*base, 'hf_class = "AutoModelForSequenceClasification"']))
    with pytest.raises(ConfigError, match=r"\[task\] hf_class: required"):
        task_from_config(_toml(tmp_path / "b.toml", base))
    with pytest.raises(ConfigError, match=r"\[task\] model: not used with hf_model"):
        task_from_config(_toml(tmp_path / "c.toml", [*base, 'hf_class = "AutoModel"', 'model = "x:y"']))
    with pytest.raises(Exception, match="hf_model: no such folder"):
        task_from_config(_toml(tmp_path / "d.toml", ['hf_model = "nowhere"', 'hf_class = "AutoModel"',
                                                     'data = "hf_model:build_data"', f'python_path = ["{EXAMPLES}"]']))


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingDependencyError, match=r"needs the 'transformers' package: pip install 'slimforge\[hf\]'"):
        hf.from_config("AutoModel", {"model_type": "bert"})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_search_then_evaluate_in_a_fresh_process_without_the_folder(bert_config, bert_dir, tmp_path,
                                                                    subprocess_env, slimforge_cmd, monkeypatch):
    from slimforge.app.cli import main

    monkeypatch.chdir(tmp_path)
    # One thread: on a busy 2-core machine torch's thread pool makes steps this small many times slower.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["search", "--config", str(bert_config), "--trials", "3", "--seed", "0", "--out",
                     str(tmp_path / "out"), "--techniques", "magnitude_pruning,knowledge_distillation", "--no-tracking",
                     "--no-progress"])
    finally:
        torch.set_num_threads(previous_threads)
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete"] * 3, [t.get("failure_reason") for t in summary["trials"]]
    assert any(t["measurements"]["size_bytes"] < summary["baseline"]["val"]["size_bytes"] for t in summary["trials"])
    member = summary["pareto"][0]
    moved = tmp_path / "moved"
    shutil.move(str(bert_dir), moved)  # the artifact must not need the save_pretrained folder
    try:
        out = subprocess.run([*slimforge_cmd, "evaluate", member["artifact_path"], "--json"], capture_output=True,
                             text=True, env={**subprocess_env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=300)
    finally:
        shutil.move(str(moved), bert_dir)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert measured["accuracy"] == member["test_measurements"]["accuracy"]
    assert measured["size_bytes"] == member["measurements"]["size_bytes"]
