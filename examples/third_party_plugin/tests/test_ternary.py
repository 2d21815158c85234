"""ternary: the slimforge conformance kit on every architecture, plus what the technique promises:
codes at 1.6 bits per weight, and an artifact whose bytes are what those codes cost."""

from __future__ import annotations

import struct

import pytest
import torch

import slimforge_ternary.plugin as plugin
from slimforge.plugins.api import (ALL_ARCHITECTURES, ConfigError, TechniqueConformance, compress, tiny_task,
                                   weight_sites)
from slimforge_ternary.plugin import Ternary, TernaryConfig, pack_trits, unpack_trits


class TestTernary(TechniqueConformance):
    technique = "ternary"
    extra_plugins = (plugin,)  # harmless when the installed entry point registered it already
    architectures = ALL_ARCHITECTURES  # a CNN, an MLP, and token-input transformers and a GRU


def test_trits_pack_five_to_a_byte_and_back():
    codes = torch.randint(0, 3, (1003,), generator=torch.Generator().manual_seed(0))
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 201 == -(-1003 // 5)
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_trits(packed, 1003), codes)
    with pytest.raises(ValueError, match="trits must be 0, 1 or 2"):
        pack_trits(torch.tensor([3]))


def test_each_row_is_minus_s_zero_or_plus_s_with_the_least_squares_scale():
    task = tiny_task("slimforge.core.testing:tiny_mlp")
    model, _ = compress(Ternary(), TernaryConfig(threshold=0.7, keep_ends=False), task)
    teacher_w = task.teacher[1].weight.detach()
    weight = model[1].weight.detach()  # computed from the stored trits
    for row, original in zip(weight, teacher_w):
        assert set(row.unique().abs().tolist()) <= {0.0, float(row.abs().max())}
        kept = original.abs() > 0.7 * original.abs().mean()
        assert torch.equal(row != 0, kept)
        assert torch.allclose(row.abs().max(), original.abs()[kept].mean())


def _header_and_payload(path) -> tuple[int, int]:
    # The artifact layout (core.artifact): MAGIC(8) | u8 version | u32 header_len | u32 crc | u64
    # payload_len | header | payload.
    prefix = struct.Struct("<8sBIIQ")
    _, _, header, _, payload = prefix.unpack(path.read_bytes()[:prefix.size])
    return prefix.size + header, payload


@pytest.mark.parametrize("architecture", ["slimforge.core.testing:tiny_mlp", "slimforge.core.testing:tiny_gpt2"])
def test_the_artifact_costs_what_its_codes_do(architecture, tmp_path):
    from slimforge.core.compressed import save_model
    from slimforge.core.plan import Plan, PlanStep

    task = tiny_task(architecture)
    config = TernaryConfig(keep_ends=False)
    model, ctx = compress(Ternary(), config, task)
    # A tied tensor (GPT-2's lm_head is its token embedding) is one artifact entry under two keys.
    seen, state = set(), {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else key
        if identity not in seen:
            seen.add(identity)
            state[key] = tensor
    derived = ctx.structure["derived"]
    trits = {k: v for k, v in state.items() if k.endswith(".trits")}
    assert len(trits) == len(derived) and all(v.dtype == torch.uint8 for v in trits.values())
    numels = [site.numel for site in weight_sites(model).values() if site.setting_key in derived]
    weights = sum(numels)
    assert sum(v.numel() for v in trits.values()) == sum(-(-n // 5) for n in numels)  # ceil(n / 5) per site
    raw = sum(v.numel() * v.element_size() for v in state.values())  # codes + scales + float remainder
    path = tmp_path / "ternary.slim"
    size = save_model(model, path, task=task, plan=Plan(steps=(PlanStep("ternary", Ternary.config_to_dict(config)),)),
                      structure=[ctx.structure])
    container, payload = _header_and_payload(path)
    assert size == container + payload == path.stat().st_size
    # Every byte of tensor data is a stored code, scale or float tensor, entropy-coded: never more
    # than their raw bytes.  Measured: tiny_mlp 3032 of 3094 B (trits barely compress), tiny_gpt2
    # 7655 of 12307 B (LayerNorm weights of ones and zero biases do).
    assert payload <= raw
    assert weights * 1.6 / 8 <= sum(v.numel() for v in trits.values()) < weights * 1.6 / 8 + len(trits)
    if architecture.endswith("tiny_mlp"):
        assert payload >= 0.95 * raw


@pytest.mark.parametrize("values, message", [
    ({"threshold": 0.1}, "ternary.threshold: must be a number in [0.3, 1.0], got 0.1"),
    ({"keep_ends": "no"}, "ternary.keep_ends: must be true or false, got 'no'"),
])
def test_config_errors_name_the_field_and_the_valid_range(values, message):
    with pytest.raises(ConfigError) as info:
        Ternary.config_from_dict(values)
    assert str(info.value) == message
