"""Building and driving `moe_check` (targets/executorch/kernels/moe_check.cpp): the MoE kernel
core and the expert cache without ExecuTorch, natively or cross-compiled for arm64 under qemu."""

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
from ossedge.targets.executorch.pack import Layout, pack_layer

KERNELS = Path(ops.__file__).parent / "kernels"
SOURCES = [KERNELS / n for n in ("moe_core.cpp", "expert_cache.cpp", "expert_cache_global.cpp",
                                  "expert_file.cpp", "moe_check.cpp")]
LIMIT, ALPHA = 7.0, 1.702
E, H, I = 4, 64, 96
FLAGS = ["-O2", "-std=c++17", "-Wall", "-Wno-maybe-uninitialized", "-pthread"]
FORMATS = {"mxfp4": "mxfp4", "int4": "int4-g32"}


def build(compiler: str, out: Path, *extra: str) -> Path:
    subprocess.run([compiler, *FLAGS, *extra, *map(str, SOURCES), "-o", str(out)], check=True)
    return out


def arm64_or_skip(tmp: Path) -> list[str]:
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not compiler or not qemu:
        pytest.skip(
            "NOT TESTED: the arm64 (NEON) kernel path needs aarch64-linux-gnu-g++ and qemu-aarch64 "
            "(apt-get install g++-aarch64-linux-gnu qemu-user; `make test` does it where apt works)"
        )
    return [qemu, str(build(compiler, tmp / "moe_check", "-static"))]


def case(kind: str, ids: list[list[int]], seed: int) -> tuple[bytes, torch.Tensor, bytes]:
    """(driver input, reference output, the layer packed as one [E, stride] tensor at offset 0)
    for one random layer."""
    fmt = FORMATS[kind]
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
    (c1, s1), (c2, s2) = gu.values(), dn.values()
    parts = {"gate_up_codes": c1, "gate_up_scales": s1, "gate_up_bias": b1,
             "down_codes": c2, "down_scales": s2, "down_bias": b2}  # fmt: skip
    packed = pack_layer(Layout(fmt, H, I), parts, layer=0, layers=1).numpy().tobytes()
    return header + body, want, packed


def run(cmd: list[str], data: bytes, tmp_path: Path, isa: str = "", *cache: str,
        check: bool = True, mapped: Path | None = None,
        ) -> tuple[str, torch.Tensor, subprocess.CompletedProcess]:  # fmt: skip
    """(ISA used, output, the process) of one driver run; `cache` = (PACKED, BUDGET[, CALLS]);
    `mapped`: another file whose headers the driver maps (the cache still reads PACKED)."""
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    dst.unlink(missing_ok=True)
    env = {**os.environ, "OSSEDGE_KERNEL_ISA": isa}
    if mapped is not None:
        env["MOE_CHECK_MAPPED"] = str(mapped)
    p = subprocess.run([*cmd, str(src), str(dst), *cache], capture_output=True, text=True, env=env)
    if check and p.returncode:
        raise AssertionError(f"moe_check failed ({p.returncode}): {p.stderr}")
    if not dst.is_file():
        return "", torch.empty(0), p
    used, _, raw = dst.read_bytes().partition(b"\n")
    return used.decode(), torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()), p
