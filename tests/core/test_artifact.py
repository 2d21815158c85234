"""Tests for slimforge.core.artifact: the pickle-free on-disk model format."""
import copy
import json
import os
import struct
import zlib

import pytest
import torch
from torch import nn

from slimforge.core import artifact
from slimforge.core.artifact import (
    ALIAS_VERSION, FORMAT_VERSION, MAGIC, decode_tensors, describe_artifact, encode_tensors,
    read_artifact, write_artifact,
)
from slimforge.core.errors import ArtifactError

# torch.ao quantization emits deprecation warnings on every call; they are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(a, b, where="value"):
    """Exact equality: type, dtype, shape, bits and quantization parameters."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), where
    if isinstance(a, tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.is_quantized) == (b.dtype, b.shape, b.is_quantized), where
        if a.is_quantized:
            assert a.qscheme() == b.qscheme(), where
            assert torch.equal(a.int_repr(), b.int_repr()), where
            if a.qscheme() == torch.per_tensor_affine:
                assert (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point()), where
            else:
                assert a.q_per_channel_axis() == b.q_per_channel_axis(), where
                assert_same(a.q_per_channel_scales(), b.q_per_channel_scales(), where + ".scales")
                assert_same(a.q_per_channel_zero_points(), b.q_per_channel_zero_points(), where + ".zps")
        else:
            assert torch.equal(_bits(a.contiguous()), _bits(b)), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    else:
        assert a == b, where


def roundtrip(tensors, meta=None):
    meta = {"k": 1} if meta is None else meta
    got_meta, got = decode_tensors(encode_tensors(tensors, meta))
    assert got_meta == meta
    assert list(got) == list(tensors)
    for k in tensors:
        assert_same(tensors[k], got[k], k)
    return got


def _tiny_model():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.relu = torch.nn.ReLU()
            self.fc = torch.nn.Linear(8 * 6 * 6, 10)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).flatten(1))

    return Tiny().eval()


def _quantize(model, scale, seed):
    fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    from torch.ao.quantization import get_default_qconfig_mapping
    torch.manual_seed(seed)
    prepared = fx.prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                             (torch.randn(1, 3, 8, 8),))
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(4, 3, 8, 8) * scale)
    return fx.convert_fx(prepared)


def test_fx_quantized_model_roundtrip_gives_bitwise_equal_outputs():
    torch.manual_seed(0)
    model = _tiny_model()
    quantized = _quantize(model, scale=1.0, seed=1)
    sd = quantized.state_dict()
    assert any(isinstance(v, tuple) for v in sd.values())      # packed Linear params
    assert any(isinstance(v, torch.dtype) for v in sd.values())
    got = roundtrip(sd, {"model": "tiny"})
    assert got._metadata == sd._metadata  # module versions: load_state_dict needs them

    fresh = _quantize(model, scale=5.0, seed=2)  # different calibration -> different qparams
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = quantized(x)
        assert not torch.equal(fresh(x), expected)
        fresh.load_state_dict(got)
        assert torch.equal(fresh(x), expected)


def test_state_dict_metadata_survives_for_load_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    model(torch.randn(8, 3))
    sd = model.state_dict()
    got = roundtrip(sd)
    assert got._metadata == sd._metadata
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    fresh.load_state_dict(got)
    x = torch.randn(5, 3)
    assert torch.equal(fresh(x), model(x))
    assert not hasattr(decode_tensors(encode_tensors({"a": torch.ones(1)}, {}))[1], "_metadata")


def test_roundtrip_special_values_and_types():
    torch.manual_seed(0)
    f32 = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.5, 1e-40])
    weird_nan = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # NaN payload
    tensors = {
        "f32": f32,
        "f64": torch.randn(3, 4, dtype=torch.float64),
        "f64_nan": torch.tensor([float("nan"), -0.0], dtype=torch.float64),
        "nan_payload": weird_nan,
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "i64": torch.tensor([0, -1, 2**40, -(2**62)], dtype=torch.int64),
        "i64_small": torch.arange(-3, 3),
        "i32": torch.tensor([7, -8], dtype=torch.int32),
        "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8),
        "bool": torch.rand(37) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "zeros": torch.zeros(64, 64),
        "noncontig": torch.randn(4, 6).t(),
        "param": torch.nn.Parameter(torch.randn(3)),
        "dtype": torch.qint8,
        "dtype16": torch.float16,
        "tup": (torch.randn(2), None, (1, 2.5)),
        "none": None, "int": -(2**50), "float": float("nan"), "neg0": -0.0, "flag": True,
    }
    got = roundtrip(tensors)
    assert isinstance(got["tup"], tuple) and got["tup"][1] is None
    assert got["flag"] is True and got["dtype"] is torch.qint8


def test_roundtrip_quantized_tensors():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    scales = torch.rand(6, dtype=torch.float64) + 0.01
    per_channel = torch.quantize_per_channel(w, scales, torch.zeros(6, dtype=torch.int64), 0, torch.qint8)
    per_channel_ax1 = torch.quantize_per_channel(w, torch.full((5,), 0.02, dtype=torch.float64),
                                                 torch.arange(5), 1, torch.quint8)
    float_qparams = torch.quantize_per_channel(w, torch.rand(6) + 0.01, torch.randn(6), 0, torch.quint8)
    pruned = w.clone()
    pruned[torch.rand_like(pruned) < 0.9] = 0
    tensors = {
        "pt_qint8": torch.quantize_per_tensor(w, 0.0137, 0, torch.qint8),
        "pt_quint8": torch.quantize_per_tensor(w, 0.1, 128, torch.quint8),
        "pt_qint32": torch.quantize_per_tensor(w, 1e-4, 3, torch.qint32),
        "pc_qint8": per_channel,
        "pc_quint8_axis1": per_channel_ax1,
        "pc_float_qparams": float_qparams,
        "pc_sparse": torch.quantize_per_channel(pruned, scales, torch.zeros(6, dtype=torch.int64), 0,
                                                torch.qint8),
        "packed": (per_channel, None),
    }
    roundtrip(tensors)


def test_pruned_weight_is_stored_sparsely(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(500, 800)
    w[torch.rand_like(w) < 0.9] = 0
    dense_bytes = w.numel() * 4
    size = write_artifact(tmp_path / "w.slim", {"w": w}, {})
    assert size < 0.35 * dense_bytes
    row = describe_artifact(tmp_path / "w.slim")["tensors"][0]
    assert row["name"] == "w" and row["encoding"] in ("bitmask", "relative")
    assert row["arrays"][0]["layout"] == row["encoding"]
    assert_same(w, read_artifact(tmp_path / "w.slim")[1]["w"])


def test_relative_layout_bridges_long_gaps_with_fillers():
    # Nonzeros far apart (gaps > 255) force filler entries; int8 values make relative beat bitmask.
    a = torch.zeros(20000, dtype=torch.int8)
    a[[0, 300, 301, 5000, 19999]] = torch.tensor([1, -2, 3, 4, -5], dtype=torch.int8)
    data = encode_tensors({"a": a}, {})
    assert_same(a, decode_tensors(data)[1]["a"])
    both = torch.zeros(10, 300)
    both[:, 0] = -0.0  # -0.0 is nonzero in bits and must survive sparse layouts
    both[3, 7] = 2.0
    roundtrip({"b": both})


def test_all_zero_tensor_costs_almost_nothing():
    data = encode_tensors({"z": torch.zeros(1000, 1000)}, {})
    assert len(data) < 200


def test_narrowing(tmp_path):
    exact = torch.tensor([0.5, 0.25, 0.1], dtype=torch.float32).to(torch.float64).repeat(100)
    inexact = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).repeat(100)
    ints = torch.arange(300, dtype=torch.int64) - 100
    q = torch.quantize_per_channel(torch.randn(300, 4), exact, torch.zeros(300, dtype=torch.int64), 0,
                                   torch.qint8)
    tensors = {"exact": exact, "inexact": inexact, "ints": ints, "q": q}
    write_artifact(tmp_path / "n.slim", tensors, {})
    rows = {r["name"]: r for r in describe_artifact(tmp_path / "n.slim")["tensors"]}
    assert rows["exact"]["arrays"][0]["stored_dtype"] == "float32"
    assert rows["exact"]["arrays"][0]["raw_bytes"] == 4 * 300
    assert rows["inexact"]["arrays"][0]["stored_dtype"] == "float64"
    assert rows["ints"]["arrays"][0]["stored_dtype"] == "int16"
    parts = {a["part"]: a for a in rows["q"]["arrays"]}
    assert parts["scales"]["stored_dtype"] == "float32" and parts["scales"]["raw_bytes"] == 4 * 300
    assert parts["zero_points"]["layout"] == "zeros" and parts["zero_points"]["stored_bytes"] == 0
    got = read_artifact(tmp_path / "n.slim")[1]
    for k in tensors:
        assert_same(tensors[k], got[k], k)


def test_encoding_is_deterministic():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[w.abs() < 1] = 0
    tensors = {"w": w, "q": torch.quantize_per_tensor(w, 0.05, 0, torch.qint8), "d": torch.qint8,
               "t": (w, None)}
    assert encode_tensors(tensors, {"a": [1, 2]}) == encode_tensors(tensors, {"a": [1, 2]})


def test_write_artifact_is_atomic_and_returns_size(tmp_path):
    path = tmp_path / "model.slim"
    size = write_artifact(path, {"w": torch.randn(10, 10)}, {"name": "m"})
    assert size == os.path.getsize(path)
    size2 = write_artifact(str(path), {"w": torch.ones(3)}, {})  # overwrite in place
    assert size2 == os.path.getsize(path)
    assert os.listdir(tmp_path) == ["model.slim"]
    info = describe_artifact(path)
    assert info["format_version"] == 1 and info["file_bytes"] == size2  # nothing aliased: the original format
    assert info["tensors"][0]["shape"] == [3]


@pytest.fixture
def good_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "a.slim"
    write_artifact(path, {"w": torch.randn(50, 50), "b": torch.randn(50)}, {"x": 1})
    return path


def _corrupt(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def test_bad_magic(good_file, tmp_path):
    _corrupt(good_file, lambda d: b"NOTSLIM!" + d[8:])
    with pytest.raises(ArtifactError, match="not a slimforge artifact: .*a.slim"):
        read_artifact(good_file)
    other = tmp_path / "other.bin"
    other.write_bytes(b"hello")
    with pytest.raises(ArtifactError, match="not a slimforge artifact"):
        describe_artifact(other)
    assert MAGIC == b"SLIMFRG1"


@pytest.mark.parametrize("keep", [5, 12, 40, -1])
def test_truncated(good_file, keep):
    _corrupt(good_file, lambda d: d[:keep])
    with pytest.raises(ArtifactError, match="truncated"):
        read_artifact(good_file)


def test_flipped_payload_byte(good_file):
    data = bytearray(good_file.read_bytes())
    for where in (len(data) - 1, len(data) - 2000, 30):  # payload end, payload middle, header
        bad = bytearray(data)
        bad[where] ^= 0x40
        with pytest.raises(ArtifactError, match="artifact is corrupted"):
            decode_tensors(bytes(bad))


def test_newer_format_version(good_file, monkeypatch):
    _corrupt(good_file, lambda d: d[:8] + bytes([FORMAT_VERSION + 1]) + d[9:])
    msg = f"format version {FORMAT_VERSION + 1} is newer than this slimforge supports"
    with pytest.raises(ArtifactError, match=msg):
        read_artifact(good_file)
    with pytest.raises(ArtifactError, match="upgrade slimforge"):
        describe_artifact(good_file)
    monkeypatch.setattr(artifact, "FORMAT_VERSION", 7)  # a genuinely newer writer
    monkeypatch.setattr(artifact, "_BASE_VERSION", 7)  # whose plain files need its version too
    data = encode_tensors({"w": torch.ones(2)}, {})
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="format version 7 is newer"):
        decode_tensors(data)


@pytest.mark.parametrize("value, fragment", [
    ("text", "'bad'.*str"),
    ([1, 2], "'bad'.*list"),
    ((torch.ones(1), {"x": 1}), r"'bad\[1\]'.*dict"),
    (torch.ones(2, dtype=torch.complex128), "'bad'.*complex128"),
    (torch.ones(2).to_sparse(), "'bad'.*layout"),
])
def test_unsupported_values(value, fragment):
    with pytest.raises(ArtifactError, match=fragment):
        encode_tensors({"ok": torch.ones(1), "bad": value}, {})


def test_meta_must_be_json(tmp_path):
    with pytest.raises(ArtifactError, match="JSON"):
        write_artifact(tmp_path / "m.slim", {}, {"obj": object()})
    assert os.listdir(tmp_path) == []


# --- tensors several keys share (tied embeddings) are stored once --------------------------------

def _tied_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(50, 16), "head": nn.Linear(16, 50, bias=False)})
    model["head"].weight = model["embed"].weight  # tied input/output embedding
    return model


def test_a_tensor_two_keys_share_is_stored_once_and_loads_shared():
    model = _tied_model()
    tied = encode_tensors(model.state_dict(), {})
    untied = encode_tensors({k: v.clone() for k, v in model.state_dict().items()}, {})
    assert len(tied) < 0.55 * len(untied)  # the second copy's bytes are gone
    assert tied[8] == ALIAS_VERSION and untied[8] == 1  # an untied file is the old format, byte for byte
    _, tensors = decode_tensors(tied)
    assert tensors["head.weight"] is tensors["embed.weight"]
    assert torch.equal(tensors["embed.weight"], model["embed"].weight)
    fresh = _tied_model()
    with torch.no_grad():
        fresh["embed"].weight.zero_()
    fresh.load_state_dict(tensors, strict=True)
    assert torch.equal(fresh["head"].weight, model["embed"].weight)


def test_only_exact_sharing_is_aliased():
    base = torch.arange(24, dtype=torch.float32)
    tensors = {"a": base.view(4, 6), "b": base.view(4, 6), "t": base.view(4, 6).t(), "half": base[:12],
               "same_values": base.clone().view(4, 6), "e1": torch.empty(0), "e2": torch.empty(0)}
    _, decoded = decode_tensors(encode_tensors(tensors, {}))
    assert decoded["b"] is decoded["a"]
    for name in ("t", "half", "same_values", "e1", "e2"):  # other views, equal copies, empties: apiece
        assert decoded[name] is not decoded["a"] and torch.equal(decoded[name], tensors[name])


def test_an_alias_describes_itself(tmp_path):
    path = tmp_path / "tied.slim"
    write_artifact(path, _tied_model().state_dict(), {})
    rows = {r["name"]: r for r in describe_artifact(path)["tensors"]}
    assert rows["head.weight"]["encoding"] == "alias of embed.weight" and rows["head.weight"]["stored_bytes"] == 0


def test_a_version_1_reader_refuses_an_aliased_file_loudly(monkeypatch):
    data = encode_tensors(_tied_model().state_dict(), {})
    monkeypatch.setattr(artifact, "FORMAT_VERSION", 1)  # what an older slimforge knows
    with pytest.raises(ArtifactError, match="format version 2 is newer than this slimforge supports.*upgrade"):
        decode_tensors(data)


def _rewrite_header(data: bytes, change) -> bytes:
    """Re-encode ``data`` with ``change(header)`` applied, with valid checksums (a crafted file)."""
    _, _, hlen, _, plen = artifact._PREFIX.unpack_from(data)
    start = artifact._PREFIX.size
    header = json.loads(zlib.decompress(data[start:start + hlen]))
    change(header)
    hbytes = zlib.compress(json.dumps(header).encode(), 9)
    prefix = artifact._PREFIX.pack(artifact.MAGIC, header["format_version"], len(hbytes), zlib.crc32(hbytes), plen)
    return prefix + hbytes + data[start + hlen:]


@pytest.mark.parametrize("change", [
    lambda h: h["tensors"][1].update({"of": "missing"}),  # names no entry
    lambda h: h["tensors"].reverse(),  # the alias comes before the tensor it names
    lambda h: h.update({"format_version": 1}),  # version 1 has no aliases
])
def test_a_broken_alias_is_corruption(change):
    data = _rewrite_header(encode_tensors(_tied_model().state_dict(), {}), change)
    with pytest.raises(ArtifactError, match="artifact is corrupted.*alias"):
        decode_tensors(data)
