"""Speed of the native MoE kernel on one full-size gpt-oss-20b layer, against the reference op.

    python -m ossedge.benchmarks.moe_kernel [--tokens 1,128] [--runs 10]

One layer (E=32 experts, H=I=2880, top-4) with random MXFP4 weights, exported as a program that
calls `ossedge::moe_mxfp4` and run by the ExecuTorch runtime with the ossedge kernels (one thread),
and the same inputs through the torch reference implementation. Prints JSON: median ms per layer
per call, and for T=1 the memory roofline (expert bytes touched ÷ measured read bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

E, H, I, K = 32, 2880, 2880, 4
LIMIT, ALPHA = 7.0, 1.702


def _layer() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def blocks(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, 256, (E, n, k // 32, 16), generator=g, dtype=torch.uint8)

    def scales(n: int, k: int) -> torch.Tensor:
        return torch.randint(118, 124, (E, n, k // 32), generator=g, dtype=torch.uint8)

    return {
        "gb": blocks(2 * I, H), "gs": scales(2 * I, H), "b1": torch.zeros(E, 2 * I),
        "db": blocks(H, I), "ds": scales(H, I), "b2": torch.zeros(E, H),
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


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def read_bandwidth_gbs() -> float:
    """Sustained read bandwidth of this machine: summing a 1 GB array, best of 3."""
    a = np.ones(1 << 28, dtype=np.float32)
    best = min(_median_ms(lambda: a.sum(), 1) for _ in range(3))
    return a.nbytes / best / 1e6


def main() -> None:
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from ossedge.runtime.executorch import kernel_isa, load_kernels
    from ossedge.targets.executorch import ops  # noqa: F401

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,128")
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(1)
    load_kernels()
    layer = Layer(_layer())
    x0, ids0, w0 = torch.randn(2, H), torch.zeros(2, K, dtype=torch.long), torch.ones(2, K)
    t = torch.export.Dim("t", min=1, max=512)
    ep = torch.export.export(layer, (x0, ids0, w0), dynamic_shapes=({0: t}, {0: t}, {0: t}))
    config = EdgeCompileConfig(_check_ir_validity=False)
    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "layer.pte"
        edge = to_edge_transform_and_lower(ep, compile_config=config)
        pte.write_bytes(edge.to_executorch().buffer)
        program = _load_for_executorch(str(pte))
    result = {"isa": kernel_isa(), "threads": 1, "layer": f"E={E} H={H} I={I} top-{K}"}
    g = torch.Generator().manual_seed(1)
    for n in (int(s) for s in a.tokens.split(",")):
        x = torch.randn(n, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
        w = torch.softmax(torch.randn(n, K, generator=g), -1)
        native = _median_ms(lambda: program.forward((x, ids, w)), a.runs)
        reference = _median_ms(lambda: layer(x, ids, w), max(1, a.runs // 3))
        err = float((program.forward((x, ids, w))[0] - layer(x, ids, w)).abs().max())
        result[f"T{n}"] = {"native_ms": round(native, 2), "reference_ms": round(reference, 2),
                           "max_abs_diff": err}  # fmt: skip
    bw = read_bandwidth_gbs()
    touched = K * (2 * I * H + H * I) * 17 / 32  # MXFP4: 4.25 bits per weight
    result["read_bandwidth_gb_s"] = round(bw, 1)
    result["T1_roofline_ms"] = round(touched / bw / 1e6, 2)
    if "T1" in result:
        fraction = result["T1_roofline_ms"] / result["T1"]["native_ms"]
        result["T1_fraction_of_roofline"] = round(fraction, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
