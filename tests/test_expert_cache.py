"""The expert cache (targets/executorch/kernels/expert_cache.cpp) under the MoE kernel core,
through `moe_check`: outputs through the cache equal the in-place kernel's bit for bit on every
SIMD path (arm64 under qemu), for one token and prefill, budgets from one expert to all; eviction
under a tiny budget; concurrent misses of one expert read it once; damaged or truncated extents
are refused with a clear message."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from moecheck import E, H, I, arm64_or_skip, build, case, run

from ossedge.targets.executorch.pack import HEADER_BYTES, Layout

STRIDE = Layout("mxfp4", H, I).stride
CASES = [("mxfp4", [[2, 0]]), ("mxfp4", [[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 1]]),
         ("int4", [[3, 1]]), ("int4", [[1, 3], [0, 2], [3, 2]] * 3)]  # fmt: skip
IDS = ["mxfp4-T1", "mxfp4-prefill", "int4-T1", "int4-prefill"]


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> list[str]:
    return [str(build("g++", tmp_path_factory.mktemp("native") / "moe_check"))]


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> list[str]:
    return arm64_or_skip(tmp_path_factory.mktemp("arm64"))


def _x86_isas() -> list[str]:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    isas = ["scalar"]
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        isas.append("avx512")
        if "avx512_vnni" in flags:
            isas.append("avx512vnni")
    return isas


def _packed_file(tmp_path: Path, packed: bytes) -> Path:
    f = tmp_path / "layer.bin"
    f.write_bytes(packed)
    return f


def _stats(p: subprocess.CompletedProcess) -> dict[str, int]:
    hits, misses, read, slots = map(int, p.stdout.split())
    return {"hits": hits, "misses": misses, "bytes_read": read, "slots": slots}


@pytest.mark.parametrize("isa", _x86_isas())
@pytest.mark.parametrize("kind, ids", CASES, ids=IDS)
@pytest.mark.parametrize("slots", [1, 2, E], ids=["1-slot", "2-slots", "all"])
def test_cache_equals_in_place_bitwise(native, isa, kind, ids, slots, tmp_path: Path) -> None:
    data, want, packed = case(kind, ids, seed=len(ids))
    stride = Layout(f"{kind}" if kind == "mxfp4" else "int4-g32", H, I).stride
    _, plain, _ = run(native, data, tmp_path, isa)
    used, cached, p = run(native, data, tmp_path, isa, str(_packed_file(tmp_path, packed)),
                          str(slots * stride))  # fmt: skip
    assert used == isa
    assert torch.equal(cached, plain)
    assert torch.allclose(cached.view_as(want), want, atol=1e-4, rtol=1e-4)
    s = _stats(p)
    active = len({e for row in ids for e in row})
    assert s["slots"] == slots and s["misses"] == active  # one read per active expert, once


@pytest.mark.parametrize("isa", ["neondot", "neon"])
@pytest.mark.parametrize("kind, ids", CASES, ids=IDS)
def test_cache_equals_in_place_on_arm64(arm64, isa, kind, ids, tmp_path: Path) -> None:
    data, _, packed = case(kind, ids, seed=len(ids))
    forced = "" if isa == "neondot" else isa
    _, plain, _ = run(arm64, data, tmp_path, forced)
    used, cached, _ = run(arm64, data, tmp_path, forced, str(_packed_file(tmp_path, packed)),
                          str(STRIDE if kind == "mxfp4" else 2 * STRIDE))  # fmt: skip
    assert used == isa and torch.equal(cached, plain)


def test_tiny_budget_evicts_and_an_ample_one_reads_once(native, tmp_path: Path) -> None:
    data, _, packed = case("mxfp4", [[0, 1], [2, 3]], seed=5)
    f = str(_packed_file(tmp_path, packed))
    _, out1, p1 = run(native, data, tmp_path, "", f, str(2 * STRIDE), "3")
    _, out2, p2 = run(native, data, tmp_path, "", f, str(E * STRIDE), "3")
    tiny, ample = _stats(p1), _stats(p2)
    assert torch.equal(out1, out2)
    assert ample["misses"] == 4 and ample["hits"] == 8  # the second and third calls hit
    # two slots, four experts a call: every expert is evicted before it is wanted again (one of
    # the two slots is pinned by the first read, so that expert hits)
    assert tiny["misses"] > 4 and tiny["bytes_read"] == tiny["misses"] * STRIDE


def test_concurrent_misses_of_one_expert_read_it_once(native, tmp_path: Path) -> None:
    data, _, packed = case("mxfp4", [[0, 1]], seed=6)
    _, _, p = run(native, data, tmp_path, "", str(_packed_file(tmp_path, packed)), "concurrent")
    s = _stats(p)
    assert s["misses"] == 1 and s["hits"] == 7 and s["bytes_read"] == STRIDE


@pytest.mark.parametrize("damage", ["payload", "header", "truncated"])
def test_damaged_extents_are_refused_at_read(native, damage: str, tmp_path: Path) -> None:
    data, _, packed = case("mxfp4", [[1, 2]], seed=7)
    mapped = tmp_path / "mapped.bin"  # what the program maps: intact
    mapped.write_bytes(packed)
    bad = bytearray(packed)
    if damage == "payload":
        bad[STRIDE + HEADER_BYTES + 1000] ^= 0x10  # expert 1's codes
    elif damage == "header":
        bad[STRIDE + 16] ^= 1  # expert 1's layer field
    else:
        bad = bad[: STRIDE + STRIDE // 2]  # ends inside expert 1
    read = tmp_path / "read.bin"
    read.write_bytes(bytes(bad))
    _, _, p = run(native, data, tmp_path, "", str(read), str(E * STRIDE), check=False,
                  mapped=mapped)  # fmt: skip
    assert p.returncode == 1
    msg = p.stderr.strip()
    want = {"payload": "fails its checksum", "header": "header that does not match",
            "truncated": "truncated"}[damage]  # fmt: skip
    assert want in msg and str(read) in msg, msg
    assert len(msg.splitlines()) == 1
    if damage != "truncated":
        assert "expert 1 of layer 0" in msg


def test_budget_below_one_expert_is_refused(native, tmp_path: Path) -> None:
    data, _, packed = case("mxfp4", [[1, 2]], seed=8)
    _, _, p = run(native, data, tmp_path, "", str(_packed_file(tmp_path, packed)),
                  str(STRIDE - 1), check=False)  # fmt: skip
    assert p.returncode == 1 and "holds no expert" in p.stderr
