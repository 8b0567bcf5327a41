"""The kernel core (`targets/executorch/kernels/moe_core.cpp`) without ExecuTorch, through the
`moe_check` driver: built natively, and cross-compiled for arm64 (the NEON paths, with and without
the dot-product extension) and run under qemu-user. A missing cross toolchain or qemu is a loud skip naming the packages to install."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ossedge.quantize.qtensor import encode
from ossedge.targets.executorch import ops

KERNELS = Path(ops.__file__).parent / "kernels"
SOURCES = [KERNELS / "moe_core.cpp", KERNELS / "moe_check.cpp"]
LIMIT, ALPHA = 7.0, 1.702
E, H, I = 4, 64, 96
FLAGS = ["-O2", "-std=c++17", "-Wall", "-Wno-maybe-uninitialized"]


def _build(compiler: str, out: Path, *extra: str) -> Path:
    subprocess.run([compiler, *FLAGS, *extra, *map(str, SOURCES), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return _build("g++", tmp_path_factory.mktemp("native") / "moe_check")


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> list[str]:
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not compiler or not qemu:
        pytest.skip(
            "NOT TESTED: the arm64 (NEON) kernel path needs aarch64-linux-gnu-g++ and qemu-aarch64 "
            "(apt-get install g++-aarch64-linux-gnu qemu-user; `make test` does it where apt works)"
        )
    exe = _build(compiler, tmp_path_factory.mktemp("arm64") / "moe_check", "-static")
    return [qemu, str(exe)]


def _case(kind: str, ids: list[list[int]], seed: int) -> tuple[bytes, torch.Tensor]:
    """(driver input, reference output) for one random layer."""
    fmt = {"mxfp4": "mxfp4", "int4": "int4-g32"}[kind]
    g = torch.Generator().manual_seed(seed)
    gu = encode(fmt, torch.randn(E, 2 * I, H, generator=g) * 0.2)
    dn = encode(fmt, torch.randn(E, H, I, generator=g) * 0.2)
    b1, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    ids_t = torch.tensor(ids)
    x = torch.randn(ids_t.shape[0], H, generator=g) * 2
    w = torch.softmax(torch.randn(*ids_t.shape, generator=g), -1)
    op = getattr(torch.ops.ossedge, f"moe_{kind}")
    want = op(x, ids_t, w, *gu.values(), b1, *dn.values(), b2, LIMIT, ALPHA)
    header = struct.pack("<6q2f", 0 if kind == "mxfp4" else 1, *ids_t.shape, E, H, I, LIMIT, ALPHA)
    arrays = [x, ids_t, w, *gu.values(), b1, *dn.values(), b2]
    body = b"".join(a.contiguous().view(torch.uint8).numpy().tobytes() for a in arrays)
    return header + body, want


def _run(cmd: list[str], data: bytes, tmp_path: Path, isa: str = "") -> tuple[str, torch.Tensor]:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    env = {**os.environ, "OSSEDGE_KERNEL_ISA": isa}
    subprocess.run([*cmd, str(src), str(dst)], check=True, env=env)
    isa, _, raw = dst.read_bytes().partition(b"\n")
    return isa.decode(), torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())


CASES = [
    ("mxfp4", [[2, 0]]),
    ("mxfp4", [[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 1]]),
    ("int4", [[3, 1]]),
    ("int4", [[1, 3]] * 9),
]
IDS = ["mxfp4-T1", "mxfp4-all-experts", "int4-T1", "int4-T9"]


@pytest.mark.parametrize("kind, ids", CASES, ids=IDS)
def test_native_core(native: Path, kind: str, ids, tmp_path: Path) -> None:
    data, want = _case(kind, ids, seed=len(ids))
    _, got = _run([str(native)], data, tmp_path)
    assert torch.allclose(got.view_as(want), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ["neondot", "neon"])
@pytest.mark.parametrize("kind, ids", CASES, ids=IDS)
def test_arm64_neon_core_under_qemu(arm64: list[str], isa: str, kind: str, ids, tmp_path) -> None:
    data, want = _case(kind, ids, seed=len(ids))
    # neondot is the default on qemu's CPU, which has the dot-product extension; neon is forced
    used, got = _run(arm64, data, tmp_path, "" if isa == "neondot" else isa)
    assert used == isa
    assert torch.allclose(got.view_as(want), want, atol=1e-4, rtol=1e-4)


def test_decode_bench_builds_and_refuses_bad_arguments(tmp_path: Path) -> None:
    """moe_decode_bench (a full-size benchmark, not run here) compiles, and refuses bad input."""
    exe = tmp_path / "moe_decode_bench"
    subprocess.run(["g++", *FLAGS, "-I", str(KERNELS), str(KERNELS / "moe_decode_bench.cpp"),
                    str(KERNELS / "moe_core.cpp"), "-o", str(exe), "-lpthread"], check=True)
    p = subprocess.run([str(exe), "3"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage: moe_decode_bench" in p.stderr
    p = subprocess.run([str(exe), "1", "8", "no-such-isa"], capture_output=True, text=True)
    assert p.returncode == 1 and "no-such-isa path is not available" in p.stderr
