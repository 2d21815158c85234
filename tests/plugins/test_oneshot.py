"""One-shot techniques (plugins.oneshot): GPTQ, SparseGPT, Wanda, AWQ and layer-sequential calibration.

The conformance kit runs on every built-in in tests/plugins/test_conformance.py; here: that the
second-order methods beat their first-order baselines on the layer-wise error they minimise, that
they compose, and what the artifact stores."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.compressed import save_model
from slimforge.core.plan import Plan, PlanStep
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import tiny_task
from slimforge.plugins.oneshot.calibration import InputStatistics, compress_sequentially, repeated_blocks
from slimforge.plugins.oneshot.gptq import GPTQ, GPTQConfig, gptq_quantize, per_column
from slimforge.plugins.quantization.weight_only import WeightOnlyQuant, WeightOnlyQuantConfig


def correlated_inputs(rows=2048, columns=64, seed=0):
    """Inputs whose features are strongly correlated (a low-rank mix plus noise), as a
    transformer's hidden states are: where error compensation has something to exploit."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, columns, generator=g)
    return torch.randn(rows, 8, generator=g) @ basis + 0.1 * torch.randn(rows, columns, generator=g)


def hessian_of(x):
    stats = InputStatistics(x.shape[1], full=True)
    stats.add(x)
    return stats.hessian


def dequantized(codes, scale, zero, group_size):
    columns = codes.shape[1]
    return (codes - per_column(zero, columns, group_size)).float() * per_column(scale, columns, group_size)


def test_gptq_layer_error_below_round_to_nearest_at_3_bits():
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), correlated_inputs()
    reference = x @ w.t()
    errors = {}
    for name, hessian in (("rtn", None), ("gptq", hessian_of(x))):
        codes, scale, zero, _ = gptq_quantize(w, hessian, 3, 0, True, 0.01, False)
        errors[name] = torch.linalg.norm(x @ dequantized(codes, scale, zero, 0).t() - reference)
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


def test_gptq_with_act_order_and_groups_also_beats_rtn():
    torch.manual_seed(1)
    w, x = torch.randn(16, 64), correlated_inputs(seed=1)
    reference = x @ w.t()
    errors = {}
    for name, hessian in (("rtn", None), ("gptq", hessian_of(x))):
        codes, scale, zero, _ = gptq_quantize(w, hessian, 3, 16, False, 0.01, True)
        errors[name] = torch.linalg.norm(x @ dequantized(codes, scale, zero, 16).t() - reference)
    assert errors["gptq"] < errors["rtn"], errors


def test_gptq_keeps_exact_zeros():
    torch.manual_seed(2)
    w, x = torch.randn(16, 64), correlated_inputs(seed=2)
    w[torch.rand_like(w) < 0.5] = 0.0
    codes, scale, zero, _ = gptq_quantize(w, hessian_of(x), 4, 32, False, 0.01, True)
    assert torch.all(dequantized(codes, scale, zero, 32)[w == 0] == 0)


def test_repeated_blocks_found_and_lenet_falls_back():
    task = tiny_task("slimforge.core.testing:tiny_llama")
    from slimforge.core.sites import weight_sites

    name, blocks = repeated_blocks(task.teacher, weight_sites(task.teacher))
    assert name == "model.layers" and len(blocks) == 2
    cnn = tiny_task("slimforge.core.testing:tiny_cnn").teacher
    assert repeated_blocks(cnn, weight_sites(cnn)) is None


@pytest.mark.parametrize("architecture", ["tiny_transformer", "tiny_llama", "tiny_gpt2", "tiny_cnn"])
def test_sequential_calibration_sees_compressed_earlier_layers(architecture):
    """Every site with catchable inputs gets statistics, and a later block's statistics come from
    the model as compressed so far (here: earlier weights zeroed, so later inputs change)."""
    from slimforge.core.sites import weight_sites

    task = tiny_task(f"slimforge.core.testing:{architecture}")
    x = task.split("train")[:][0][:32]

    def gathered(zero_earlier):
        model = copy.deepcopy(task.teacher)
        seen = {}

        def compress(site, stats, why):
            seen[site.name] = None if stats is None else stats.hessian.clone()
            if zero_earlier and stats is not None:
                site.set_matrix(model, site.matrix(model) * 0.5)

        compress_sequentially(model, weight_sites(model), [x], compress)
        return seen

    plain, shrunk = gathered(False), gathered(True)
    caught = [name for name, h in plain.items() if h is not None]
    assert caught and all(torch.isfinite(plain[name]).all() for name in caught)
    later = [name for name in caught if not torch.allclose(plain[name], shrunk[name])]
    assert later, "no site saw the earlier layers' compression"


def artifact_bytes(technique, config, task, tmp_path, name):
    ctx = TechniqueContext(task=task, seed=0)
    model = technique.apply(copy.deepcopy(task.teacher), config, ctx)
    plan = Plan(steps=(PlanStep(technique.name, technique.config_to_dict(config)),), seed=0)
    return save_model(model, tmp_path / f"{name}.slim", task=task, plan=plan, structure=[ctx.structure])


