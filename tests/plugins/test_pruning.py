"""Pruning: importance scores against hand-computed values, exact per-layer sparsity, masks kept
through recovery, structured pruning shrinking the network, and artifact round trips."""

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import compress, tiny_cnn, tiny_task
from slimforge.plugins.common import weight_layers
from slimforge.plugins.distillation.student import ParameterDistillation, ParameterDistillationConfig
from slimforge.plugins.pruning.fisher import FisherPruning, FisherPruningConfig
from slimforge.plugins.pruning.gradient import GradientPruning, GradientPruningConfig
from slimforge.plugins.pruning.importance import fisher_score, gradient_statistics, importance_scores, taylor_score
from slimforge.plugins.pruning.magnitude import MagnitudePruning, MagnitudePruningConfig
from slimforge.plugins.pruning.structured import StructuredPruning, StructuredPruningConfig, kept_channels
from slimforge.core.space import FixedSuggester, scoped

UNSTRUCTURED = [(MagnitudePruning, MagnitudePruningConfig, "magnitude"),
                (GradientPruning, GradientPruningConfig, "taylor"),
                (FisherPruning, FisherPruningConfig, "fisher")]
SPARSITY = {"0": 0.25, "3": 0.5, "6": 0.9, "8": 0.3}  # tiny_cnn layers: 72, 1152, 4608, 160 weights


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- importance scores -------------------------------------------------------------------------

def test_score_formulas_on_known_weights_and_gradients():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]])
    g_abs = torch.tensor([[0.5, 0.25, 2.0], [1.0, 7.0, 0.125]])  # mean_b |g_b| and mean_b g_b^2:
    g_sq = torch.tensor([[0.5, 0.25, 2.0], [1.0, 7.0, 0.125]])   # both nonnegative
    assert torch.equal(taylor_score(w, g_abs), torch.tensor([[0.5, 0.5, 1.0], [3.0, 0.0, 0.5]]))
    assert torch.equal(fisher_score(w, g_sq), torch.tensor([[0.5, 1.0, 0.5], [9.0, 0.0, 2.0]]))


def hand_layer():
    """Linear(2, 2, bias=False) with W x = 0 for every input x = t * (1, 1): the softmax is (1/2, 1/2)
    for all samples, so the cross-entropy gradient of sample (x, y) is (p - onehot(y)) x^T by hand."""
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, -2.0]]))
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    # Per-sample gradients, row 0 (both columns equal, row 1 negated): -0.5*1, 0.5*2, -0.5*3, 0.5*1
    # = -0.5, 1, -1.5, 0.5.  Mean -0.125; mean |g| 0.875; mean g^2 (0.25+1+2.25+0.25)/4 = 0.9375.
    return nn.Sequential(layer), TensorDataset(x, y)


