"""`slimforge promote`: the `champion` alias moves only when a re-measured candidate wins, the
decision is recorded (version tags, a run in slimforge-promotions), and logged numbers are never
trusted.

Three versions of the tiny task are registered through the tracker's own hooks (search_start,
trial_end, search_end) in a local sqlite registry:
  v1 uncompressed float (~33 KB, accurate), v2 int8 (~11 KB, accurate), v3 95 % pruned + int8
  without fine-tuning (~2 KB, near chance).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from slimforge.app.cli import main
from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner
from slimforge.search.records import SearchResult
from slimforge.tracking.mlflow import MlflowTracker, MlflowWriter
from slimforge.tracking.registry import ALIAS, PROMOTIONS_EXPERIMENT, promote

# The module's registry fixture runs a tracked search first; filterwarnings: torch.ao deprecation chatter.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

MODEL = "tiny-compressed"
INT8 = PlanStep("int8_ptq", {"observer": "minmax", "calibration_batches": 2, "calibration_batch_size": 64})
PLANS = (Plan(), Plan(steps=(INT8,)),
         Plan(steps=(PlanStep("magnitude_pruning", {"sparsity": {}, "default_sparsity": 0.95}), INT8),
              recovery=Recovery(epochs=0)))
MIN_ACCURACY = 0.5  # v1 and v2 pass it on the test split, v3 does not (checked in the fixture)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    import sf_testing_models

    root = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    task = sf_testing_models.tiny_task()
    runner = TrialRunner(task=task, plugins=Plugins(load_entry_points=False), budgets=Budgets(),
                         artifact_dir=root / "artifacts", latency=LatencySettings(warmup=1, repeats=3))
    (root / "artifacts").mkdir()
    records = [runner.run(plan, number) for number, plan in enumerate(PLANS)]
    for record in records:
        assert record.state == "complete", record.failure_reason
        record.test_measurements = runner.measure(record.artifact_path, "test")
    accuracies = [r.test_measurements.accuracy for r in records]
    assert min(accuracies[:2]) > MIN_ACCURACY > accuracies[2], accuracies
    sizes = [r.measurements.size_bytes for r in records]
    assert sizes[0] > sizes[1] > sizes[2], sizes

    tracker = MlflowTracker(tracking_uri=uri, experiment="slimforge", registered_model=MODEL)
    settings = {"study": "promote-fixture", "out_dir": str(root / "out"), "device": "cpu",
                "latency": {"warmup": 1, "repeats": 3}, "storage": None}
    tracker.slimforge_search_start(settings=settings, task=task, baseline=records[0].measurements)
    for record in records:
        record.links.update(tracker.slimforge_trial_end(record=record))
    result = SearchResult(study_name="promote-fixture", task=task.name, budgets={}, baseline=records[0].measurements,
                          baseline_test=records[0].test_measurements, trials=records, pareto=records,
                          settings=settings)
    links = tracker.slimforge_search_end(result=result)
    assert [links[n]["model_version"] for n in range(3)] == [1, 2, 3]
    return SimpleNamespace(uri=uri, client=MlflowClient(tracking_uri=uri, registry_uri=uri), records=records)


def _crown(registry, version: int) -> None:
    registry.client.set_registered_model_alias(MODEL, ALIAS, str(version))


def _champion(registry) -> int:
    return int(registry.client.get_model_version_by_alias(MODEL, ALIAS).version)


def _promotion_runs(registry) -> list:
    experiment = registry.client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    return registry.client.search_runs([experiment.experiment_id]) if experiment else []


def _promote(registry, policy="smallest", **kwargs):
    kwargs.setdefault("min_accuracy", MIN_ACCURACY)
    return promote(MODEL, policy, tracking_uri=registry.uri, progress=lambda _: None, **kwargs)


def test_versions_carry_lineage_tags(registry):
    for number, record in enumerate(registry.records):
        version = registry.client.get_model_version(MODEL, str(number + 1))
        assert version.tags["trial"] == str(number)
        assert version.tags["study"] == "promote-fixture"
        assert version.tags["size_bytes"] == str(record.measurements.size_bytes)
        assert version.tags["accuracy_test"] == f"{record.test_measurements.accuracy:.6f}"
        assert json.loads(version.tags["plan_json"]) == record.plan
        assert version.run_id == record.links["mlflow_run_id"] == version.tags["run_id"]


def test_dry_run_neither_moves_the_alias_nor_records(registry):
    _crown(registry, 1)
    runs_before = len(_promotion_runs(registry))
    tags_before = registry.client.get_model_version(MODEL, "2").tags
    decision = _promote(registry, dry_run=True)
    assert decision.dry_run and decision.would_promote and not decision.promoted
    assert decision.candidate == 2 and decision.reason.startswith("dry run: v2 beats champion v1 on smallest")
    assert _champion(registry) == 1
    assert len(_promotion_runs(registry)) == runs_before
    assert registry.client.get_model_version(MODEL, "2").tags == tags_before


def test_better_candidate_takes_the_alias_and_the_decision_is_recorded(registry, capsys):
    _crown(registry, 1)
    runs_before = {r.info.run_id for r in _promotion_runs(registry)}
    code = main(["promote", "--model", MODEL, "--policy", "smallest", "--min-accuracy", "50%",
                 "--tracking-uri", registry.uri])
    out = capsys.readouterr().out
    assert code == 0
    assert "PROMOTED v2 to champion: v2 beats champion v1 on smallest" in out
    assert _champion(registry) == 2
    (run,) = [r for r in _promotion_runs(registry) if r.info.run_id not in runs_before]
    tags = run.data.tags
    assert (tags["model"], tags["policy"], tags["promoted"]) == (MODEL, "smallest", "True")
    assert (tags["champion_before"], tags["champion_after"], tags["candidate"]) == ("1", "2", "2")
    assert tags["v3_eligible"].startswith("no: accuracy 0.2")
    assert run.data.metrics["v2_size_bytes"] == registry.records[1].measurements.size_bytes
    decision = json.loads(Path(registry.client.download_artifacts(run.info.run_id, "decision.json")).read_text())
    assert decision["promoted"] and decision["champion_before"] == 1 and decision["candidate"] == 2
    version = registry.client.get_model_version(MODEL, "2")
    assert version.tags["promotion_run_id"] == run.info.run_id
    assert " promoted: v2 beats champion v1" in version.tags["promotion"]


def test_champion_that_is_still_best_is_kept_with_the_reason(registry, capsys):
    _crown(registry, 2)
    runs_before = {r.info.run_id for r in _promotion_runs(registry)}
    code = main(["promote", "--model", MODEL, "--policy", "smallest", "--min-accuracy", "0.5",
                 "--tracking-uri", registry.uri])
    out = capsys.readouterr().out
    assert code == 0
    assert "NOT PROMOTED: the current champion v2 is still the best eligible version" in out
    assert _champion(registry) == 2
    (run,) = [r for r in _promotion_runs(registry) if r.info.run_id not in runs_before]
    assert run.data.tags["promoted"] == "False" and run.data.tags["champion_after"] == "2"
    assert "not promoted: the current champion v2" in registry.client.get_model_version(MODEL, "2").tags["promotion"]


def test_policies_disagree_and_each_is_applied(registry):
    _crown(registry, 2)
    decision = _promote(registry, policy="best-accuracy", min_accuracy=None)
    assert decision.promoted and decision.candidate == 1 and _champion(registry) == 1  # 0.773 > 0.766 test accuracy
    assert decision.reason.startswith("v1 beats champion v2 on best-accuracy")


def test_logged_numbers_are_not_trusted(registry):
    """v3 claims (by its tags) to be accurate, and it is the smallest: a promotion that trusted the
    tags would crown it.  The re-measured accuracy of its downloaded artifact keeps it out."""
    _crown(registry, 2)
    registry.client.set_model_version_tag(MODEL, "3", "accuracy_test", "0.999999")
    registry.client.set_model_version_tag(MODEL, "3", "size_bytes", "1")
    try:
        decision = _promote(registry)
    finally:
        registry.client.set_model_version_tag(MODEL, "3", "accuracy_test",
                                              f"{registry.records[2].test_measurements.accuracy:.6f}")
        registry.client.set_model_version_tag(MODEL, "3", "size_bytes", str(registry.records[2].measurements.size_bytes))
    assert not decision.promoted and _champion(registry) == 2
    v3 = next(c for c in decision.versions if c.version == 3)
    assert v3.logged["accuracy_test"] == "0.999999"
    assert v3.accuracy == registry.records[2].test_measurements.accuracy  # re-measured, not the tag
    assert v3.size_bytes == Path(registry.records[2].artifact_path).stat().st_size
    assert not v3.eligible and v3.why_not.startswith("accuracy 0.2")
    for c in decision.versions:  # every number comes from the downloaded artifact
        record = registry.records[c.version - 1]
        assert (c.accuracy, c.size_bytes) == (record.test_measurements.accuracy, record.measurements.size_bytes)


def test_smallest_needs_a_floor_and_unknown_models_list_the_known_ones(registry, capsys):
    assert main(["promote", "--model", MODEL, "--policy", "smallest", "--tracking-uri", registry.uri]) == 2
    assert "--min-accuracy: required by --policy smallest" in capsys.readouterr().err
    assert main(["promote", "--model", "nope", "--tracking-uri", registry.uri]) == 2
    assert MODEL in capsys.readouterr().err


def test_a_member_two_searches_registered_at_once_keeps_one_version(registry):
    """Two searches of one study may both look for trial 1's version, find none and register it.
    The racer's version (here registered by hand from the same run) is deleted by the racer and the
    first version is what both report; the registry ends with one version of the run."""
    import mlflow

    run_id = registry.records[1].links["mlflow_run_id"]
    first = registry.client.get_model_version(MODEL, "2")
    mlflow.set_tracking_uri(registry.uri)
    mlflow.set_registry_uri(registry.uri)
    racer = mlflow.register_model(first.source, MODEL, tags=first.tags)
    assert int(racer.version) > 3

    kept = MlflowWriter._first_version_of_run(registry.client, MODEL, run_id, racer)
    assert str(kept.version) == "2"
    assert [str(v.version) for v in registry.client.search_model_versions(f"name='{MODEL}' and run_id='{run_id}'")] == ["2"]
    # the first registration of a run is kept as it is
    assert MlflowWriter._first_version_of_run(registry.client, MODEL, run_id, first).version == first.version