def test_gptq_artifact_bytes_match_weight_only_quant_at_4_bits(tmp_path):
    task = tiny_task("slimforge.core.testing:tiny_llama")
    rtn = artifact_bytes(WeightOnlyQuant(), WeightOnlyQuantConfig(default_bits=4, keep_ends_8bit=False), task,
                         tmp_path, "rtn")
    gptq = artifact_bytes(GPTQ(), GPTQConfig(default_bits=4, group_size=0, calibration_samples=64), task,
                          tmp_path, "gptq")
    assert abs(gptq - rtn) / rtn < 0.05, (gptq, rtn)


def test_gptq_calibration_config_rejects_bad_values():
    from slimforge.core.errors import ConfigError

    with pytest.raises(ConfigError, match="gptq.bits"):
        GPTQConfig(default_bits=1)
    with pytest.raises(ConfigError, match="gptq.damping"):
        GPTQConfig(damping=0.0)
    with pytest.raises(ConfigError, match="gptq.group_size"):
        GPTQConfig(group_size=-1)


def test_gptq_records_no_note_for_linear_sites():
    task = tiny_task("slimforge.core.testing:tiny_mlp")
    ctx = TechniqueContext(task=task)
    model = GPTQ().apply(copy.deepcopy(task.teacher), GPTQConfig(default_bits=3, calibration_samples=64), ctx)
    assert not ctx.notes
    assert isinstance(model[1], nn.Linear) and "derived" in ctx.structure


# --- sparsegpt and wanda ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_m", [(2, 4), None], ids=["2:4", "unstructured"])
def test_sparsegpt_layer_error_below_magnitude(n_m):
    from slimforge.plugins.oneshot.pruning import magnitude_keep
    from slimforge.plugins.oneshot.sparsegpt import sparsegpt_prune

    torch.manual_seed(0)
    w, x = torch.randn(32, 64), correlated_inputs()
    reference = x @ w.t()
    magnitude = w.masked_fill(~magnitude_keep(w, 0.5, n_m), 0.0)
    pruned, keep = sparsegpt_prune(w, hessian_of(x), 0.5, n_m, 0.01)
    assert torch.equal(pruned == 0, ~keep) and abs((~keep).float().mean().item() - 0.5) < 0.01
    if n_m:
        assert torch.all(keep.view(32, -1, 4).sum(dim=-1) == 2)
    error = torch.linalg.norm(x @ pruned.t() - reference)
    assert error < 0.5 * torch.linalg.norm(x @ magnitude.t() - reference)


def test_wanda_keeps_the_weights_on_large_inputs():
    from slimforge.plugins.oneshot.wanda import wanda_keep

    w = torch.ones(4, 8)
    square_norm = torch.tensor([1.0, 100.0] * 4)
    keep = wanda_keep(w, square_norm, 0.5, None)
    assert torch.equal(keep, (square_norm > 1).expand(4, 8))
    assert torch.all(wanda_keep(torch.randn(4, 8), square_norm, 0.5, (2, 4)).view(4, 2, 4).sum(-1) == 2)


@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda"])
def test_pruned_then_gptq_keeps_zeros_and_shrinks_the_artifact(pruner, tmp_path):
    from slimforge.core.compressed import load_model
    from slimforge.core.manager import Plugins
    from slimforge.core.outputs import logits_of

    registry = Plugins(load_entry_points=False).registry
    task = tiny_task("slimforge.core.testing:tiny_llama")
    prune, quantize = registry.get(pruner), registry.get("gptq")
    prune_config = prune.Config(pattern="2:4", calibration_samples=64)
    quantize_config = GPTQConfig(default_bits=4, calibration_samples=64, act_order=True, symmetric=False)
    prune_ctx, quantize_ctx = TechniqueContext(task=task), TechniqueContext(task=task)
    model = prune.apply(copy.deepcopy(task.teacher), prune_config, prune_ctx)
    masks = prune_ctx.state["masks"]
    assert masks and not prune.needs_recovery
    model = quantize.apply(model, quantize_config, quantize_ctx)
    from slimforge.core.sites import weight_sites

    for name, site in weight_sites(model).items():
        if name in masks:
            assert torch.all(site.tensor(model)[~masks[name]] == 0), name
    plan = Plan(steps=(PlanStep(pruner, prune.config_to_dict(prune_config)),
                       PlanStep("gptq", quantize.config_to_dict(quantize_config))), seed=0)
    size = save_model(model, tmp_path / "both.slim", task=task, plan=plan,
                      structure=[prune_ctx.structure, quantize_ctx.structure])
    dense = artifact_bytes(quantize, quantize_config, task, tmp_path, "dense")
    assert size < 0.85 * dense, (size, dense)
    loaded = load_model(tmp_path / "both.slim", registry).model
    x = task.split("val")[:][0][:8]
    with torch.inference_mode():
        assert torch.equal(logits_of(model(x)), logits_of(loaded(x)))


