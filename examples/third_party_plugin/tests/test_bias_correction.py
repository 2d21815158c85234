"""bias_correction: the slimforge conformance kit plus what the technique promises."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimforge_bias_correction.plugin as plugin
from slimforge.core.compressed import load_model, save_model
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import TechniqueConformance, compress, tiny_task
from slimforge.plugins.factorization.low_rank import LowRank, LowRankConfig
from slimforge.plugins.quantization.weight_only import WeightOnlyQuant, WeightOnlyQuantConfig, WeightOnlyQuantized
from slimforge_bias_correction.plugin import BiasCorrection, BiasCorrectionConfig


class TestBiasCorrection(TechniqueConformance):
    technique = "bias_correction"
    extra_plugins = (plugin,)  # harmless when the installed entry point registered it already


MLP = "slimforge.core.testing:tiny_mlp"
TWO_BITS = WeightOnlyQuantConfig(default_bits=2, keep_ends_8bit=False)


def _output_error(model: nn.Module, task) -> tuple[float, float]:
    """(norm of the per-class mean error, mean squared error) of ``model``'s logits vs the
    teacher's on the held-out validation split."""
    x = task.split("val")[:][0]
    with torch.no_grad():
        error = model(x) - task.teacher(x)
    return float(error.mean(dim=0).norm()), float((error ** 2).mean())


def test_after_2bit_weight_only_quantization_it_restores_the_teachers_mean_output():
    task = tiny_task(MLP)  # the correction is estimated on "train", measured on "val"
    quantized, _ = compress(WeightOnlyQuant(), TWO_BITS, task)
    mean_before, mse_before = _output_error(quantized, task)
    ctx = TechniqueContext(task=task)
    corrected = BiasCorrection().apply(copy.deepcopy(quantized), BiasCorrectionConfig(), ctx)
    mean_after, mse_after = _output_error(corrected, task)
    # Measured: mean error 0.041 -> 0.0046, MSE 0.00232 -> 0.00172.
    assert mean_after < mean_before / 4, (mean_before, mean_after)
    assert mse_after < 0.85 * mse_before, (mse_before, mse_after)
    assert all(isinstance(corrected.get_submodule(n), WeightOnlyQuantized) for n in ("1", "3", "5"))
    assert ctx.notes == [ctx.notes[0]] and ctx.notes[0].startswith("bias_correction: corrected 3 layer(s)")
    # Only biases moved: the quantized codes and scales are the ones weight_only_quant stored.
    before, after = quantized.state_dict(), corrected.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["1.bias", "3.bias", "5.bias"]


def test_one_pass_overshoots_where_sequential_does_not():
    task = tiny_task(MLP)
    quantized, _ = compress(WeightOnlyQuant(), TWO_BITS, task)
    errors = {}
    for sequential in (True, False):
        model = BiasCorrection().apply(copy.deepcopy(quantized), BiasCorrectionConfig(sequential=sequential),
                                       TechniqueContext(task=task))
        errors[sequential] = _output_error(model, task)[0]
    assert errors[True] < errors[False] / 2, errors


def test_the_teacher_itself_is_left_exactly_as_it_is():
    task = tiny_task(MLP)
    state = copy.deepcopy(task.teacher.state_dict())
    model = BiasCorrection().apply(copy.deepcopy(task.teacher), BiasCorrectionConfig(), TechniqueContext(task=task))
    # Nothing quantized: every measured mean equals the teacher's, so every shift is exactly 0.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in task.teacher.state_dict().items())
    assert not task.teacher._forward_hooks and not any(m._forward_hooks for m in task.teacher.modules())


# --- layers without a bias, and factorised layers: structure that must survive the artifact --------

def biasless_mlp() -> nn.Module:
    """tiny_mlp without biases (as layers before a batch norm usually are)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False),
                         nn.ReLU(), nn.Linear(32, 5)).eval()


def test_a_biasless_layer_gets_a_bias_that_the_artifact_rebuilds(tmp_path):
    task = tiny_task(f"{__name__}:biasless_mlp")
    woq, woq_ctx = compress(WeightOnlyQuant(), TWO_BITS, task)
    ctx = TechniqueContext(task=task)
    model = BiasCorrection().apply(woq, BiasCorrectionConfig(), ctx)
    assert ctx.structure == {"added_bias": {"1": 64, "3": 32}}
    assert model.get_submodule("1").bias.shape == (64,) and model.get_submodule("1").bias.abs().sum() > 0
    plan = Plan(steps=(PlanStep("weight_only_quant", WeightOnlyQuant.config_to_dict(TWO_BITS)),
                       PlanStep("bias_correction", BiasCorrection.config_to_dict(BiasCorrectionConfig()))))
    path = tmp_path / "biasless.slim"
    save_model(model, path, task=task, plan=plan, structure=[woq_ctx.structure, ctx.structure])
    loaded = load_model(path, Plugins(load_entry_points=False, extra_plugins=(plugin,)).registry).model
    x = task.split("val")[:][0]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_a_factorised_layer_is_corrected_through_its_last_factor():
    task = tiny_task(MLP)
    # low_rank -> weight_only_quant -> bias_correction, as a plan runs them.
    factorised, _ = compress(LowRank(), LowRankConfig(energy={"1": 0.6}), task)
    model = WeightOnlyQuant().apply(factorised, TWO_BITS, TechniqueContext(task=task))
    assert isinstance(model.get_submodule("1"), nn.Sequential)
    assert model.get_submodule("1.0").bias is None  # the first factor has no bias to correct
    before = model.get_submodule("1.1").bias.clone()
    ctx = TechniqueContext(task=task)
    BiasCorrection().apply(model, BiasCorrectionConfig(), ctx)
    assert not torch.equal(before, model.get_submodule("1.1").bias)
    assert ctx.structure == {}  # the factor's existing bias was corrected: no new tensor
    assert ctx.notes[0].startswith("bias_correction: corrected 3 layer(s)"), ctx.notes


def test_layers_whose_shape_changed_are_skipped_with_a_note():
    task = tiny_task(MLP)
    model = copy.deepcopy(task.teacher)
    model[3] = nn.Linear(64, 16)  # as structured pruning leaves it: fewer output channels
    model[5] = nn.Linear(16, 5)
    ctx = TechniqueContext(task=task)
    BiasCorrection().apply(model, BiasCorrectionConfig(), ctx)
    assert "bias_correction: layer '3' has 16 output channels, the teacher's 32; not corrected" in ctx.notes


@pytest.mark.parametrize("values, message", [
    ({"samples": 8}, "bias_correction.samples: must be an int in 16..65536, got 8"),
    ({"sequential": "yes"}, "bias_correction.sequential: must be true or false, got 'yes'"),
    ({"strength": 0}, "bias_correction.strength: must be a number in (0, 1], got 0"),
])
def test_config_errors_name_the_field_and_the_valid_range(values, message):
    with pytest.raises(ConfigError) as info:
        BiasCorrection.config_from_dict(values)
    assert str(info.value) == message
