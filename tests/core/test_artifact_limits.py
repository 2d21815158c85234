"""Hostile artifacts cannot exhaust memory: a zlib-bomb header (1 MB inflating to 1 GiB), a 33 KB
file declaring a 10^9-element tensor (4 GB), and a header asking low_rank for rank 10^6 (1.3 GB of
factors) are each refused in under a second, with a peak resident size under twice that of loading
a normal artifact.  Peak RSS is measured with ``resource.getrusage`` in fresh subprocesses, so the
test process's own memory does not blur it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sf_hostile_artifacts as hostile
import sf_testing_models

# Loads each file named on the command line (all expected to fail but "good.slim"), timing each
# load, and prints the process's peak resident size at the end.
PROBE = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import sf_testing_models
from slimforge.core.compressed import load_model
from slimforge.core.errors import ArtifactError
from slimforge.core.manager import Plugins

registry, task = Plugins(load_entry_points=False).registry, sf_testing_models.tiny_task()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = {}
for path in sys.argv[2:]:
    started = time.perf_counter()
    try:
        load_model(path, registry, task=task)
        outcome = "loaded"
    except ArtifactError as exc:
        outcome = str(exc)
    outcomes[path] = {"outcome": outcome, "seconds": time.perf_counter() - started}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak, "outcomes": outcomes}))
"""


def probe(paths: list[Path], env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(sf_testing_models.TESTS_DIR), *map(str, paths)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = hostile.tiny_artifact(root / "good.slim")
    written = {"good": root / "good.slim"}
    for name, data in {"bomb": hostile.bomb_header(good, inflated_mib=1024), "huge": hostile.huge_declared_tensor(good),
                       "rank": hostile.huge_low_rank(good)}.items():
        written[name] = root / f"{name}.slim"
        written[name].write_bytes(data)
    return written


def test_memory_bombs_are_refused_fast_within_twice_a_normal_load(files, subprocess_env):
    env = subprocess_env | {"OMP_NUM_THREADS": "1"}
    normal = probe([files["good"]], env)
    assert normal["outcomes"][str(files["good"])]["outcome"] == "loaded"
    bombs = probe([files["bomb"], files["huge"], files["rank"]], env)
    expected = {"bomb": "inflates past 16 MiB", "huge": "past the load limit", "rank": "for rank 1000000"}
    for name, phrase in expected.items():
        result = bombs["outcomes"][str(files[name])]
        assert phrase in result["outcome"], result
        assert result["seconds"] < 1.0, (name, result)
    print(f"\nnormal load: peak {normal['peak_kb'] / 1024:.0f} MiB; three bombs: peak {bombs['peak_kb'] / 1024:.0f} MiB "
          f"(after imports {bombs['before_kb'] / 1024:.0f} MiB); refused in "
          + ", ".join(f"{n} {bombs['outcomes'][str(files[n])]['seconds'] * 1000:.0f} ms" for n in expected)
          + f"; files {', '.join(f'{n} {os.path.getsize(files[n]):,} B' for n in expected)}")
    assert bombs["peak_kb"] < 2 * normal["peak_kb"]
    # Tighter than the bound: refusing costs next to nothing beyond the imports.
    assert bombs["peak_kb"] - bombs["before_kb"] < 64 * 1024


def test_the_load_limit_follows_the_file_and_can_be_raised(monkeypatch, tmp_path):
    from slimforge.core import artifact

    good = hostile.tiny_artifact(tmp_path / "good.slim")
    # 48 M float32 zeros (201 MB) from a 33 KB file: under the 256 MiB floor it loads...
    meta, tensors = artifact.decode_tensors(hostile.huge_declared_tensor(good, elements=48 << 20))
    assert tensors["conv.weight"].shape == (48 << 20,)
    del tensors
    # ...and an explicit lower limit refuses it, as any file past its limit is.
    monkeypatch.setenv(artifact.LOAD_LIMIT_ENV, str(100 << 20))
    with pytest.raises(artifact.ArtifactError, match="past the load limit"):
        artifact.decode_tensors(hostile.huge_declared_tensor(good, elements=48 << 20))
    monkeypatch.setenv(artifact.LOAD_LIMIT_ENV, "lots")
    with pytest.raises(artifact.ArtifactError, match=f"{artifact.LOAD_LIMIT_ENV}: expected a number of bytes"):
        artifact.decode_tensors(good)


def test_streams_must_hold_what_their_layout_declares(tmp_path):
    from slimforge.core import artifact

    good = hostile.tiny_artifact(tmp_path / "good.slim")

    def dense_shape(header):
        entry = next(e for e in header["tensors"] if e["kind"] == "tensor" and e["layout"] == "dense")
        entry["shape"] = [entry["shape"][0] * 1000, *entry["shape"][1:]]

    with pytest.raises(artifact.ArtifactError, match="cannot decode .*a dense stream of"):
        artifact.decode_tensors(hostile.rewrite_header(good, dense_shape))