def test_taylor_and_fisher_scores_equal_hand_computed_values():
    model, data = hand_layer()
    # One sample per batch, all four batches: the order does not matter.
    stats = gradient_statistics(model, data, batches=4, batch_size=1)
    assert torch.allclose(stats.mean["0.weight"], torch.tensor([[-0.125, -0.125], [0.125, 0.125]]))
    taylor = importance_scores(model, "taylor", data, batches=4, batch_size=1)["0.weight"]
    fisher = importance_scores(model, "fisher", data, batches=4, batch_size=1)["0.weight"]
    # mean_b |w * g_b| = |w| * 0.875 (not |w * mean g| = |w| * 0.125) and w^2 * 0.9375,
    # with w = [[1, -1], [2, -2]]
    assert torch.allclose(taylor, torch.tensor([[0.875, 0.875], [1.75, 1.75]]), atol=1e-6)
    assert torch.allclose(fisher, torch.tensor([[0.9375, 0.9375], [3.75, 3.75]]), atol=1e-6)
    assert torch.equal(importance_scores(model, "magnitude")["0.weight"], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert all(p.grad is None for p in model.parameters()), "scoring leaves no .grad behind"


def test_gradient_statistics_use_only_the_requested_batches_in_a_seeded_order():
    model, data = hand_layer()
    first = gradient_statistics(model, data, batches=1, batch_size=1, seed=3)
    assert first.batches == 1
    again = gradient_statistics(model, data, batches=1, batch_size=1, seed=3)
    assert torch.equal(first.mean["0.weight"], again.mean["0.weight"])
    # One sample's gradient is one of the four hand-computed ones.
    assert first.mean["0.weight"][0, 0].item() in {-0.5, 1.0, -1.5, 0.5}
    assert torch.equal(first.mean_abs["0.weight"], first.mean["0.weight"].abs())


def test_gradient_criteria_need_data():
    with pytest.raises(ConfigError, match="criterion 'taylor' needs training data"):
        importance_scores(tiny_cnn(), "taylor")
    with pytest.raises(ConfigError, match="criterion: must be one of magnitude, taylor, fisher"):
        importance_scores(tiny_cnn(), "random")


# --- unstructured: magnitude / gradient / fisher ----------------------------------------------

@pytest.mark.parametrize("technique,config_cls,criterion", UNSTRUCTURED)
def test_sparsity_is_exact_per_layer_and_drops_the_lowest_scores(task, technique, config_cls, criterion):
    config = config_cls(sparsity=SPARSITY)
    ctx = TechniqueContext(task=task, seed=5)
    teacher = copy.deepcopy(task.teacher)
    scores = importance_scores(teacher, criterion, task.split("train"), seed=5)
    model = technique().apply(copy.deepcopy(task.teacher), config, ctx)
    for name, layer in weight_layers(model).items():
        w = layer.weight.detach()
        zeros = w == 0
        assert int(zeros.sum()) == round(SPARSITY[name] * w.numel()), name
        assert not torch.signbit(w[zeros]).any(), f"{name}: masked weights must be +0.0"
        # Every pruned weight scores no higher than every kept one.
        assert scores[f"{name}.weight"][zeros].max() <= scores[f"{name}.weight"][~zeros].min(), name
        assert torch.equal(ctx.state["masks"][f"{name}.weight"], ~zeros)  # masks are keyed by site


def test_criteria_prune_different_weights(task):
    masks = {}
    for technique, config_cls, criterion in UNSTRUCTURED:
        ctx = TechniqueContext(task=task)
        technique().apply(copy.deepcopy(task.teacher), config_cls(default_sparsity=0.5), ctx)
        masks[criterion] = ctx.state["masks"]["6.weight"]
    assert not torch.equal(masks["magnitude"], masks["taylor"])
    assert not torch.equal(masks["taylor"], masks["fisher"])


@pytest.mark.parametrize("technique,config_cls,criterion", UNSTRUCTURED)
def test_masks_survive_recovery_optimizer_steps(task, technique, config_cls, criterion):
    config = config_cls(default_sparsity=0.6)
    before = copy.deepcopy(task.teacher)
    model, ctx = compress(technique(), config, task, recovery_steps=3)
    for name, layer in weight_layers(model).items():
        mask = ctx.state["masks"][f"{name}.weight"]
        assert torch.equal(layer.weight != 0, mask), name
        assert not torch.signbit(layer.weight[~mask]).any()
    kept = ctx.state["masks"]["6.weight"]
    assert not torch.equal(weight_layers(model)["6"].weight[kept], weight_layers(before)["6"].weight[kept]), \
        "recovery must actually have trained the kept weights"


def test_unstructured_configs_share_fields_and_search_space(task):
    assert [f.name for f in dataclasses.fields(MagnitudePruningConfig)] == ["sparsity", "default_sparsity"]
    assert [f.name for f in dataclasses.fields(GradientPruningConfig)] == ["sparsity", "default_sparsity", "batches"]
    reference = MagnitudePruning().suggest(scoped(FixedSuggester(seed=4), "magnitude_pruning"), task)
    for technique, _, _ in UNSTRUCTURED:
        assert technique().suggest(scoped(FixedSuggester(seed=4), technique.name), task).sparsity == reference.sparsity
    with pytest.raises(ConfigError, match=r"magnitude_pruning\.sparsity\['0'\]: must be in \[0, 1\)"):
        MagnitudePruningConfig(sparsity={"0": 1.0})
    with pytest.raises(ConfigError, match=r"fisher_pruning\.batches: must be an integer >= 1"):
        FisherPruningConfig(batches=0)
    with pytest.raises(ConfigError, match=r"gradient_pruning\.sparsity\['default_sparsity'\]"):
        GradientPruningConfig(default_sparsity=-0.1)


# --- structured ----------------------------------------------------------------------------------

def test_kept_channels_rounds_half_up_and_keeps_one():
    assert kept_channels(20, 0.8) == 4  # Torch-Pruning's own int(20 * (1 - 0.8)) gives 3
    assert kept_channels(8, 0.5) == 4 and kept_channels(50, 0.5) == 25 and kept_channels(5, 0.5) == 3
    assert kept_channels(3, 0.9) == 1 and kept_channels(1, 0.8) == 1


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "fisher"])
def test_structured_pruning_shrinks_the_network_and_keeps_the_output(task, criterion):
    teacher = task.teacher
    ctx = TechniqueContext(task=task)
    model = StructuredPruning().apply(copy.deepcopy(teacher), StructuredPruningConfig(
        channel_sparsity=0.5, criterion=criterion), ctx)
    shapes = {name: tuple(layer.weight.shape) for name, layer in weight_layers(model).items()}
    # conv 8 -> 4 and 16 -> 8 channels, fc 32 -> 16 neurons; the classifier keeps its 5 outputs.
    assert shapes == {"0": (4, 1, 3, 3), "3": (8, 4, 3, 3), "6": (16, 72), "8": (5, 16)}
    assert n_params(model) == 40 + 296 + 1168 + 85 < n_params(teacher)
    x = task.split("val")[:][0][:8]
    assert model(x).shape == teacher(x).shape
    assert ctx.structure["shapes"]["6"] == [16, 72]
    assert all(p.grad is None for p in model.parameters()), "gradients written for Torch-Pruning are cleared"
    assert any("'8' keeps all outputs" in note for note in ctx.notes)


