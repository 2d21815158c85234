"""Crafted artifact files, as an attacker would write them: valid magic and checksums, hostile
content.  Used by tests/test_bad_input.py (one line, exit 2) and tests/core/test_artifact_limits.py
(refused within a time and memory bound)."""

from __future__ import annotations

import json
import pickle
import struct
import zlib
from pathlib import Path

import sf_testing_models

# A task source naming a built-in task (so trust lets it through) with arguments that are wrong.
BUILTIN_ARCHITECTURE = {"target": "slimforge.core.embedded:lenet5", "kwargs": {}}
BAD_BUILTIN_SOURCES = {
    "bogus-kwargs.slim": {"builtin": "mnist-lenet5", "kwargs": {"bogus": 1}},
    "string-kwargs.slim": {"builtin": "mnist-lenet5", "kwargs": "cache=/tmp"},
    "torchvision-no-kwargs.slim": {"builtin": "torchvision"},
}


def tiny_artifact(path: Path) -> bytes:
    from slimforge.core.compressed import save_model
    from slimforge.core.plan import Plan

    save_model(sf_testing_models.trained_tiny_cnn(), path, task=sf_testing_models.tiny_task(), plan=Plan())
    return path.read_bytes()


def rewrite_header(data: bytes, change) -> bytes:
    """The artifact ``data`` with its JSON header edited by ``change(header)``, checksums made valid
    again: what a deliberate attacker (not a flipped bit) would produce."""
    from slimforge.core.artifact import _PREFIX

    magic, version, hlen, _, plen = _PREFIX.unpack_from(data)
    header = json.loads(zlib.decompress(data[_PREFIX.size:_PREFIX.size + hlen]))
    change(header)
    return with_header_bytes(data, zlib.compress(json.dumps(header).encode(), 9))


def with_header_bytes(data: bytes, hbytes: bytes) -> bytes:
    """``data`` with its compressed header replaced by ``hbytes`` (lengths and CRC made valid)."""
    from slimforge.core.artifact import _PREFIX

    magic, version, hlen, _, plen = _PREFIX.unpack_from(data)
    return _PREFIX.pack(magic, version, len(hbytes), zlib.crc32(hbytes), plen) + hbytes + data[_PREFIX.size + hlen:]


def zlib_bomb(inflated_mib: int) -> bytes:
    """A zlib stream of ``inflated_mib`` MiB of zero bytes, about 1/1000 of that, built in
    milliseconds: one raw-deflate block of 1 MiB of zeros ending in a full flush (which resets the
    window, so the block stands alone) repeated, a final empty block, and the Adler-32 of zeros."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    length = inflated_mib << 20
    adler = ((length % 65521) << 16) | 1  # over zeros, A stays 1 and B adds it once per byte
    return b"\x78\xda" + block * inflated_mib + final + struct.pack(">I", adler)


def bomb_header(data: bytes, inflated_mib: int = 1024) -> bytes:
    """The artifact with a header that inflates to ``inflated_mib`` MiB (1 MB on disk for 1 GiB)."""
    return with_header_bytes(data, zlib_bomb(inflated_mib))


def huge_declared_tensor(data: bytes, elements: int = 10**9) -> bytes:
    """The artifact whose first tensor declares ``elements`` zeros: stored as nothing, 4 GB loaded."""
    def change(header):
        entry = header["tensors"][0]
        entry.update(dtype="float32", shape=[elements], layout="zeros", streams=[])
        entry.pop("as", None)
    return rewrite_header(data, change)


def huge_low_rank(data: bytes, rank: int = 10**6) -> bytes:
    """The artifact with a low_rank step whose recorded structure asks for rank ``rank`` of ``fc1``
    (a 32x288 layer): restoring it would build factors of 320 M floats before any tensor loads."""
    from slimforge.plugins.factorization.low_rank import LowRank, LowRankConfig

    def change(header):
        header["meta"]["plan"]["steps"] = [{"technique": "low_rank",
                                            "config": LowRank().config_to_dict(LowRankConfig(rank_fraction=0.5))}]
        header["meta"]["structure"] = [{"ranks": {"fc1": rank}}]
    return rewrite_header(data, change)


class Pwn:
    """Unpickling this creates the file ``pwned``: proof that a pickle was loaded."""

    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


def pickle_behind_magic() -> bytes:
    from slimforge.core.artifact import MAGIC

    return MAGIC + pickle.dumps(Pwn(), protocol=4)


def bad_builtin_source(data: bytes, source: dict) -> bytes:
    def change(header):
        header["meta"]["architecture"] = BUILTIN_ARCHITECTURE
        header["meta"]["task"] = source
    return rewrite_header(data, change)
