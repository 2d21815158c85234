"""int8 on every weight site: the float32 conversions are equivalent to the modules they replace,
and the int8 modules they open up store and reload through the artifact."""

import copy

import pytest
import torch
from torch import nn

from slimforge.core.artifact import decode_tensors, encode_tensors
from slimforge.core.testing import tiny_gpt2
from slimforge.plugins.quantization import int8_sites
from slimforge.plugins.quantization.int8_sites import ProjectedMultiheadAttention

ATOL = 1e-5


def _mha_cases():
    yield {"batch_first": True}, {}
    yield {"batch_first": False}, {}
    yield {"batch_first": True}, {"need_weights": False}
    yield {"batch_first": True}, {"average_attn_weights": False}
    yield {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True}, {}
    yield {"batch_first": True, "kdim": 12, "vdim": 20}, {}
    yield {"batch_first": True, "bias": False}, {"need_weights": False}


@pytest.mark.parametrize("init, call", list(_mha_cases()))
@pytest.mark.parametrize("masks", ["none", "bool_attn", "float_attn_3d", "padding", "causal"])
def test_projected_attention_equals_multihead_attention(init, call, masks):
    torch.manual_seed(0)
    n, length, s, e, h = 3, 5, 7, 16, 4
    mha = nn.MultiheadAttention(e, h, **init).eval()
    with torch.no_grad():  # nonzero biases, so a misplaced bias shows
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    projected = ProjectedMultiheadAttention.from_mha(mha).eval()
    def shape(steps, width):
        return (n, steps, width) if init["batch_first"] else (steps, n, width)

    query = torch.randn(shape(length, e))
    key = torch.randn(shape(s, init.get("kdim", e)))
    value = torch.randn(shape(s, init.get("vdim", e)))
    kwargs = dict(call)
    if masks == "bool_attn":
        kwargs["attn_mask"] = torch.rand(length, s) > 0.7
        kwargs["attn_mask"][:, 0] = False  # no fully masked row: NaN == NaN would not compare
    elif masks == "float_attn_3d":
        kwargs["attn_mask"] = torch.randn(n * h, length, s)
    elif masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * s, [False] * (s - 2) + [True] * 2, [False] * (s - 1) + [True]])
    elif masks == "causal":
        if init.get("add_bias_kv") or init.get("add_zero_attn"):
            pytest.skip("the causal shortcut needs a square mask")
        if "kdim" in init:
            pytest.skip("self-attention only")
        key, value = query.clone(), query.clone()
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(length), is_causal=True)
        kwargs.setdefault("need_weights", False)
    with torch.no_grad():
        expected, expected_weights = mha(query, key, value, **kwargs)
        actual, actual_weights = projected(query, key, value, **kwargs)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)
    if expected_weights is None:
        assert actual_weights is None
    else:
        torch.testing.assert_close(actual_weights, expected_weights, atol=ATOL, rtol=ATOL)


