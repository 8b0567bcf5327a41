"""The native ExecuTorch kernels of `ossedge::moe_*` against the reference operator: a program
calling the op is exported, saved as .pte and run by the ExecuTorch runtime with the kernels."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ossedge.quantize.qtensor import encode
from ossedge.runtime.errors import KernelError
from ossedge.runtime.executorch import kernel_isa, load_kernels
from ossedge.targets.executorch import ops  # noqa: F401  (registers the operators)

LIMIT, ALPHA = 7.0, 1.702
E, H, I, K = 4, 64, 96, 2
FORMATS = {"mxfp4": "mxfp4", "int4": "int4-g32"}


class Moe(torch.nn.Module):
    def __init__(self, kind: str, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        gu = encode(FORMATS[kind], torch.randn(E, 2 * I, H, generator=g) * 0.2)
        dn = encode(FORMATS[kind], torch.randn(E, H, I, generator=g) * 0.2)
        self.names = []
        for n, v in (*(("gu_" + k, t) for k, t in gu.items()),
                     ("b1", torch.randn(E, 2 * I, generator=g)),
                     *(("dn_" + k, t) for k, t in dn.items()),
                     ("b2", torch.randn(E, H, generator=g))):  # fmt: skip
            self.register_buffer(n, v)
            self.names.append(n)

    def forward(self, x, ids, w):
        op = getattr(torch.ops.ossedge, f"moe_{self.kind}")
        return op(x, ids, w, *(getattr(self, n) for n in self.names), LIMIT, ALPHA)


def _pte(module: Moe, tmp_path: Path) -> Path:
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    x, ids, w = torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [1, 1]]), torch.full((3, 2), 0.5)
    t = torch.export.Dim("t", min=1, max=64)
    ep = torch.export.export(module, (x, ids, w), dynamic_shapes=({0: t}, {0: t}, {0: t}))
    config = EdgeCompileConfig(_check_ir_validity=False)
    path = tmp_path / f"moe_{module.kind}.pte"
    path.write_bytes(to_edge_transform_and_lower(ep, compile_config=config).to_executorch().buffer)
    return path


@pytest.fixture(scope="module", params=list(FORMATS))
def program(request, tmp_path_factory):
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    load_kernels()
    module = Moe(request.param, seed=len(request.param))
    return module, _load_for_executorch(str(_pte(module, tmp_path_factory.mktemp("pte"))))


@pytest.mark.parametrize(
    "ids",
    [
        [[2, 0]],  # T = 1 (decode)
        [[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 1], [2, 1]],  # all experts, repeats
        [[1, 3]] * 40,  # prefill: one expert pair for every token
    ],
    ids=["T1", "all-experts", "T40-same"],
)
def test_native_kernel_equals_reference(program, ids) -> None:
    module, pte = program
    ids = torch.tensor(ids)
    g = torch.Generator().manual_seed(ids.shape[0])
    x = torch.randn(ids.shape[0], H, generator=g) * 2
    w = torch.softmax(torch.randn(ids.shape[0], K, generator=g), -1)
    got = pte.forward((x, ids, w))[0]
    want = module(x, ids, w)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def _native_isa() -> str:
    if platform.machine() == "aarch64":
        return "neon"
    if platform.machine() != "x86_64":
        return "scalar"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512" if " avx512bw" in flags else "avx2"


def test_kernels_load_once_and_report_their_isa() -> None:
    assert load_kernels() == load_kernels() and load_kernels().is_file()
    assert kernel_isa() == (os.environ.get("OSSEDGE_KERNEL_ISA") or _native_isa())


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_paths_agree(isa: str, tmp_path: Path) -> None:
    """A path other than the best one, forced in a child process, passes the same tests."""
    if os.environ.get("OSSEDGE_KERNEL_ISA"):
        pytest.skip("already running a forced path")
    if isa == "avx2" and platform.machine() != "x86_64":
        pytest.skip("AVX2 exists on x86-64 only")
    env = {**os.environ, "OSSEDGE_KERNEL_ISA": isa}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "native_kernel or isa", "--basetemp", str(tmp_path / "t")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0 and re.search(r"\b7 passed", p.stdout), p.stdout[-3000:]


def test_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "from ossedge.runtime.executorch import load_kernels\n"
        "from ossedge.runtime.errors import KernelError\n"
        "try:\n    load_kernels()\nexcept KernelError as e:\n    print('KernelError:', e)\n"
    )
    env = {"OSSEDGE_KERNELS": str(tmp_path / "none.so"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "KernelError:" in p.stdout and "make install" in p.stdout, p.stdout + p.stderr
    assert issubclass(KernelError, Exception)


def test_program_without_kernels_fails_loudly(tmp_path: Path) -> None:
    pte = _pte(Moe("mxfp4", 0), tmp_path)
    code = (
        "import torch\n"
        "from executorch.extension.pybindings.portable_lib import _load_for_executorch\n"
        f"m = _load_for_executorch({str(pte)!r})\n"
        "m.forward((torch.zeros(1, 64), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode != 0
    assert "ossedge::moe_mxfp4.out" in p.stderr or "Missing operator" in p.stderr, p.stderr[-2000:]
