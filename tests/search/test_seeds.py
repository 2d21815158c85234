"""Expert seeds: scaled to the budget, built through the planner, run first, marked in the record."""

import json

import optuna

from slimforge.app.api import SearchSettings, run_search
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.core.planner import Planner
from slimforge.search.backends.optuna import attr_value
from slimforge.search.budgets import Budgets
from slimforge.search.seeds import SEED_ATTR, expert_plans, seed_params


def _density(seeds, label_start):
    seed = next(s for s in seeds if s.label.startswith(label_start))
    return seed.techniques["magnitude_pruning"]["density"]


def test_seeds_scale_to_the_size_budget():
    unbudgeted = expert_plans(1_000_000, Budgets())
    assert _density(unbudgeted, "Deep Compression (") == 0.08  # the paper's LeNet density without a budget
    tight, loose = expert_plans(1_000_000, Budgets(max_size_bytes=20_000)), expert_plans(1_000_000, Budgets(max_size_bytes=100_000))
    assert _density(tight, "Deep Compression (") < _density(loose, "Deep Compression (")
    labels = [s.label for s in tight]
    assert not any(label.startswith("int8") for label in labels)  # int8's ~3.5x cannot meet 50x
    assert any(label.startswith("int8") for label in (s.label for s in unbudgeted))


def test_seed_params_are_the_names_the_planner_asks(tiny_task):
    planner = Planner(Plugins(load_entry_points=False).registry, ("magnitude_pruning", "kmeans_clustering"))
    seeds = seed_params(planner, tiny_task, 100_000, Budgets(), limit=10)
    labels = [label for label, _ in seeds]
    assert labels == ["Deep Compression at 4 bits, sparser",
                      "Deep Compression (prune > retrain > 5-bit k-means > fine-tune)"]  # the others need techniques not enabled
    params = dict(seeds)[labels[1]]
    assert params["use.pruning"] == "magnitude_pruning" and params["use.sharing"] == "kmeans_clustering"
    assert params["magnitude_pruning.density"] == 0.08 and params["recovery.before_sharing_epochs"] == 6
    # Without knowledge distillation in the search, the 4-bit seed goes on without it ...
    assert not any(name.startswith("knowledge_distillation.") for name in dict(seeds)[labels[0]])


def test_seeds_distill_where_the_search_can(tiny_task):
    planner = Planner(Plugins(load_entry_points=False).registry,
                      ("magnitude_pruning", "kmeans_clustering", "knowledge_distillation", "parameter_distillation"))
    seeds = dict(seed_params(planner, tiny_task, 100_000, Budgets(max_size_bytes=600), limit=10))
    sparser = seeds["Deep Compression at 4 bits, sparser"]
    assert sparser["knowledge_distillation.alpha"] == 0.7 and sparser["magnitude_pruning.allocation"] == 1.0
    # ... and a budget of 1/166 of the teacher brings in Deep Compression on a distilled student.
    student = seeds["distilled student > pruning > 3-bit k-means"]
    assert student["parameter_distillation.width"] == 0.45 and student["kmeans_clustering.bits"] == 3.0


def test_a_new_study_runs_its_seeds_first_and_says_so(tiny_task, tmp_path):
    settings = SearchSettings(trials=4, seed=0, techniques=("magnitude_pruning", "weight_only_quant"), study="seeded",
                              out_dir=tmp_path / "out", tracking=False, progress=False,
                              latency=LatencySettings(warmup=1, repeats=3))
    result = run_search(tiny_task, Budgets(), settings)
    first = min(result.trials, key=lambda r: r.number)
    assert first.notes[0] == "expert seed: pruning > 5-bit weight-only quantization"
    assert [s["technique"] for s in first.plan["steps"]] == ["magnitude_pruning", "weight_only_quant"]
    assert not any(r.notes and r.notes[0].startswith("expert seed") for r in result.trials if r is not first)
    study = optuna.load_study(study_name="seeded", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    trial = study.trials[first.number]
    assert trial.user_attrs[SEED_ATTR].startswith("pruning > 5-bit")
    # Intermediate values: the validation score after each recovery epoch, for the dashboard.
    record = attr_value(trial.user_attrs["slimforge_record"])
    assert record["epoch_scores"] and trial.intermediate_values == dict(enumerate(record["epoch_scores"], start=1))
    assert "expert_seeds" in json.dumps(result.settings)
