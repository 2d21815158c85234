"""Fuzzing the artifact reader: thousands of seeded mutations of real artifacts, each of which must
end in a one-line ``ArtifactError`` or a load whose tensors have the shapes the header declares;
never another exception, never past a time or memory bound.

Mutations are of two kinds: blind ones (flipped, dropped or appended bytes, a changed version byte),
which the prefix and CRC checks must catch, and an attacker's, which edit the JSON header or the
payload and make every checksum valid again, so the decoder itself meets the hostile values.  The
loop runs in a fresh subprocess so its peak resident size (``resource.getrusage``) is its own.
``SLIMFORGE_FUZZ_FILES`` sets the number of mutated files (default 3000, about 10 s here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import sf_hostile_artifacts as hostile
import sf_testing_models

FILES = int(os.environ.get("SLIMFORGE_FUZZ_FILES", "3000"))

LOOP = r"""
import copy, json, random, resource, struct, sys, time, zlib
from slimforge.core import artifact
from slimforge.core.errors import ArtifactError

HOSTILE = [-1, 0, 1, 7, 255, 2**31, 2**63, 10**12, -10**9, 1.5, 1e308, "", "x", "os.system", None, True, False, [],
           {}, [10**6, 10**6], [0], [-3], "zeros", "dense", "bitmask", "relative", "alias", "tuple", "qtensor", "tensor",
           "lzma", "zlib", "raw", "float64", "quint8", "bool", "per_channel_affine", "conv.weight"]


def leaves(node, path=()):
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from leaves(child, path + (key,))


def edit_header(header, rng):
    path = rng.choice(list(leaves(header["tensors"], ("tensors",))))
    if not path[1:]:
        return
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key, roll = path[-1], rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif roll < 0.25 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif roll < 0.4 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * rng.choice([0, 2, 1000, 10**9]) + rng.choice([-1, 0, 1])
    else:
        parent[key] = copy.deepcopy(rng.choice(HOSTILE))