def test_projected_attention_unbatched_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    projected = ProjectedMultiheadAttention.from_mha(mha).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(projected(x, x, x)[0], mha(x, x, x)[0], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(projected(x, x, x)[1], mha(x, x, x)[1], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_transformer_encoder_keeps_working_with_projected_attention(norm_first, padding):
    """The parent's fused fast path (taken by the original in eval) gives way to the plain path,
    which calls the projected attention exactly as it called nn.MultiheadAttention."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]]) if padding else None
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=mask)
        assert int8_sites.convert_attention(encoder) == ["layers.0.self_attn", "layers.1.self_attn"]
        actual = encoder(x, src_key_padding_mask=mask)
    if padding:  # the fast path leaves padded positions as zeros; compare the real ones
        keep = ~mask
        expected, actual = expected[keep], actual[keep]
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def test_transformer_decoder_keeps_working_with_projected_attention():
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        expected = decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)
        assert len(int8_sites.convert_attention(decoder)) == 2
        actual = decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def test_hf_conv1d_as_linear_is_equivalent():
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        converted = int8_sites.convert_hf_conv1d(model)
        actual = model(tokens).logits
    assert len(converted) == 8 and all(type(model.get_submodule(n)) is nn.Linear for n in converted)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


def test_quantized_embedding_round_trips_through_the_codec():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8))
    int8_sites.quantize_embeddings(model, ["0"])
    assert isinstance(model[0], int8_sites.Int8Embedding)
    state = model.state_dict()
    weight = state["0._packed_params._packed_weight"]
    assert weight.dtype == torch.quint8 and weight.qscheme() == torch.per_channel_affine_float_qparams
    _, loaded = decode_tensors(encode_tensors(state, {}))
    fresh = nn.Sequential(nn.Embedding(20, 8))
    int8_sites.quantize_embeddings(fresh, ["0"])
    fresh.load_state_dict(loaded)
    ids = torch.randint(0, 20, (4, 6)).t()  # strided indices, as HF passes expanded ids
    assert torch.equal(fresh(ids), model(ids))
    torch.testing.assert_close(model(ids), nn.functional.embedding(ids, weight.dequantize()))


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_dynamic_int8_rnn_state_dict_holds_tensors_not_script_objects(kind):
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.manual_seed(0)
    model = nn.Sequential(kind(6, 10, num_layers=2, bidirectional=True, batch_first=True))
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        expected = model(x)[0]
    int8_sites.quantize_rnns(model, ["0"], per_channel_dynamic_qconfig)
    state = model.state_dict()
    assert all(isinstance(v, (torch.Tensor, bool, torch.dtype)) for v in state.values())
    assert state["0._all_weight_values.0.weight_ih"].dtype == torch.qint8
    assert len([k for k in state if k.endswith("weight_hh")]) == 4  # 2 layers x 2 directions
    _, loaded = decode_tensors(encode_tensors(state, {}))
    fresh = nn.Sequential(kind(6, 10, num_layers=2, bidirectional=True, batch_first=True))
    int8_sites.quantize_rnns(fresh, ["0"], per_channel_dynamic_qconfig)
    fresh.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        actual, reloaded = model(x)[0], fresh(x)[0]
    assert torch.equal(actual, reloaded)
    torch.testing.assert_close(actual, expected, atol=0.05, rtol=0)


def test_rnns_torch_ao_cannot_quantize_are_noted():
    model = nn.ModuleDict({"rnn": nn.RNN(4, 4), "nobias": nn.GRU(4, 4, bias=False),
                           "proj": nn.LSTM(4, 8, proj_size=2), "ok": nn.LSTM(4, 4)})
    names, notes = int8_sites.quantizable_rnns(model)
    assert names == ["ok"]
    assert len(notes) == 3 and "GRU and LSTM only" in notes[0] and "bias=False" in notes[1] and "proj_size" in notes[2]


def test_tied_table_is_stored_once_as_the_heads_int8_weight():
    pytest.importorskip("transformers")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = tiny_gpt2()
    ties = int8_sites.tied_heads(model)
    assert ties == {"transformer.wte": "lm_head"}
    table = model.transformer.wte.weight.detach().clone()
    model = quantize_dynamic(model, {"lm_head": per_channel_dynamic_qconfig}, dtype=torch.qint8)
    int8_sites.bind_tied_embeddings(model, ties)
    assert isinstance(model.lm_head, DynamicLinear)
    assert isinstance(model.transformer.wte, int8_sites.Int8TiedEmbedding)
    keys = list(model.state_dict())
    assert not any(k.startswith("transformer.wte.") for k in keys)  # the table lives in lm_head only
    ids = torch.tensor([[0, 5, 63]])
    rows = model.transformer.wte(ids)
    assert torch.equal(rows[0], model.lm_head.weight().dequantize()[ids[0]])
    torch.testing.assert_close(rows[0], table[ids[0]], atol=float(table.abs().max()) / 127, rtol=0)
    copied = copy.deepcopy(model)  # trials copy models: the copy's lookup must read the copy's head
    assert copied.transformer.wte._head[0] is copied.lm_head
