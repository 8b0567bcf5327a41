"""The kernel core (`targets/executorch/kernels/moe_core.cpp`) without ExecuTorch, through the
`moe_check` driver: built natively, and cross-compiled for arm64 (the NEON paths, with and without
the dot-product extension) and run under qemu-user. A missing cross toolchain or qemu is a loud skip naming the packages to install."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from moecheck import FLAGS, KERNELS, arm64_or_skip, build, case, run


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return build("g++", tmp_path_factory.mktemp("native") / "moe_check")


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> list[str]:
    return arm64_or_skip(tmp_path_factory.mktemp("arm64"))


CASES = [
    ("mxfp4", [[2, 0]]),
    ("mxfp4", [[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 1]]),
    ("int4", [[3, 1]]),
    ("int4", [[1, 3]] * 9),
]
IDS = ["mxfp4-T1", "mxfp4-all-experts", "int4-T1", "int4-T9"]


@pytest.mark.parametrize("kind, ids", CASES, ids=IDS)
def test_native_core(native: Path, kind: str, ids, tmp_path: Path) -> None:
    data, want, _ = case(kind, ids, seed=len(ids))
    _, got, _ = run([str(native)], data, tmp_path)
    assert torch.allclose(got.view_as(want), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ["neondot", "neon"])
@pytest.mark.parametrize("kind, ids", CASES, ids=IDS)
def test_arm64_neon_core_under_qemu(arm64: list[str], isa: str, kind: str, ids, tmp_path) -> None:
    data, want, _ = case(kind, ids, seed=len(ids))
    # neondot is the default on qemu's CPU, which has the dot-product extension; neon is forced
    used, got, _ = run(arm64, data, tmp_path, "" if isa == "neondot" else isa)
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
