"""`ossedge::attend`: the reference equals attention with sinks written out per head, and the native
ExecuTorch kernel (which skips masked slots) equals the reference, for decode and prefill rows,
full-layer and sliding-ring masks, fully masked rows, head sizes on and off the SIMD width, and one
or two threads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ossedge.targets.executorch.library import load_kernels
from ossedge.targets.executorch import ops

NEG = float("-inf")


def _case(kv: int, g: int, t: int, s: int, d: int, seed: int, *, start: int):
    """Queries of t tokens at positions start.. (g heads per KV head), a cache of s slots where
    slot p holds position p, and the causal mask; row 0 also fully masked."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(kv, g * t, d, generator=gen) / math.sqrt(d)
    k, v = torch.randn(kv, s, d, generator=gen), torch.randn(kv, s, d, generator=gen)
    pos = start + torch.arange(t)
    mask = torch.where(torch.arange(s)[None, :] <= pos[:, None], 0.0, NEG).repeat(g, 1)
    mask[0] = NEG
    sinks = torch.randn(kv, g * t, generator=gen)
    return q, k, v, mask, sinks


def _per_head(q, k, v, mask, sinks) -> torch.Tensor:
    """Each row on its own: softmax over the open slots' scores and the sink."""
    out = torch.zeros_like(q)
    for h in range(q.shape[0]):
        for r in range(q.shape[1]):
            open_ = mask[r] == 0
            scores = torch.cat([k[h, open_] @ q[h, r], sinks[h, r : r + 1]])
            p = torch.softmax(scores, 0)[:-1]
            out[h, r] = p @ v[h, open_]
    return out


def test_reference_is_attention_with_sinks() -> None:
    args = _case(2, 3, 4, 20, 8, seed=0, start=9)
    assert torch.allclose(ops.attend_reference(*args), _per_head(*args), atol=1e-6)
    assert torch.equal(ops.attend_reference(*args)[:, 0], torch.zeros(2, 8))  # all on the sink


class Attend(torch.nn.Module):
    def forward(self, q, k, v, mask, sinks):
        return torch.ops.ossedge.attend(q, k, v, mask, sinks)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The op exported for a few fixed shapes, loaded with the ossedge kernels."""
    load_kernels()
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    cache: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("attend")

    def program(args):
        key = tuple(tuple(a.shape) for a in args)
        if key not in cache:
            ep = torch.export.export(Attend(), args)
            edge = to_edge_transform_and_lower(
                ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)
            )
            path = Path(root) / f"attend{len(cache)}.pte"
            path.write_bytes(edge.to_executorch().buffer)
            cache[key] = _load_for_executorch(str(path))
        return cache[key]

    return program


SHAPES = {
    "decode-d64": (8, 8, 1, 300, 64, 250),  # gpt-oss heads, a long cache mostly empty
    "prefill-d64": (2, 4, 7, 64, 64, 30),
    "decode-d24": (2, 3, 1, 40, 24, 17),  # a head size off the SIMD width: the portable path
    "prefill-d32": (2, 4, 5, 48, 32, 0),  # from position 0: one open slot in the first row
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_equals_reference(programs, shape: str) -> None:
    kv, g, t, s, d, start = SHAPES[shape]
    args = _case(kv, g, t, s, d, seed=len(shape), start=start)
    got = programs(args).forward(args)[0]
    assert torch.allclose(got, ops.attend_reference(*args), atol=1e-5, rtol=1e-5)


def test_sliding_ring_mask(programs) -> None:
    """A ring of 6 slots holding positions 12..17 out of order, then 2 new keys: arbitrary open
    slots per row, as the sliding layers' masks have."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 16, generator=gen)
    k, v = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
    mask = torch.where(torch.rand(4, 8, generator=gen) < 0.6, 0.0, NEG)
    sinks = torch.randn(2, 4, generator=gen)
    args = (q, k, v, mask, sinks)
    got = programs(args).forward(args)[0]
    assert torch.allclose(got, _per_head(*args), atol=1e-5)


def test_threads_agree(programs) -> None:
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )

    args = _case(*SHAPES["prefill-d64"][:5], seed=9, start=30)
    pte = programs(args)
    threads = _threadpool_get_thread_count()
    try:
        _unsafe_reset_threadpool(1)
        one = pte.forward(args)[0]
        _unsafe_reset_threadpool(2)
        two = pte.forward(args)[0]
    finally:
        _unsafe_reset_threadpool(threads)
    assert torch.equal(one, two)