def test_structured_criteria_choose_channels_differently(task):
    kept = {}
    for criterion in ("magnitude", "taylor", "fisher"):
        model = StructuredPruning().apply(copy.deepcopy(task.teacher), StructuredPruningConfig(
            channel_sparsity=0.5, criterion=criterion), TechniqueContext(task=task))
        kept[criterion] = weight_layers(model)["8"].weight.detach()  # classifier columns = kept fc neurons
    # On this untrained teacher taylor and fisher happen to agree on the fc neurons; |w| does not.
    assert not torch.equal(kept["magnitude"], kept["taylor"])
    assert not torch.equal(kept["magnitude"], kept["fisher"])


def test_structured_suggest_searches_criterion_and_ratio(task):
    configs = [StructuredPruning().suggest(scoped(FixedSuggester(seed=s), "structured_pruning"), task)
               for s in range(40)]
    assert {c.criterion for c in configs} == {"magnitude", "taylor", "fisher"}
    assert all(0.1 <= c.channel_sparsity <= 0.8 for c in configs)
    assert all(abs(c.channel_sparsity * 20 - round(c.channel_sparsity * 20)) < 1e-9 for c in configs)
    with pytest.raises(ConfigError, match=r"structured_pruning\.channel_sparsity: must be in \[0, 1\)"):
        StructuredPruningConfig(channel_sparsity=1.0)
    with pytest.raises(ConfigError, match=r"structured_pruning\.criterion: must be one of magnitude, taylor, fisher"):
        StructuredPruningConfig(criterion="l2")


def round_trip(model, task, steps, structures, path):
    plugins = Plugins(load_entry_points=False)
    plan = Plan(steps=tuple(PlanStep(t.name, t.config_to_dict(c)) for t, c in steps), seed=0)
    size = save_model(model, path, task=task, plan=plan, structure=structures)
    loaded = load_model(path, plugins.registry).model
    x = task.split("val")[:][0][:16]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    return size


def test_structured_artifact_round_trip_is_bitwise_and_smaller(task, tmp_path):
    config = StructuredPruningConfig(channel_sparsity=0.5, criterion="fisher")
    model, ctx = compress(StructuredPruning(), config, task)
    size = round_trip(model, task, [(StructuredPruning(), config)], [ctx.structure], tmp_path / "s.slim")
    dense = round_trip(copy.deepcopy(task.teacher), task, [], [], tmp_path / "d.slim")
    assert size < 0.45 * dense


def test_structured_pruning_after_parameter_distillation_restores_both(task, tmp_path):
    student_config = ParameterDistillationConfig(width=0.5)
    prune_config = StructuredPruningConfig(channel_sparsity=0.5, criterion="taylor")
    student_ctx, prune_ctx = TechniqueContext(task=task), TechniqueContext(task=task)
    model = ParameterDistillation().apply(copy.deepcopy(task.teacher), student_config, student_ctx)
    model = StructuredPruning().apply(model, prune_config, prune_ctx).eval()
    assert tuple(weight_layers(model)["3"].weight.shape) == (4, 2, 3, 3)  # 16 -> 8 -> 4 channels
    round_trip(model, task, [(ParameterDistillation(), student_config), (StructuredPruning(), prune_config)],
               [student_ctx.structure, prune_ctx.structure], tmp_path / "sp.slim")
