"""The `ossedge::moe_*` operators: the reference implementation equals the reference model's MoE up
to the int8 rounding of its inputs, and a dense statement of the same math exactly; the rounding
itself; and a module calling them exports, with dynamic token counts, to an ExecuTorch program."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ossedge.quantize.qtensor import QTensor, encode
from ossedge.runtime.model import load_model
from ossedge.targets.executorch import ops  # noqa: F401  (registers the operators)
from ossedge.quantize.intq import round_activations_int8

LIMIT, ALPHA = 7.0, 1.702


def _routing(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(x, mlp.router_w, mlp.router_b)
    top_v, top_i = torch.topk(logits, mlp.cfg.num_experts_per_tok, dim=-1)
    return top_i, torch.softmax(top_v, dim=-1)


@pytest.mark.parametrize("tokens", [1, 7])
def test_mxfp4_op_equals_the_reference_model(tiny_ckpt: Path, tokens: int) -> None:
    mlp = load_model(tiny_ckpt).blocks[1].mlp
    x = torch.randn(tokens, mlp.cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
    ids, w = _routing(mlp, x)
    gu, dn = mlp.gate_up.parts, mlp.down.parts
    got = torch.ops.ossedge.moe_mxfp4(
        x, ids, w, gu["blocks"], gu["scales"], mlp.gate_up_b, dn["blocks"], dn["scales"],
        mlp.down_b, LIMIT, ALPHA,
    )  # fmt: skip
    want = mlp(x)
    # the int8 inputs (steps of max/127 per block of 32) move the output by about 1% (1.1% here)
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_activations_round_each_block_of_32_to_int8() -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(3, 96, generator=g) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(32)
    v[1, 32:64] = 0.0  # an all-zero block stays zero
    got = round_activations_int8(v)
    step = v.view(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    q = got.view(3, 3, 32) / torch.where(step > 0, step, 1)
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 127 + 1e-4
    assert ((got - v).view(3, 3, 32).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(got[1, 32:64], torch.zeros(32))
    peak = v.view(9, 32).abs().argmax(-1)  # each block's largest element is exact
    assert torch.allclose(got.view(9, 32).gather(1, peak[:, None]),
                          v.view(9, 32).gather(1, peak[:, None]), rtol=1e-6)  # fmt: skip


def _dense_moe(x, ids, w, w1, b1, w2, b2) -> torch.Tensor:
    """The MoE written token by token from dense weights: an independent statement of the math
    (inputs of both expert products rounded to int8 per block)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w1[e] @ round_activations_int8(x[t]) + b1[e]
            gate, up = h[0::2].clamp(max=LIMIT), h[1::2].clamp(-LIMIT, LIMIT)
            act = round_activations_int8((up + 1) * gate * torch.sigmoid(ALPHA * gate))
            out[t] += w[t, k] * (w2[e] @ act + b2[e])
    return out


@pytest.mark.parametrize("kind, fmt", [("mxfp4", "mxfp4"), ("int4", "int4-g32")])
def test_op_equals_dense_math_with_repeated_and_all_experts(kind: str, fmt: str) -> None:
    g = torch.Generator().manual_seed(1)
    e, h, i, t = 4, 64, 32, 6
    p1 = encode(fmt, torch.randn(e, 2 * i, h, generator=g) * 0.2)
    p2 = encode(fmt, torch.randn(e, h, i, generator=g) * 0.2)
    b1, b2 = torch.randn(e, 2 * i, generator=g), torch.randn(e, h, generator=g)
    x = torch.randn(t, h, generator=g) * 2
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3], [0, 2], [1, 1]])  # every expert, repeats
    w = torch.softmax(torch.randn(t, 2, generator=g), -1)
    w1 = QTensor(fmt, (e, 2 * i, h), p1).dequantize()
    w2 = QTensor(fmt, (e, h, i), p2).dequantize()
    op = getattr(torch.ops.ossedge, f"moe_{kind}")
    got = op(x, ids, w, *p1.values(), b1, *p2.values(), b2, LIMIT, ALPHA)
    assert torch.allclose(got, _dense_moe(x, ids, w, w1, b1, w2, b2), atol=1e-4, rtol=1e-4)
    out = torch.empty_like(got)
    op.out(x, ids, w, *p1.values(), b1, *p2.values(), b2, LIMIT, ALPHA, out=out)
    assert torch.equal(out, got)


def test_exports_to_an_executorch_program_with_dynamic_tokens() -> None:
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    g = torch.Generator().manual_seed(2)
    gu = encode("mxfp4", torch.randn(4, 64, 32, generator=g) * 0.1)
    dn = encode("mxfp4", torch.randn(4, 32, 32, generator=g) * 0.1)

    class Moe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for n, v in (("gb", gu["blocks"]), ("gs", gu["scales"]), ("db", dn["blocks"]),
                         ("ds", dn["scales"]), ("b1", torch.zeros(4, 64)),
                         ("b2", torch.zeros(4, 32))):  # fmt: skip
                self.register_buffer(n, v)

        def forward(self, x, ids, w):
            return torch.ops.ossedge.moe_mxfp4(
                x, ids, w, self.gb, self.gs, self.b1, self.db, self.ds, self.b2, LIMIT, ALPHA
            )

    x, ids = torch.randn(3, 32), torch.tensor([[0, 1], [2, 3], [1, 1]])
    w = torch.full((3, 2), 0.5)
    t = torch.export.Dim("t", min=1, max=64)
    ep = torch.export.export(Moe(), (x, ids, w), dynamic_shapes=({0: t}, {0: t}, {0: t}))
    assert torch.allclose(ep.module()(x, ids, w), Moe()(x, ids, w))
    config = EdgeCompileConfig(_check_ir_validity=False)  # custom ops are not core ATen
    edge = to_edge_transform_and_lower(ep, compile_config=config)
    prog = edge.to_executorch()
    nodes = prog.exported_program().graph.nodes
    targets = {str(n.target) for n in nodes if n.op == "call_function"}
    assert "ossedge.moe_mxfp4.out" in targets
    assert len(prog.buffer) > 0
