"""On-disk format of a compressed model (the "artifact").

The artifact's byte count is the model size slimforge reports, so the format
is compact and honest: no pickle, just a small binary container.

Layout (all integers little-endian)::

    MAGIC (8) | u8 format_version | u32 header_len | u32 header_crc32 | u64 payload_len
    | zlib(JSON header) | payload (concatenated byte streams)

The JSON header lists every state_dict entry: kind, dtype, shape and, for
tensors, the layout chosen plus the byte streams that hold the data. Each stream
records its codec, offset, stored length, raw size and a CRC32 of the stored
bytes, so any flipped byte is detected before it can reach a decompressor.

A tensor that several state_dict keys share (tied input/output embeddings, or one technique
tensor registered under two tied modules) is stored once: the first key holds it, each other key
is an ``alias`` entry naming that key, and decoding hands every alias the same tensor object, so
the bytes on disk count it once.  Only exact sharing is aliased (same storage, offset, shape,
stride and dtype); overlapping views are stored apiece.  An artifact with aliases is written as
format version 2, so an older slimforge (version 1 only) refuses it with "upgrade slimforge"
instead of failing on an entry kind it does not know; one without aliases is still version 1,
byte for byte as before.

Per tensor the encoder (1) narrows the dtype when that round-trips bit-exactly,
(2) picks dense / bitmask / relative-index (Deep Compression) layout by raw byte
count, and (3) entropy-codes every stream with zlib or lzma (optionally after a
byte-plane shuffle), keeping raw bytes when nothing helps.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import re
import secrets
import stat
import struct
import warnings
import zlib
from collections import OrderedDict

import numpy as np
import torch

from slimforge.core.errors import ArtifactError

FORMAT_VERSION = 2  # the newest version this reader understands
# What each format version added: a file is written at the lowest version its entries need.
_BASE_VERSION, ALIAS_VERSION = 1, 2
MAGIC = b"SLIMFRG1"
_PREFIX = struct.Struct("<8sBIIQ")
# Raw LZMA2 has no self-describing header (saves ~60 bytes per stream vs .xz),
# so the filter chain is part of the format: changing it needs a version bump.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
# lzma runs at ~2 MB/s. Measured on weights it beats deflate by ~10% on small
# index/bitmask streams but by <1% (or loses) on big value streams, so big
# streams only get deflate and encoding stays fast enough to run per trial.
_LZMA_MAX_BYTES = 1 << 20

# Decode limits: a file may come from anywhere, so what it declares is checked before memory is
# spent on it.  A header is JSON of a few hundred bytes per tensor; 16 MiB holds ~50,000 tensors,
# and a zlib bomb stops there instead of inflating ~1000x its size.
MAX_HEADER_BYTES = 16 << 20
# The tensors a file declares, in bytes as loaded, may be at most LOAD_RATIO times the file's size
# (at least LOAD_FLOOR).  Deflate expands data at most ~1032x, so only all-zero tensors (stored as
# nothing) or near-empty sparse ones can declare more, and a 99.9 %-sparse model still fits; a few
# bytes declaring a 10^9-element tensor do not.  SLIMFORGE_MAX_LOAD_BYTES sets the limit instead.
LOAD_RATIO = 1000
LOAD_FLOOR = 256 << 20
LOAD_LIMIT_ENV = "SLIMFORGE_MAX_LOAD_BYTES"
# Pickle protocols 2-5 begin with the PROTO opcode 0x80 and the protocol number: a pickle written
# after slimforge's magic bytes would otherwise read as "format version 128".
_PICKLE_PROTO = 0x80

# Explicit whitelist: dtype names read from a file are only ever looked up here.
_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16", "complex64", "int64", "int32",
    "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "qint8", "quint8", "qint32", "quint4x2",
]
DTYPES = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
_DTYPE_TO_NAME = {d: n for n, d in DTYPES.items()}
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32}
_QSCHEMES = {torch.per_tensor_affine: "per_tensor_affine",
             torch.per_channel_affine: "per_channel_affine",
             torch.per_channel_affine_float_qparams: "per_channel_affine_float_qparams"}
# Same-width integer views: sparsity and equality are judged on raw bits, so
# -0.0 and NaN payloads are kept as "nonzero" values and survive bit-exactly.
_BITS_TORCH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS_NP = {1: np.dtype("<u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
# Narrowing candidates, smallest first.
_NARROW_FLOAT = {torch.float64: (torch.float16, torch.bfloat16, torch.float32),
                 torch.float32: (torch.float16, torch.bfloat16)}
_NARROW_INT = {torch.int64: (torch.int8, torch.uint8, torch.int16, torch.int32),
               torch.int32: (torch.int8, torch.uint8, torch.int16),
               torch.int16: (torch.int8, torch.uint8)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_BITS_TORCH[t.element_size()])


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """Smallest-dtype copy of t that converts back to t bit-exactly (else t)."""
    if t.numel() == 0:
        return t
    if t.dtype in _NARROW_FLOAT:
        orig = _bits(t)
        for cand in _NARROW_FLOAT[t.dtype]:
            small = t.to(cand)
            if torch.equal(_bits(small.to(t.dtype)), orig):
                return small
    elif t.dtype in _NARROW_INT:
        lo, hi = int(t.min()), int(t.max())
        for cand in _NARROW_INT[t.dtype]:
            info = torch.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return t.to(cand)
    return t


class _Payload:
    """Accumulates compressed streams and hands back their header records."""

    def __init__(self):
        self.chunks, self.size = [], 0

    def add(self, raw: bytes, itemsize: int) -> dict:
        cands = [("raw", 0, raw)]
        if raw:
            # Byte-plane shuffle groups exponent/sign bytes of floats together,
            # which typically buys deflate ~8% on float32 weights.
            inputs = [(0, raw)]
            if itemsize > 1:
                inputs.append((itemsize, np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()))
            zl = [("zlib", sh, zlib.compress(b, 9)) for sh, b in inputs]
            best = min(range(len(zl)), key=lambda i: len(zl[i][2]))
            cands += zl
            # lzma is slow, so only try it on the input deflate liked best.
            if len(raw) <= _LZMA_MAX_BYTES:
                cands.append(("lzma", inputs[best][0],
                              lzma.compress(inputs[best][1], format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)))
        codec, shuffle, data = min(cands, key=lambda c: len(c[2]))  # min() is stable: deterministic
        rec = {"codec": codec, "off": self.size, "len": len(data), "size": len(raw),
               "crc": zlib.crc32(data)}
        if shuffle:
            rec["shuffle"] = shuffle
        self.chunks.append(data)
        self.size += len(data)
        return rec


def _encode_array(t: torch.Tensor, payload: _Payload) -> dict:
    """Plain (non-quantized) tensor -> header spec {dtype, shape, layout, [as], streams}."""
    spec = {"dtype": _DTYPE_TO_NAME[t.dtype], "shape": list(t.shape)}
    small = _narrow(t)
    if small.dtype != t.dtype:
        spec["as"] = _DTYPE_TO_NAME[small.dtype]
    s = small.element_size()
    a = _bits(small).numpy().astype(_BITS_NP[s], copy=False)
    nz = a != 0
    nnz, n = int(nz.sum()), a.size
    if nnz == 0:  # includes empty tensors: nothing to store
        spec.update(layout="zeros", streams=[])
        return spec
    sizes = {"dense": n * s, "bitmask": (n + 7) // 8 + nnz * s}
    # Relative indexing costs at least (1 + s) bytes a nonzero.  Where that alone loses, its gaps
    # are not computed: they are three int64 arrays of the tensor's nonzeros, 24 bytes a weight of
    # a dense code tensor (the transient peak of quantizing an LM head, benchmarks/one_shot.py).
    if nnz * (1 + s) < min(sizes.values()):
        pos = np.flatnonzero(nz)
        skips = np.diff(pos, prepend=-1) - 1  # zeros skipped before each nonzero
        fillers = skips // 256                # each filler entry advances 256 positions
        sizes["relative"] = (nnz + int(fillers.sum())) * (1 + s)
    layout = min(sizes, key=sizes.get)  # ties keep the earlier (simpler) layout
    if layout == "dense":
        streams = [payload.add(a.tobytes(), s)]
    elif layout == "bitmask":
        streams = [payload.add(np.packbits(nz).tobytes(), 1), payload.add(a[nz].tobytes(), s)]
    else:
        # Deep Compression relative indexing: one uint8 gap per entry; a gap
        # over 255 is bridged by filler entries (gap 255, value 0).
        real = np.cumsum(fillers + 1) - 1
        gaps = np.full(nnz + int(fillers.sum()), 255, dtype=np.uint8)
        vals = np.zeros(gaps.size, dtype=a.dtype)
        gaps[real], vals[real] = skips % 256, a[pos]
        streams = [payload.add(gaps.tobytes(), 1), payload.add(vals.tobytes(), s)]
    spec.update(layout=layout, streams=streams)
    return spec


def _encode_value(v, name: str, payload: _Payload) -> dict:
    if v is None:
        return {"kind": "none"}
    if isinstance(v, bool):
        return {"kind": "bool", "value": v}
    if isinstance(v, int):
        return {"kind": "int", "value": v}
    if isinstance(v, float):  # hex bits: exact, and JSON has no NaN/inf
        return {"kind": "float", "value": struct.pack("<d", v).hex()}
    if isinstance(v, torch.dtype):
        if v not in _DTYPE_TO_NAME:
            raise ArtifactError(f"cannot store {name!r}: unsupported dtype value {v}")
        return {"kind": "dtype", "value": _DTYPE_TO_NAME[v]}
    if isinstance(v, tuple):
        items = [_encode_value(x, f"{name}[{i}]", payload) for i, x in enumerate(v)]
        return {"kind": "tuple", "items": items}
    if not isinstance(v, torch.Tensor):
        raise ArtifactError(f"cannot store {name!r}: unsupported type {type(v).__name__}")
    if v.layout != torch.strided or v.device.type == "meta":
        raise ArtifactError(f"cannot store {name!r}: unsupported tensor layout/device {v.layout}/{v.device}")
    t = v.detach().cpu().contiguous()
    if t.is_quantized:
        qs = _QSCHEMES.get(t.qscheme())
        if t.dtype not in _QUANTIZED or qs is None:
            raise ArtifactError(f"cannot store {name!r}: unsupported quantized tensor "
                                f"{t.dtype}/{t.qscheme()}")
        e = {"kind": "qtensor", "dtype": _DTYPE_TO_NAME[t.dtype], "shape": list(t.shape), "qscheme": qs,
             "int_repr": _encode_array(t.int_repr(), payload)}
        if qs == "per_tensor_affine":
            e.update(scale=struct.pack("<d", t.q_scale()).hex(), zero_point=t.q_zero_point())
        else:
            e.update(axis=t.q_per_channel_axis(),
                     scales=_encode_array(t.q_per_channel_scales(), payload),
                     zero_points=_encode_array(t.q_per_channel_zero_points(), payload))
        return e
    if t.dtype not in _DTYPE_TO_NAME or t.element_size() not in _BITS_TORCH:
        raise ArtifactError(f"cannot store {name!r}: unsupported tensor dtype {t.dtype}")
    return {"kind": "tensor", **_encode_array(t, payload)}


def _sharing_key(v) -> tuple | None:
    """What two keys holding the very same tensor have in common, or None when ``v`` is not a
    tensor worth aliasing.  Empty tensors cost nothing stored and may all report storage address
    0, and quantized tensors carry their own qparams, so neither is aliased."""
    if not isinstance(v, torch.Tensor) or v.numel() == 0 or v.is_quantized or v.layout != torch.strided:
        return None
    if v.device.type == "meta":
        return None
    return (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)


def encode_tensors(tensors: dict, meta: dict) -> bytes:
    """Serialize a state_dict-like mapping plus JSON-able meta to artifact bytes."""
    payload = _Payload()
    entries = []
    first_key: dict[tuple, str] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ArtifactError(f"cannot store key {name!r}: keys must be str, not {type(name).__name__}")
        sharing = _sharing_key(value)
        if sharing is not None and sharing in first_key:
            entries.append({"name": name, "kind": "alias", "of": first_key[sharing]})
            continue
        if sharing is not None:
            first_key[sharing] = name
        entries.append({"name": name, **_encode_value(value, name, payload)})
    version = ALIAS_VERSION if any(e["kind"] == "alias" for e in entries) else _BASE_VERSION
    header = {"format_version": version, "meta": meta, "tensors": entries}
    # state_dict()'s per-module `_metadata` carries module versions that
    # load_state_dict needs (quantized Linear/BatchNorm take legacy paths without it).
    sd_meta = getattr(tensors, "_metadata", None)
    if sd_meta is not None:
        header["state_dict_metadata"] = dict(sd_meta)
    try:
        hjson = json.dumps(header, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact meta is not JSON-serializable: {exc}") from None
    hbytes = zlib.compress(hjson, 9)
    prefix = _PREFIX.pack(MAGIC, version, len(hbytes), zlib.crc32(hbytes), payload.size)
    return b"".join([prefix, hbytes, *payload.chunks])


def _line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _check_version(version: int) -> None:
    if version > FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version} is newer than this slimforge "
                            f"supports ({FORMAT_VERSION}); upgrade slimforge")
    if version < 1:
        raise ArtifactError(f"artifact is corrupted: invalid format version {version}")


def _parse_header(head: bytes, file_size: int, source: str):
    """Validate prefix + header bytes; return (header dict, payload offset, payload length)."""
    if not head or head[:len(MAGIC)] != MAGIC[:len(head)]:
        raise ArtifactError(f"not a slimforge artifact: {source}")
    if len(head) < _PREFIX.size:
        if len(head) > len(MAGIC):  # version byte present: report a newer format first
            _check_version(head[len(MAGIC)])
        raise ArtifactError(f"artifact is truncated: {source} ({file_size} bytes)")
    _, version, hlen, hcrc, plen = _PREFIX.unpack_from(head)
    if version > FORMAT_VERSION and file_size != _PREFIX.size + hlen + plen:
        # A newer slimforge keeps this prefix, so its lengths add up to the file's size; when they do
        # not, the bytes after the magic are something else, and "upgrade slimforge" would mislead.
        what = "a Python pickle" if version == _PICKLE_PROTO and 2 <= head[len(MAGIC) + 1] <= 5 else "not a header"
        raise ArtifactError(f"not a slimforge artifact: {source} (the bytes after its magic are {what}; slimforge "
                            "never unpickles)")
    _check_version(version)
    start = _PREFIX.size + hlen
    if file_size < start + plen:
        raise ArtifactError(f"artifact is truncated: {source} has {file_size} bytes, expected {start + plen}")
    if file_size > start + plen:
        raise ArtifactError(f"artifact is corrupted: {source} has {file_size - start - plen} trailing bytes")
    hbytes = head[_PREFIX.size:start]
    if zlib.crc32(hbytes) != hcrc:
        raise ArtifactError(f"artifact is corrupted: header checksum mismatch in {source}")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(hbytes, MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise ArtifactError(f"artifact is corrupted: bad header in {source}: {_line(exc)}") from None
    if inflater.unconsumed_tail:
        raise ArtifactError(f"artifact is corrupted: the header of {source} inflates past {MAX_HEADER_BYTES >> 20} MiB "
                            "(a slimforge header takes a few hundred bytes per tensor)")
    try:
        header = json.loads(text)
        _check_version(int(header["format_version"]))
        if "meta" not in header or not isinstance(header["tensors"], list):
            raise ValueError("missing meta/tensors")
    except ArtifactError:
        raise
    except Exception as exc:  # CRC matched but content is invalid: still one line
        raise ArtifactError(f"artifact is corrupted: bad header in {source}: {_line(exc)}") from None
    return header, start, plen


def _read_stream(rec: dict, payload: memoryview, source: str) -> bytes:
    off, ln = int(rec["off"]), int(rec["len"])
    data = bytes(payload[off:off + ln])
    if off < 0 or len(data) != ln or zlib.crc32(data) != rec["crc"]:
        raise ArtifactError(f"artifact is corrupted: checksum mismatch in {source} at payload offset {off}")
    # max_length caps the output at the recorded size: a crafted stream cannot
    # balloon into gigabytes before the size check below rejects it.
    codec, limit = rec["codec"], int(rec["size"]) + 1
    if codec == "zlib":
        data = zlib.decompressobj().decompress(data, limit)
    elif codec == "lzma":
        data = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_LZMA_FILTERS).decompress(data, limit)
    elif codec != "raw":
        raise ArtifactError(f"artifact is corrupted: unknown codec {codec!r} in {source}")
    if len(data) != rec["size"]:
        raise ArtifactError(f"artifact is corrupted: stream size mismatch in {source} "
                            f"at payload offset {off}")
    sh = rec.get("shuffle", 0)
    if sh:
        data = np.frombuffer(data, np.uint8).reshape(sh, -1).T.tobytes()
    return data


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ArtifactError(f"artifact is corrupted: unknown dtype {name!r}")
    return DTYPES[name]


def _element_count(spec: dict) -> int:
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"malformed shape {shape!r}")
    return math.prod(shape)


def _array_bytes(spec: dict) -> int:
    """Bytes an array spec declares as loaded, after checking that its streams can hold it: a
    dense stream is exactly the array, a bitmask one bit per element (so neither can declare more
    elements than its bytes), and the value streams are whole elements."""
    n, itemsize = _element_count(spec), _dtype(spec["dtype"]).itemsize
    stored = _dtype(spec.get("as", spec["dtype"])).itemsize
    sizes = [int(r["size"]) for r in spec["streams"]]
    expected = {"zeros": 0, "dense": 1, "bitmask": 2, "relative": 2}.get(spec["layout"])
    if len(sizes) != expected:
        raise ValueError(f"layout {spec['layout']!r} with {len(sizes)} stream(s)")
    if spec["layout"] == "dense" and sizes[0] != n * stored:
        raise ValueError(f"a dense stream of {sizes[0]} bytes for {n} elements of {stored} byte(s)")
    if spec["layout"] == "bitmask" and (sizes[0] != (n + 7) // 8 or sizes[1] % stored or sizes[1] > n * stored):
        raise ValueError(f"bitmask streams of {sizes} bytes for {n} elements")
    if spec["layout"] == "relative" and sizes[1] != sizes[0] * stored:
        raise ValueError(f"relative-index streams of {sizes} bytes")
    return n * max(itemsize, stored)


def _entry_bytes(e: dict) -> int:
    kind = e["kind"]
    if kind == "tuple":
        return sum(_entry_bytes(x) for x in e["items"])
    if kind == "tensor":
        return _array_bytes(e)
    if kind == "qtensor":
        return sum(_array_bytes(e[p]) for p in ("int_repr", "scales", "zero_points") if p in e)
    return 0


def load_limit(file_size: int) -> int:
    """The most tensor bytes a file of ``file_size`` bytes may declare (see ``LOAD_RATIO``)."""
    configured = os.environ.get(LOAD_LIMIT_ENV)
    if configured:
        try:
            return int(configured)
        except ValueError:
            raise ArtifactError(f"{LOAD_LIMIT_ENV}: expected a number of bytes, got {configured!r}") from None
    return max(LOAD_FLOOR, LOAD_RATIO * file_size)


def _check_declared(header: dict, file_size: int, source: str) -> None:
    """Refuse, before any tensor is allocated, a file whose tensors add up past ``load_limit``."""
    declared, limit = sum(_entry_bytes(e) for e in header["tensors"]), load_limit(file_size)
    if declared > limit:
        raise ArtifactError(f"artifact refused: {source} declares {declared / 1e6:,.1f} MB of tensors in a "
                            f"{file_size:,}-byte file, past the load limit of {limit / 1e6:,.1f} MB ({LOAD_RATIO}x the "
                            f"file, at least {LOAD_FLOOR >> 20} MiB); if you trust the file, set {LOAD_LIMIT_ENV}")


def _decode_array(spec: dict, payload: memoryview, source: str) -> torch.Tensor:
    dtype, shape = _dtype(spec["dtype"]), [int(d) for d in spec["shape"]]
    stored = _dtype(spec.get("as", spec["dtype"]))
    npd = _BITS_NP[torch.empty(0, dtype=stored).element_size()]
    n = int(np.prod(shape, dtype=np.int64))
    streams = [_read_stream(r, payload, source) for r in spec["streams"]]
    layout = spec["layout"]
    if layout == "dense":
        a = np.frombuffer(bytearray(streams[0]), dtype=npd)  # bytearray: writable for torch
    else:
        a = np.zeros(n, dtype=npd)
        if layout == "bitmask":
            mask = np.unpackbits(np.frombuffer(streams[0], np.uint8), count=n).astype(bool)
            a[mask] = np.frombuffer(streams[1], dtype=npd)
        elif layout == "relative":
            pos = np.cumsum(np.frombuffer(streams[0], np.uint8).astype(np.int64) + 1) - 1
            a[pos] = np.frombuffer(streams[1], dtype=npd)
        elif layout != "zeros":
            raise ArtifactError(f"artifact is corrupted: unknown layout {layout!r} in {source}")
    t = torch.from_numpy(a.astype(npd.newbyteorder("="), copy=False)).view(stored)
    return t.to(dtype).reshape(shape)


def _decode_value(e: dict, payload: memoryview, source: str):
    kind = e["kind"]
    if kind in ("none", "bool", "int"):
        return None if kind == "none" else (bool(e["value"]) if kind == "bool" else int(e["value"]))
    if kind == "float":
        return struct.unpack("<d", bytes.fromhex(e["value"]))[0]
    if kind == "dtype":
        return _dtype(e["value"])
    if kind == "tuple":
        return tuple(_decode_value(x, payload, source) for x in e["items"])
    if kind == "tensor":
        return _decode_array(e, payload, source)
    if kind == "qtensor":
        if e["shape"] != e["int_repr"]["shape"]:
            raise ArtifactError(f"artifact is corrupted: a quantized tensor's shape {e['shape']!r} is not its "
                                f"integer values' {e['int_repr']['shape']!r} in {source}")
        ir = _decode_array(e["int_repr"], payload, source)
        with warnings.catch_warnings():  # torch deprecates quantized dtypes; torch.ao still runs on them
            warnings.simplefilter("ignore")
            return _make_quantized(e, ir, payload, source)
    raise ArtifactError(f"artifact is corrupted: unknown entry kind {kind!r} in {source}")


def _make_quantized(e: dict, ir, payload: memoryview, source: str):
    if e["qscheme"] == "per_tensor_affine":
        scale = struct.unpack("<d", bytes.fromhex(e["scale"]))[0]
        return torch._make_per_tensor_quantized_tensor(ir, scale, int(e["zero_point"]))
    return torch._make_per_channel_quantized_tensor(
        ir, _decode_array(e["scales"], payload, source),
        _decode_array(e["zero_points"], payload, source), int(e["axis"]))


def _decode(data: bytes, source: str):
    header, start, plen = _parse_header(data[:_PREFIX.size + _header_len(data)], len(data), source)
    payload = memoryview(data)[start:start + plen]
    try:
        _check_declared(header, len(data), source)
        tensors = OrderedDict()
        for e in header["tensors"]:
            if not isinstance(e["name"], str) or e["name"] in tensors:  # a second entry would silently replace the first
                raise ArtifactError(f"artifact is corrupted: {source} has an entry named {e['name']!r} twice or "
                                    "not as a string")
            if e["kind"] == "alias":
                # Only a tensor decoded before it: a forward alias or one of a non-tensor is a broken file.
                target = e["of"]
                if header["format_version"] < ALIAS_VERSION or not isinstance(target, str) or target not in tensors \
                        or not isinstance(tensors[target], torch.Tensor):
                    raise ArtifactError(f"artifact is corrupted: {source} has an alias {e['name']!r} of {target!r}, "
                                        "which is no tensor stored before it")
                tensors[e["name"]] = tensors[target]
            else:
                tensors[e["name"]] = _decode_value(e, payload, source)
        if "state_dict_metadata" in header:
            tensors._metadata = OrderedDict(header["state_dict_metadata"])
    except ArtifactError:
        raise
    except Exception as exc:  # malformed-but-checksummed entries (or hostile files)
        raise ArtifactError(f"artifact is corrupted: cannot decode {source}: {_line(exc)}") from None
    return header["meta"], tensors


def _header_len(head: bytes) -> int:
    return _PREFIX.unpack_from(head)[2] if len(head) >= _PREFIX.size else 0


def decode_tensors(data: bytes) -> tuple[dict, dict]:
    """Inverse of encode_tensors: returns (meta, tensors).

    tensors is an OrderedDict; it gets a `_metadata` attribute when the encoded
    mapping was a real state_dict, so load_state_dict sees the same module versions.
    """
    return _decode(bytes(data), "<bytes>")


# ``write_artifact`` writes ``.NAME.<8 hex digits>.tmp`` next to ``NAME`` and renames it: hidden,
# in the same folder (so the rename is atomic), with a random part (two writers never share one).
_TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.tmp$")


def _temporary_path(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")


def temporary_target(name: str) -> str | None:
    """The file name that ``name``, a temporary file of ``write_artifact``, was being written
    for; None when ``name`` is not such a file.  One left behind is a write a kill cut off."""
    match = _TEMPORARY_NAME.match(name)
    return match["target"] if match else None


def write_artifact(path, tensors: dict, meta: dict) -> int:
    """Atomically write the artifact; returns its size in bytes."""
    path = os.fspath(path)
    data = encode_tensors(tensors, meta)
    tmp = _temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: honour umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def _open_regular(path: str):
    """``path`` opened for reading, refusing a folder, a named pipe or a device: opened without
    blocking (a FIFO with no writer would hang ``open``), then checked on the open file itself."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ArtifactError(f"artifact: {path} is {what}; give an artifact file (.slim)")
    return os.fdopen(fd, "rb")


