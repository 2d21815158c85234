"""kmeans_clustering: codes cost at most log2(k) bits per weight in the file, a pruned layer pays
for its nonzeros only, pruned zeros stay exact, fine-tuning moves centroids and never codes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimforge.core.compressed import load_model, save_model
from slimforge.core.artifact import describe_artifact, encode_tensors
from slimforge.core.errors import ConfigError
from slimforge.core.manager import Plugins
from slimforge.core.plan import Plan, PlanStep, Recovery
from slimforge.core.recovery import AppliedStep, recover
from slimforge.core.technique import TechniqueContext
from slimforge.core.testing import TINY_ARCHITECTURES, tiny_task
from slimforge.plugins.common import CODE_STORAGES, encoded_codes_size, replace_module
from slimforge.plugins.pruning.magnitude import MagnitudePruning, MagnitudePruningConfig
from slimforge.plugins.sharing.kmeans import ClusteredLayer, KMeansClustering, KMeansConfig, kmeans_1d

KMEANS = KMeansClustering()


def _clustered(architecture=TINY_ARCHITECTURES[1], **config):
    task = tiny_task(architecture)
    ctx = TechniqueContext(task=task)
    config = KMeansConfig(**config)
    return task, KMEANS.apply(copy.deepcopy(task.teacher), config, ctx), config, ctx


def test_lloyd_from_linear_init_is_deterministic_and_assigns_nearest():
    values = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    centroids, codes = kmeans_1d(values, 8, iterations=200)
    nearest = (values[:, None].double() - centroids[None]).abs().argmin(dim=1)
    assert torch.equal(codes, nearest)
    # Converged Lloyd (it stops early at the fixed point): each centroid is its cluster's mean,
    # and the result beats the evenly spaced start.
    for c in range(8):
        assert torch.isclose(centroids[c], values[codes == c].double().mean())
    start = torch.linspace(float(values.min()), float(values.max()), 8, dtype=torch.float64)
    def sse(cs):
        return (values.double() - cs[(values[:, None].double() - cs).abs().argmin(dim=1)]).pow(2).sum()

    assert sse(centroids) < 0.7 * sse(start)
    assert sse(kmeans_1d(values, 8)[0]) < 0.7 * sse(start)  # the default 30 iterations, not yet converged
    again = kmeans_1d(values, 8, iterations=200)
    assert torch.equal(again[0], centroids) and torch.equal(again[1], codes)
    # Linear init starts at min and max: a lone extreme weight keeps its own centroid.
    outlier = torch.cat([torch.randn(1000) * 0.1, torch.tensor([5.0])])
    centroids, codes = kmeans_1d(outlier, 8)
    assert centroids[-1] == 5.0 and (codes == 7).sum() == 1


def _saved_rows(model, task, config, ctx, path, steps=None, structure=None):
    plan = Plan(steps=steps or (PlanStep(KMEANS.name, KMEANS.config_to_dict(config)),))
    save_model(model, path, task=task, plan=plan, structure=structure or [ctx.structure])
    return {row["name"]: row for row in describe_artifact(path)["tensors"]}


def test_4bit_codes_of_a_dense_64x144_layer_take_at_most_half_a_byte_per_weight(tmp_path):
    task, model, config, ctx = _clustered(bits={"1": 4, "3": 4, "5": 2})
    layer = model[1]
    assert isinstance(layer, ClusteredLayer) and layer.weight_shape == (64, 144) and not layer.zero_code
    assert layer.decoded_weight().unique().numel() <= 16
    # The storage form is the one the codec makes smaller, and it is recorded for restore_structure.
    storage = ctx.structure["layers"]["1"]["storage"]
    assert storage == layer.storage == min(CODE_STORAGES, key=lambda s: encoded_codes_size(layer.code_index, 4, s))
    rows = _saved_rows(model, task, config, ctx, tmp_path / "kmeans.slim")
    assert "1.weight" not in rows and "1.code_index" not in rows  # no float copy, no unpacked cache
    codes = rows["1.codes"]
    assert codes["dtype"] == "uint8"
    assert codes["shape"] == ([64 * 144 // 2] if storage == "packed" else [64, 144])
    assert codes["stored_bytes"] <= 64 * 144 * 4 // 8 == 4608  # <= bits / 8 bytes per code, whichever form
    assert rows["1.codebook"]["shape"] == [16]
    layer_bytes = sum(r["stored_bytes"] for name, r in rows.items() if name.startswith("1."))
    assert layer_bytes < 64 * 144 * 4 / 7  # vs 36,864 dense float32 bytes
    loaded = load_model(tmp_path / "kmeans.slim", Plugins(load_entry_points=False).registry).model
    x = task.split("val")[:][0][:32]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert torch.equal(loaded[1].code_index, layer.code_index)
    assert loaded[1].storage == storage


def test_a_90_percent_pruned_layer_pays_for_its_nonzeros_only(tmp_path):
    task = tiny_task(TINY_ARCHITECTURES[1])
    pruning, prune_ctx = MagnitudePruning(), TechniqueContext(task=task)
    prune_config = MagnitudePruningConfig(default_sparsity=0.9)
    model = pruning.apply(copy.deepcopy(task.teacher), prune_config, prune_ctx)
    config, ctx = KMeansConfig(fc_bits=5), TechniqueContext(task=task)
    model = KMEANS.apply(model, config, ctx)
    layer = model[1]
    assert layer.zero_code and layer.storage == ctx.structure["layers"]["1"]["storage"] == "uint8"
    assert (layer.codes.dtype, tuple(layer.codes.shape)) == (torch.uint8, (64, 144))
    assert torch.equal(layer.codes == 0, layer.decoded_weight() == 0)
    assert int((layer.codes != 0).sum()) == 64 * 144 - round(0.9 * 64 * 144)
    steps = (PlanStep(pruning.name, pruning.config_to_dict(prune_config)),
             PlanStep(KMEANS.name, KMEANS.config_to_dict(config)))
    rows = _saved_rows(model, task, config, ctx, tmp_path / "pruned.slim", steps, [prune_ctx.structure, ctx.structure])
    codes = rows["1.codes"]
    # Stored sparsely (relative indices or bitmask) and entropy-coded: 922 nonzero codes in ~1 KB,
    # against 5,760 bytes for the same 5-bit codes packed densely, and less than those packed
    # bytes after entropy coding.
    assert codes["encoding"] in ("relative", "bitmask")
    packed_dense = 64 * 144 * 5 // 8
    assert codes["stored_bytes"] < 0.25 * packed_dense
    assert codes["stored_bytes"] < encoded_codes_size(layer.code_index, 5, "packed") - len(encode_tensors({}, {}))
    loaded = load_model(tmp_path / "pruned.slim", Plugins(load_entry_points=False).registry).model
    x = task.split("val")[:][0][:32]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_artifacts_with_packed_codes_and_no_recorded_storage_still_load(tmp_path):
    # The form every artifact had before the storage choice: packed codes, even for pruned layers.
    task = tiny_task(TINY_ARCHITECTURES[1])
    model = MagnitudePruning().apply(copy.deepcopy(task.teacher), MagnitudePruningConfig(default_sparsity=0.5),
                                     TechniqueContext(task=task))
    config, ctx = KMeansConfig(fc_bits=3), TechniqueContext(task=task)
    model = KMEANS.apply(model, config, ctx)
    for name, spec in ctx.structure["layers"].items():
        clustered = model.get_submodule(name)
        old = ClusteredLayer.for_layer(task.teacher.get_submodule(name), 3, True, "packed")
        with torch.no_grad():
            old.codebook.copy_(clustered.codebook)
            old.bias.copy_(clustered.bias)
        old.set_codes(clustered.code_index)
        replace_module(model, name, old)
        del spec["storage"]
    rows = _saved_rows(model, task, config, ctx, tmp_path / "old.slim")
    assert rows["1.codes"]["shape"] == [(64 * 144 * 3 + 7) // 8]
    loaded = load_model(tmp_path / "old.slim", Plugins(load_entry_points=False).registry).model
    assert loaded[1].storage == "packed"
    x = task.split("val")[:][0][:32]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_forward_is_the_original_op_on_the_decoded_weight():
    task, model, _, ctx = _clustered(TINY_ARCHITECTURES[0], bits={"0": 6, "3": 4}, fc_bits=3)
    teacher = task.teacher
    x = task.split("val")[:][0][:8]
    conv = model[3]
    with torch.no_grad():
        expected = F.conv2d(x[:, :1].repeat(1, 8, 1, 1), conv.decoded_weight(), conv.bias)
        assert torch.equal(conv(x[:, :1].repeat(1, 8, 1, 1)), expected)
        # Every weight decodes to the centroid nearest to it.
        w = teacher[3].weight
        nearest = (w[..., None] - conv.codebook).abs().min(dim=-1).values
        assert torch.allclose((conv.decoded_weight() - w).abs(), nearest, atol=1e-6)
    # conv "0" has 72 weights (288 bytes): a 64-entry codebook plus 6-bit codes (310 bytes) is bigger.
    assert not isinstance(model[0], ClusteredLayer)
    assert any("'0' has 72 weights" in note for note in ctx.notes)
    assert set(ctx.structure["layers"]) == {"3", "6", "8"}


def test_pruned_zeros_stay_exactly_zero_through_recovery():
    task = tiny_task(TINY_ARCHITECTURES[1])
    pruning, prune_ctx = MagnitudePruning(), TechniqueContext(task=task)
    prune_config = MagnitudePruningConfig(default_sparsity=0.7)
    model = pruning.apply(copy.deepcopy(task.teacher), prune_config, prune_ctx)
    masks = {name: (model.get_submodule(name).weight != 0) for name in ("1", "3", "5")}
    ctx = TechniqueContext(task=task)
    model = KMEANS.apply(model, KMeansConfig(fc_bits=3), ctx)
    assert all(model.get_submodule(name).zero_code for name in masks)
    assert model[1].codebook.numel() == 7  # 2**3 codes, one of them the fixed zero
    steps = [AppliedStep(pruning, prune_config, prune_ctx), AppliedStep(KMEANS, KMeansConfig(fc_bits=3), ctx)]
    recover(model, steps, torch.utils.data.Subset(task.split("train"), range(64)), Recovery(epochs=1, lr=1e-2),
            batch_size=32)
    for name, mask in masks.items():
        weight = model.get_submodule(name).decoded_weight()
        assert torch.equal(weight == 0, ~mask), name  # zeros exactly where pruned, nowhere else


def test_finetuning_moves_centroids_and_not_codes():
    task, model, config, ctx = _clustered()
    before = copy.deepcopy(model)
    x, y = task.split("train")[:][0][:64], task.split("train")[:][1][:64]
    # Each centroid's gradient is the sum of the gradients of the weights that share it.
    layer = model[3]
    dense = layer.decoded_weight().detach().requires_grad_()
    hidden = model[2](model[1](model[0](x)))
    F.cross_entropy(model[5](model[4](F.linear(hidden, dense, layer.bias))), y).backward()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = torch.zeros_like(layer.codebook).index_add_(0, layer.code_index.flatten(), dense.grad.flatten())
    assert torch.allclose(layer.codebook.grad, expected, atol=1e-7)
    model.zero_grad()
    recover(model, [AppliedStep(KMEANS, config, ctx)], torch.utils.data.Subset(task.split("train"), range(64)),
            Recovery(epochs=1, lr=1e-2), batch_size=32)
    for name in ("1", "3", "5"):
        old, new = before.get_submodule(name), model.get_submodule(name)
        assert not torch.equal(old.codebook, new.codebook), name
        assert torch.equal(old.codes, new.codes) and torch.equal(old.code_index, new.code_index), name


def test_quantizers_cannot_follow_clustering():
    registry = Plugins(load_entry_points=False).registry
    for name in ("int8_ptq", "weight_only_quant"):
        assert name in KMeansClustering.cannot_precede
        if name in registry:
            assert type(registry.get(name)).conflicts_with(KMeansClustering)


def test_suggest_gives_convolutions_more_bits():
    from slimforge.core.space import FixedSuggester, scoped

    task = tiny_task(TINY_ARCHITECTURES[0])
    for seed in range(10):
        config = KMEANS.suggest(scoped(FixedSuggester(seed=seed), KMEANS.name), task)
        assert set(config.bits) == {"0", "3", "6", "8"}
        assert all(3 <= config.bits[n] <= 8 for n in ("0", "3")) and all(2 <= config.bits[n] <= 6 for n in ("6", "8"))
    assert (KMeansConfig().conv_bits, KMeansConfig().fc_bits) == (8, 5)  # Deep Compression's setting


@pytest.mark.parametrize("kwargs", [{"bits": {"fc1": 9}}, {"conv_bits": 0}, {"fc_bits": True}, {"iterations": 0}])
def test_config_rejects_out_of_range_values(kwargs):
    with pytest.raises(ConfigError, match="kmeans_clustering"):
        KMeansConfig(**kwargs)


def test_inference_cache_follows_codebook_and_codes():
    task, model, _, _ = _clustered()
    layer, x = model[1], task.split("val")[:][0][:4].flatten(1)
    with torch.inference_mode():
        first = layer(x)
    layer.codebook.data.add_(0.5)  # bypasses the version counter, like a fused optimizer step
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.decode(), layer.bias)) and not torch.equal(layer(x), first)
    other = copy.deepcopy(layer)
    other.set_codes(torch.zeros(layer.weight_shape, dtype=torch.int64))
    with torch.no_grad():
        assert not torch.equal(other(x), layer(x))  # cached with the all-zero codes
        other.load_state_dict(layer.state_dict())  # same codebook values, new codes
        assert torch.equal(other(x), layer(x))


def test_centroid_gradients_are_summed_in_a_fixed_order():
    """The codebook's gradient is the float64 per-centroid sum of the weight gradients, cast once:
    the same bytes whatever the thread count (the plain gather's parallel accumulation was not)."""
    from slimforge.plugins.sharing.kmeans import _CodebookLookup

    generator = torch.Generator().manual_seed(0)
    table = torch.randn(16, generator=generator, requires_grad=True)
    index = torch.randint(0, 16, (64, 128), generator=generator)
    grad = torch.randn(64, 128, generator=generator)
    _CodebookLookup.apply(table, index).backward(grad)
    expected = torch.zeros(16, dtype=torch.float64).index_add_(0, index.reshape(-1), grad.reshape(-1).double())
    assert torch.equal(table.grad, expected.float())
    reference = table.detach().clone().requires_grad_()
    reference[index].backward(grad)
    assert torch.allclose(table.grad, reference.grad, atol=1e-4)