def test_pruner_config_rejects_bad_pattern():
    from slimforge.core.errors import ConfigError
    from slimforge.plugins.oneshot.sparsegpt import SparseGPTConfig
    from slimforge.plugins.oneshot.wanda import WandaConfig

    with pytest.raises(ConfigError, match="wanda.pattern"):
        WandaConfig(pattern="4:2")
    with pytest.raises(ConfigError, match="sparsegpt.sparsity"):
        SparseGPTConfig(default_sparsity=1.0)


# --- awq -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["tiny_transformer", "tiny_llama", "tiny_gpt2"])
def test_awq_folds_scales_without_changing_the_function(architecture):
    from slimforge.core.outputs import logits_of
    from slimforge.plugins.oneshot.awq import AWQ, AWQConfig

    task = tiny_task(f"slimforge.core.testing:{architecture}")
    ctx = TechniqueContext(task=task)
    model = AWQ().apply(copy.deepcopy(task.teacher), AWQConfig(bits=3, group_size=0, calibration_samples=64), ctx)
    assert any(alpha > 0 for alpha in ctx.state["awq_alpha"].values()), ctx.state["awq_alpha"]
    x = task.split("val")[:][0][:16]
    with torch.no_grad():
        assert torch.allclose(logits_of(model(x)), logits_of(task.teacher(x)), atol=1e-4, rtol=1e-4)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, task.teacher.state_dict()[k])]
    assert changed


def test_awq_scales_cut_the_quantized_error_on_outlier_channels():
    from slimforge.plugins.oneshot.awq import AWQConfig, quantization_error, search_scales

    torch.manual_seed(3)
    x = torch.randn(4096, 64)
    x[:, [0, 32]] *= 10.0  # one channel per group carries large activations, as in LLMs
    w = torch.randn(32, 64)
    stats = InputStatistics(64, full=True)
    stats.add(x)
    config = AWQConfig(bits=4, group_size=32)
    scales, alpha = search_scales([w], stats.hessian, stats.square_norm, stats.rows, config)
    assert alpha > 0
    unscaled = quantization_error([w], stats.hessian, torch.ones(64), config)
    assert quantization_error([w], stats.hessian, scales, config) < 0.8 * unscaled


def test_nm_pattern_only_on_sites_with_nonzero_sparsity():
    from slimforge.plugins.oneshot.wanda import Wanda, WandaConfig

    task = tiny_task("slimforge.core.testing:tiny_mlp")
    config = WandaConfig(pattern="2:4", sparsity={"1": 0.5}, default_sparsity=0.0, calibration_samples=64)
    ctx = TechniqueContext(task=task)
    model = Wanda().apply(copy.deepcopy(task.teacher), config, ctx)
    assert set(ctx.state["masks"]) == {"1.weight"}
    assert torch.all((model[1].weight != 0).view(64, -1, 4).sum(dim=-1) <= 2)
    assert torch.equal(model[3].weight, task.teacher[3].weight)


@pytest.mark.parametrize("architecture", ["tiny_transformer", "tiny_llama", "tiny_gpt2"])
def test_last_block_statistics_are_those_of_the_model_compressed_before_it(architecture):
    """The last block's sites get the statistics one whole-model pass gives on the model with every
    earlier site compressed (here: halved) and that block not yet: each block runs on exactly the
    inputs the compressed model gives it.  A Hugging Face key/value cache carried between a block's
    runs (its statistics pass, then its output pass) fails this: the output pass attends to the
    keys of the uncompressed run, and the cache grows by a block's keys and values each run."""
    from slimforge.core.sites import weight_sites
    from slimforge.plugins.common import site_order
    from slimforge.plugins.oneshot.calibration import block_of, gather_statistics

    task = tiny_task(f"slimforge.core.testing:{architecture}")
    batches = [task.split("train")[:][0][start:start + 8] for start in (0, 8)]
    model = copy.deepcopy(task.teacher).eval()
    sites = weight_sites(model)
    blocks = repeated_blocks(model, sites)
    order = site_order(model, (batches[0][:1],), sites)
    in_last = [name for name in order if block_of(sites[name], blocks) == len(blocks[1]) - 1]
    earlier = order[:order.index(in_last[0])]
    seen = {}

    def halve(site, stats, why):
        seen[site.name] = stats
        site.set_matrix(model, site.matrix(model) * 0.5)

    compress_sequentially(model, sites, batches, halve)
    reference = copy.deepcopy(task.teacher).eval()
    reference_sites = weight_sites(reference)
    for name in earlier:
        reference_sites[name].set_matrix(reference, reference_sites[name].matrix(reference) * 0.5)
    whole, _ = gather_statistics(reference, [reference_sites[name] for name in in_last], batches)
    compared = [name for name in in_last if whole[name] is not None]
    assert len(compared) >= 2
    for name in compared:
        torch.testing.assert_close(seen[name].hessian, whole[name].hessian, rtol=1e-4, atol=1e-6, msg=name)


def test_gptq_names_a_nan_hessian_instead_of_calling_it_singular():
    """Calibration inputs that overflowed give a NaN Hessian; damping cannot mend that, and the
    error says what happened rather than "singular after damping"."""
    hessian = hessian_of(correlated_inputs(256, 16))
    hessian[3, 3] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="NaN or inf"):
        gptq_quantize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), hessian, 4, 0, True, 0.01, False)