def read_artifact(path) -> tuple[dict, dict]:
    path = os.fspath(path)
    with _open_regular(path) as f:
        return _decode(f.read(), path)


def _rows(name: str, e: dict, out: list) -> None:
    kind = e["kind"]
    if kind == "tuple":
        for i, x in enumerate(e["items"]):
            _rows(f"{name}[{i}]", x, out)
        return
    parts = {"data": e} if kind == "tensor" else {
        p: e[p] for p in ("int_repr", "scales", "zero_points") if p in e}
    arrays = [{"part": p, "layout": a["layout"], "stored_dtype": a.get("as", a["dtype"]),
               "raw_bytes": sum(s["size"] for s in a["streams"]),
               "stored_bytes": sum(s["len"] for s in a["streams"]),
               "codecs": [s["codec"] + ("+shuffle" if s.get("shuffle") else "") for s in a["streams"]]}
              for p, a in parts.items()]
    encoding = kind if not arrays else (e.get("qscheme", "") + " " + arrays[0]["layout"]).strip()
    if kind == "alias":  # stored once under another key; costs only its header entry
        encoding = f"alias of {e.get('of')}"
    dtype = e.get("value") if kind == "dtype" else e.get("dtype")
    out.append({"name": name, "kind": kind, "dtype": dtype, "shape": e.get("shape"), "encoding": encoding,
                "stored_bytes": sum(a["stored_bytes"] for a in arrays), "arrays": arrays})


def describe_artifact(path) -> dict:
    """Header-only summary (the payload is not read) for `inspect`/debugging."""
    path = os.fspath(path)
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_PREFIX.size)
        head += f.read(_header_len(head))
    header, start, plen = _parse_header(head, size, path)
    rows: list = []
    for e in header["tensors"]:
        _rows(e["name"], e, rows)
    return {"path": path, "format_version": header["format_version"], "file_bytes": size,
            "header_bytes": start, "payload_bytes": plen, "meta": header["meta"], "tensors": rows}