def mutate(data, rng):
    size = artifact._PREFIX.size
    _, version, hlen, _, plen = artifact._PREFIX.unpack_from(data)
    header = json.loads(zlib.decompress(data[size:size + hlen]))
    payload = bytearray(data[size + hlen:])
    kind = rng.choice(["flip", "truncate", "append", "version", "header", "header", "header", "payload"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "append":
        return kind, data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "version":
        return kind, data[:8] + bytes([rng.choice([0, 3, 0x80, 255])]) + data[9:]
    if kind == "payload" and payload:  # corrupt a stream's bytes, then make its CRC match again
        streams = [s for e in header["tensors"] for s in streams_of(e)]
        if streams:
            stream = rng.choice(streams)
            if stream["len"]:
                at = stream["off"] + rng.randrange(stream["len"])
                payload[at] ^= 1 << rng.randrange(8)
                stream["crc"] = zlib.crc32(bytes(payload[stream["off"]:stream["off"] + stream["len"]]))
    else:
        for _ in range(rng.randint(1, 3)):
            edit_header(header, rng)
    hbytes = zlib.compress(json.dumps(header).encode(), 9)
    prefix = artifact._PREFIX.pack(artifact.MAGIC, version, len(hbytes), zlib.crc32(hbytes), len(payload))
    return kind, prefix + hbytes + bytes(payload)


def streams_of(entry):
    if not isinstance(entry, dict):
        return []
    found = list(entry.get("streams", [])) if isinstance(entry.get("streams"), list) else []
    for part in ("int_repr", "scales", "zero_points"):
        found += streams_of(entry.get(part))
    for item in entry.get("items", []) if isinstance(entry.get("items"), list) else []:
        found += streams_of(item)
    return [s for s in found if isinstance(s, dict) and isinstance(s.get("off"), int) and isinstance(s.get("len"), int)]


def wrong_shape(data, tensors):  # the first entry loaded in another shape than its header declares
    header = artifact._parse_header(data[:artifact._PREFIX.size + artifact._header_len(data)], len(data), "x")[0]
    for e in header["tensors"]:
        value = tensors[e["name"]]
        if e["kind"] in ("tensor", "qtensor") and list(value.shape) != list(e["shape"]):
            return f"{e['kind']} {e['name']!r} declared {e['shape']}, loaded {list(value.shape)}"
    return None


corpus = [open(path, "rb").read() for path in sys.argv[2:]]
rng, outcomes, slowest = random.Random(0), {}, (0.0, "")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
for i in range(int(sys.argv[1])):
    kind, data = mutate(rng.choice(corpus), rng)
    t0 = time.perf_counter()
    try:
        _, tensors = artifact.decode_tensors(data)
        wrong = wrong_shape(data, tensors)
        outcome = "loaded" if wrong is None else f"WRONG SHAPE: {wrong} (file {i}, {kind})"
    except ArtifactError as exc:
        message = str(exc)
        outcome = "ArtifactError: " + " ".join(message.split()[:3]) if "\n" not in message else "MULTI-LINE"
    except Exception as exc:
        outcome = f"CRASH {type(exc).__name__}: {exc} (file {i}, {kind})"
    seconds = time.perf_counter() - t0
    slowest = max(slowest, (seconds, f"file {i} ({kind})"))
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
print(json.dumps({"files": int(sys.argv[1]), "outcomes": outcomes, "slowest": slowest,
                  "total_s": time.perf_counter() - started, "before_kb": before,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def corpus(root) -> list:
    """A real model artifact, and one holding every entry kind and layout the codec writes."""
    from slimforge.core.artifact import write_artifact

    hostile.tiny_artifact(root / "model.slim")
    generator = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 64, generator=generator) * (torch.rand(64, 64, generator=generator) < 0.05)
    shared = torch.randn(16, 8, generator=generator)
    weight = torch.randn(8, 4, generator=generator)
    tensors = {
        "dense": torch.randn(32, 16, generator=generator), "sparse": sparse,  # relative-index layout
        "half_sparse": torch.randn(4096, generator=generator) * (torch.arange(4096) % 3 == 0),  # bitmask
        "zeros": torch.zeros(5, 5), "empty": torch.zeros(0, 3), "ints": torch.arange(100), "mask": torch.rand(50) > 0.5,
        "tied": shared, "tied_again": shared, "count": 3, "ratio": 0.25, "nothing": None, "dtype": torch.float16,
        "pair": (torch.ones(2), 7),
        "q": torch.quantize_per_tensor(torch.randn(10, generator=generator), 0.1, 3, torch.quint8),
        "qc": torch.quantize_per_channel(weight, torch.rand(8) + 0.01, torch.zeros(8, dtype=torch.long), 0, torch.qint8),
    }
    write_artifact(root / "kinds.slim", tensors, {"kind": "fuzz-corpus"})
    return [root / "model.slim", root / "kinds.slim"]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch.ao still runs on them
def test_mutated_artifacts_end_in_one_line_errors_or_correct_loads(tmp_path, subprocess_env):
    paths = corpus(tmp_path)
    # The load limit is lowered so a mutation that declares large all-zero tensors, which the
    # default limit lets a small file load (up to 256 MiB), is refused instead of costing memory.
    env = subprocess_env | {"OMP_NUM_THREADS": "1", "SLIMFORGE_MAX_LOAD_BYTES": str(16 << 20)}
    proc = subprocess.run([sys.executable, "-c", LOOP, str(FILES), *map(str, paths)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=sf_testing_models.TESTS_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    outcomes = result["outcomes"]
    print(f"\n{result['files']} mutated files in {result['total_s']:.1f} s (slowest {result['slowest'][0] * 1000:.0f} ms, "
          f"{result['slowest'][1]}), peak RSS +{(result['peak_kb'] - result['before_kb']) / 1024:.0f} MiB:\n  "
          + "\n  ".join(f"{count:5d}  {outcome}" for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1])))
    bad = {o: n for o, n in outcomes.items() if o.startswith(("CRASH", "WRONG", "MULTI"))}
    assert not bad, bad
    assert sum(outcomes.values()) == FILES
    assert outcomes.get("loaded", 0) > 0 and sum(n for o, n in outcomes.items() if o.startswith("ArtifactError")) > 0
    assert result["slowest"][0] < 1.0
    assert result["peak_kb"] - result["before_kb"] < 256 * 1024
