"""Speed of the native MoE kernel on one full-size gpt-oss-20b layer, against the reference op.

    python -m ossedge.benchmarks.moe_kernel [--tokens 1,128] [--isa avx512,avx2] [--threads 1]

One layer (E=32 experts, H=I=2880, top-4) with random MXFP4 weights, exported as a program that
calls `ossedge::moe_mxfp4` and run by the ExecuTorch runtime with the ossedge kernels, for each
SIMD path and thread count asked (ExecuTorch's thread pool), and the same inputs through the torch
reference implementation (one thread). T=1 calls rotate over all 32 experts, so their bytes come
from memory as in a real decode, not from the last call's cache. Prints JSON: median ms per layer
call, the largest difference from the reference relative to its largest output, and the memory
roofline of one token (its 4 experts' bytes ÷ this machine's single-thread read bandwidth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ossedge.runtime.errors import KernelError
from ossedge.targets.devices import measure_bandwidth

E, H, I, K = 32, 2880, 2880, 4
LIMIT, ALPHA = 7.0, 1.702


def _layer() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def blocks(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, 256, (E, n, k // 32, 16), generator=g, dtype=torch.uint8)

    def scales(n: int, k: int) -> torch.Tensor:
        return torch.randint(118, 124, (E, n, k // 32), generator=g, dtype=torch.uint8)

    return {
        "gb": blocks(2 * I, H), "gs": scales(2 * I, H), "b1": torch.randn(E, 2 * I, generator=g),
        "db": blocks(H, I), "ds": scales(H, I), "b2": torch.randn(E, H, generator=g),
    }  # fmt: skip


class Layer(torch.nn.Module):
    def __init__(self, t: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for n, v in t.items():
            self.register_buffer(n, v)

    def forward(self, x, ids, w):
        return torch.ops.ossedge.moe_mxfp4(
            x, ids, w, self.gb, self.gs, self.b1, self.db, self.ds, self.b2, LIMIT, ALPHA
        )


def _timed(fn, runs: int) -> tuple[float, object]:
    """(median ms over `runs` calls after one warm-up call, the last result)."""
    result = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def _cases(n: int, g: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Inputs (x, ids, w) for T = n. One token: 8 cases that together choose every expert once,
    so consecutive calls read other experts' bytes (as consecutive layers do), not cached ones."""
    if n == 1:
        experts = torch.randperm(E, generator=g).view(E // K, 1, K)
    else:
        experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])[None]
    return [
        (torch.randn(n, H, generator=g), ids, torch.softmax(torch.randn(n, K, generator=g), -1))
        for ids in experts
    ]


def _cycling(fn, cases):
    """A call of fn on the next case, round robin."""
    it = itertools.cycle(cases)
    return lambda: fn(*next(it))


def _program(layer: Layer):
    """The layer as an ExecuTorch program (T dynamic up to 512), loaded by the pybindings."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    x0, ids0, w0 = torch.randn(2, H), torch.zeros(2, K, dtype=torch.long), torch.ones(2, K)
    t = torch.export.Dim("t", min=1, max=512)
    ep = torch.export.export(layer, (x0, ids0, w0), dynamic_shapes=({0: t}, {0: t}, {0: t}))
    config = EdgeCompileConfig(_check_ir_validity=False)  # custom ops are not core ATen
    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "layer.pte"
        pte.write_bytes(
            to_edge_transform_and_lower(ep, compile_config=config).to_executorch().buffer
        )
        return _load_for_executorch(str(pte))


def main() -> None:
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from ossedge.targets.executorch import ops  # noqa: F401  (registers the operators)
    from ossedge.targets.executorch.library import load_kernels, set_kernel_isa

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,128", help="token counts T, comma separated")
    p.add_argument("--isa", default="avx512,avx2", help="kernel paths to time (skipped if absent)")
    p.add_argument("--threads", default="1", help="ExecuTorch thread pool sizes to time")
    p.add_argument("--runs", type=int, default=10, help="timed calls per native measurement")
    a = p.parse_args()
    torch.set_num_threads(1)
    load_kernels()
    layer = Layer(_layer())
    program = _program(layer)
    touched = K * (2 * I * H + H * I) * 17 / 32  # bytes of one token's 4 experts: 4.25 bits/weight
    result: dict[str, object] = {"layer": f"E={E} H={H} I={I} top-{K}", "runs": {}}
    g = torch.Generator().manual_seed(1)
    for n in (int(s) for s in a.tokens.split(",")):
        cases = _cases(n, g)
        want = layer(*cases[0])
        ref_ms, _ = _timed(_cycling(layer, cases), 3 if n == 1 else 1)
        row = {"reference_ms": round(ref_ms, 1)}
        for isa in a.isa.split(","):
            try:
                set_kernel_isa(isa)
            except KernelError as e:  # a path this CPU lacks is reported, not fatal
                row[isa] = str(e)
                continue
            for threads in (int(s) for s in a.threads.split(",")):
                _unsafe_reset_threadpool(threads)
                ms, _ = _timed(_cycling(lambda *c: program.forward(c)[0], cases), a.runs)
                err = (program.forward(cases[0])[0] - want).abs().max() / want.abs().max()
                row[f"{isa}_{threads}t_ms"] = round(ms, 2)
                row[f"{isa}_{threads}t_max_err_rel_to_max"] = float(f"{float(err):.2e}")
        result["runs"][f"T{n}"] = row

    bw = measure_bandwidth(gb=1.0, threads=1) / 1e9
    result["read_bandwidth_gb_s"] = round(bw, 1)
    result["T1_roofline_ms"] = round(touched / bw / 1e6, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
