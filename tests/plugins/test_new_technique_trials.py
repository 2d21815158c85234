"""The three newer techniques inside whole trials (``TrialRunner``): with the structural and
finishing steps they meet in a search, the artifact loads back and measures what was trained."""

import pytest

from slimforge.core.manager import Plugins
from slimforge.core.measure import LatencySettings
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.search.budgets import Budgets
from slimforge.search.objective import TrialRunner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao deprecation chatter

INT8 = PlanStep("int8_ptq", {"observer": "minmax", "calibration_batches": 2, "calibration_batch_size": 64})
PLANS = {
    # forward hooks left on the student must not disturb torch.fx tracing
    "prune+hint+int8": (PlanStep("magnitude_pruning", {"sparsity": {}, "default_sparsity": 0.7}),
                        PlanStep("hint_distillation", {"points": 2, "alpha": 0.5}), INT8),
    # the hint is applied after the retrain, on clustered layers that kept their names
    "prune+kmeans+hint": (PlanStep("magnitude_pruning", {"sparsity": {}, "default_sparsity": 0.7}),
                          PlanStep("kmeans_clustering", {"conv_bits": 4, "fc_bits": 3}),
                          PlanStep("hint_distillation", {})),
    "maxent+token+wq": (PlanStep("max_entropy_sparsity", {"sparsity": {}, "default_sparsity": 0.5}),
                        PlanStep("token_distillation", {"top_k": 2}),
                        PlanStep("weight_only_quant", {"bits": {}, "default_bits": 4})),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_trial_completes_and_the_artifact_measures_what_was_trained(name, tiny_task, tmp_path):
    before_sharing = 1 if "kmeans" in name else 0
    plan = Plan(steps=PLANS[name], recovery=Recovery(epochs=1, lr=1e-3, before_sharing_epochs=before_sharing), seed=0)
    runner = TrialRunner(task=tiny_task, plugins=Plugins(load_entry_points=False), budgets=Budgets(),
                         artifact_dir=tmp_path, latency=LatencySettings(warmup=1, repeats=3))
    record = runner.run(plan, number=0)
    assert record.state == "complete", (record.failure_reason, record.notes)
    # 4 classes (chance 0.25); the teacher scores 0.72 on val, these plans 0.5-0.65
    assert record.measurements.accuracy > 0.4
    if "hint" in name:
        assert any(note.startswith("hint_distillation: hints ") for note in record.notes), record.notes
