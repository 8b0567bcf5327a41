"""The native ExecuTorch kernels of `ossedge::moe_*` against the reference operator: a program
calling the op is exported, saved as .pte and run by the ExecuTorch runtime with the kernels, on
every SIMD path this machine has (switched in-process), with one and two threads.

The reference operator itself is checked against the reference model in test_moe_op.py, and the
kernel core cross-compiled for arm64 (NEON) under qemu in test_moe_core.py."""

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
from ossedge.targets.executorch.library import kernel_isa, load_kernels, set_kernel_isa
from ossedge.targets.executorch import ops  # noqa: F401  (registers the operators)

LIMIT, ALPHA = 7.0, 1.702
E, H, I, K = 4, 64, 96, 2  # I = 96: three blocks of 32, an odd count (the unrolled loops' tail)
FORMATS = {"mxfp4": "mxfp4", "int4": "int4-g32"}
MAX_T = 64
MAX_REL_ERR = 1e-4  # fp32 with another summation order than torch's


class Moe(torch.nn.Module):
    """One MoE layer with random weights in `kind`'s stored form, calling the operator."""

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
    t = torch.export.Dim("t", min=1, max=MAX_T)
    ep = torch.export.export(module, (x, ids, w), dynamic_shapes=({0: t}, {0: t}, {0: t}))
    config = EdgeCompileConfig(_check_ir_validity=False)  # custom ops are not core ATen
    path = tmp_path / f"moe_{module.kind}.pte"
    path.write_bytes(to_edge_transform_and_lower(ep, compile_config=config).to_executorch().buffer)
    return path


@pytest.fixture(scope="module", params=list(FORMATS))
def program(request, tmp_path_factory):
    """(the module, its program loaded by the pybindings with the ossedge kernels)."""
    load_kernels()
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    module = Moe(request.param, seed=len(request.param))
    return module, _load_for_executorch(str(_pte(module, tmp_path_factory.mktemp("pte"))))


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _expected_isas() -> list[str]:
    """The paths this machine should have, best first, from the OS's view of the CPU."""
    if platform.machine() in ("aarch64", "arm64"):
        return ["neon", "scalar"]
    if platform.machine() != "x86_64":
        return ["scalar"]
    flags = _cpu_flags()
    avx512 = {"avx512f", "f16c"} <= flags
    isas = ["avx512vnni"] if avx512 and {"avx512bw", "avx512vl", "avx512_vnni"} <= flags else []
    isas += ["avx512"] if avx512 else []
    isas += ["avx2"] if {"avx2", "fma", "f16c"} <= flags else []
    return [*isas, "scalar"]


# The paths built for this architecture (arm64's NEON runs here only under qemu: test_moe_core).
ARCH_ISAS = {"x86_64": ["avx512vnni", "avx512", "avx2", "scalar"], "aarch64": ["neon", "scalar"]}


@pytest.fixture(params=ARCH_ISAS.get(platform.machine().replace("arm64", "aarch64"), ["scalar"]))
def isa(request):
    """Each SIMD path in turn (a loud skip where the CPU lacks it); the default one afterwards."""
    load_kernels()
    if request.param not in _expected_isas():
        pytest.skip(f"NOT TESTED here: this CPU ({platform.machine()}) has no {request.param}")
    default = kernel_isa()
    set_kernel_isa(request.param)
    yield request.param
    set_kernel_isa(default)


def _ids(spec: str) -> torch.Tensor:
    if spec == "T1":
        return torch.tensor([[2, 0]])
    if spec == "all-experts":  # every expert, the same expert in both slots of a token
        return torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 1], [2, 1]])
    if spec == "T11-same":  # one expert pair for every token: tiles of 4, 4 and 3 tokens
        return torch.tensor([[1, 3]] * 11)
    g = torch.Generator().manual_seed(7)  # "T64-random": the largest T the program allows
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(MAX_T)])


def _inputs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(ids.shape[0])
    x = torch.randn(ids.shape[0], H, generator=g) * 2
    return x, ids, torch.softmax(torch.randn(ids.shape[0], K, generator=g), -1)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(
        got, want, rtol=MAX_REL_ERR, atol=MAX_REL_ERR * float(want.abs().max())
    )


@pytest.mark.parametrize("spec", ["T1", "all-experts", "T11-same", "T64-random"])
def test_native_kernel_equals_reference(program, isa: str, spec: str) -> None:
    module, pte = program
    x, ids, w = _inputs(_ids(spec))
    assert kernel_isa() == isa
    got, want = pte.forward((x, ids, w))[0], module(x, ids, w)
    assert _close(got, want), f"{isa}: max |diff| {(got - want).abs().max():.3g}"


def test_threads_give_identical_results(program) -> None:
    """Row chunks run on ExecuTorch's thread pool; every output is summed in the same order."""
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )

    module, pte = program
    x, ids, w = _inputs(_ids("T64-random"))
    threads = _threadpool_get_thread_count()
    try:
        _unsafe_reset_threadpool(1)
        one = pte.forward((x, ids, w))[0]
        _unsafe_reset_threadpool(2)
        two = pte.forward((x, ids, w))[0]
    finally:
        _unsafe_reset_threadpool(threads)
    assert torch.equal(one, two) and _close(one, module(x, ids, w))


def test_out_of_range_expert_fails_clearly(program, capfd) -> None:
    _, pte = program
    x, _, w = _inputs(_ids("T1"))
    with pytest.raises(RuntimeError):
        pte.forward((x, torch.tensor([[0, E]]), w))
    assert "an expert id is out of range" in capfd.readouterr().err


def test_kernels_load_once_and_pick_the_best_isa() -> None:
    first = load_kernels()
    assert first.is_file() and load_kernels() == first
    assert kernel_isa() == (os.environ.get("OSSEDGE_KERNEL_ISA") or _expected_isas()[0])


def test_an_unavailable_isa_is_refused() -> None:
    missing = "neon" if platform.machine() == "x86_64" else "avx512"
    before = kernel_isa()
    with pytest.raises(KernelError, match="not available"):
        set_kernel_isa(missing)
    with pytest.raises(KernelError, match="unknown kernel ISA"):
        set_kernel_isa("sse9")
    assert kernel_isa() == before


def test_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "from ossedge.targets.executorch.runner import load_kernels\n"
        "from ossedge.runtime.errors import KernelError, OssedgeError\n"
        "try:\n    load_kernels()\n"
        "except KernelError as e:\n    print(isinstance(e, OssedgeError), e)\n"
    )
    env = {**os.environ, "OSSEDGE_KERNELS": str(tmp_path / "none.so")}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("True "), p.stdout + p.stderr
    assert "none.so" in lines[0] and "run `make install`" in lines[0]


def test_program_without_kernels_fails_loudly(tmp_path: Path) -> None:
    pte = _pte(Moe("mxfp4", 0), tmp_path)
    code = (
        "import torch\n"
        "from executorch.extension.pybindings.portable_lib import _load_for_executorch\n"
        f"m = _load_for_executorch({str(pte)!r})\n"
        f"m.forward((torch.zeros(1, {H}), torch.zeros(1, {K}, dtype=torch.long), "
        f"torch.ones(1, {K})))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode != 0
    missing = re.search(r"Missing operator: \[\d+\] ossedge::moe_mxfp4\.out", p.stderr)
    assert missing, p.stderr[-2000:]
