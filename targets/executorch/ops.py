"""The gpt-oss MoE as custom operators in the `ossedge` namespace, for torch.export and eager.

    ossedge::moe_mxfp4(x, expert_ids, weights, gate_up_blocks, gate_up_scales, gate_up_bias,
                       down_blocks, down_scales, down_bias, limit, alpha) -> Tensor
    ossedge::moe_int4(x, expert_ids, weights, gate_up_q, gate_up_scale, gate_up_bias,
                      down_q, down_scale, down_bias, limit, alpha) -> Tensor

    ossedge::moe_mxfp4_packed(x, router_logits, experts, top_k, intermediate, limit, alpha)
    ossedge::moe_int4_packed(x, router_logits, experts, top_k, intermediate, limit, alpha)
    ossedge::moe_mxfp4_ahead(x, router_logits, experts, next_logits, next_experts, top_k,
                             intermediate, limit, alpha)  (and moe_int4_ahead)

    ossedge::attend(q, k, v, mask, sinks) -> Tensor

plus `.out` overloads (ExecuTorch runs out-variant kernels). x [T, H] float32; expert_ids
[T, K] int64; weights [T, K] float32 (the softmax over the chosen K); expert weights stored as
`ossedge.quantize.qtensor` describes, [E, N, K/32, 16] + [E, N, K/32] bytes for MXFP4 or
[E, N, K/2] + fp16 [E, N, K/32] for int4; biases float32 [E, 2I] and [E, H]. The result is
sum_k weights[t, k] · (W2[e] · swiglu(W1[e] · x[t] + b1[e]) + b2[e]) with gpt-oss's clamped,
interleaved SwiGLU, where both expert inputs — x and the SwiGLU output — are first rounded to int8
per block of 32 (symmetric, scale max|v| / 127, round half to even: the "int8-b32" activations of
`ossedge.quantize.intq.round_activations_int8`), as
llama.cpp does for its Q8_0 dot products, so that the kernels can multiply int8 by int8 (AVX-512
VNNI). The implementation here is the reference (tokens grouped per expert, only the selected
experts decoded); the native kernel in `kernels/` must agree with it.

The `_packed` operators of version-2 artifacts take the router logits [T, E] (the top-k and their
softmax are taken inside, so a host may route with knowledge of what is cached) and one uint8
tensor [E, stride] per layer holding each expert as one extent (`pack.py`); the math is the same.
The `_ahead` variants (`convert --lookahead`) also take the next layer's router logits computed
from this layer's hidden state and the next layer's packed experts: a hint on which the expert
cache starts reading the next layer's likely experts while this layer computes. The result does
not depend on them.

`attend` is gpt-oss's attention over a KV cache: q [KV, R, D] (R = query heads per KV head ×
tokens, already scaled by 1/√D), k and v [KV, S, D], an additive mask [R, S] shared by the KV
heads, sinks [KV, R]; the result [KV, R, D] is softmax(cat(q·kᵀ + mask, sink))[..., :S] · v. The
native kernel skips the slots the mask sets to -inf, so a long cache costs only what is filled.
"""

from __future__ import annotations

import torch
from ossedge.quantize.intq import round_activations_int8
from ossedge.quantize.qtensor import QTensor
from ossedge.targets.executorch.pack import Layout, unpack_expert

_ARGS = {
    "mxfp4": "Tensor gate_up_blocks, Tensor gate_up_scales, Tensor gate_up_bias, "
    "Tensor down_blocks, Tensor down_scales, Tensor down_bias",
    "int4": "Tensor gate_up_q, Tensor gate_up_scale, Tensor gate_up_bias, "
    "Tensor down_q, Tensor down_scale, Tensor down_bias",
}
_FORMAT = {"mxfp4": ("mxfp4", "blocks", "scales"), "int4": ("int4-g32", "q", "scale")}

LIB = torch.library.Library("ossedge", "DEF")


def _expert_weight(kind: str, data: torch.Tensor, scale: torch.Tensor) -> QTensor:
    fmt, p_data, p_scale = _FORMAT[kind]
    k = scale.shape[-1] * 32
    return QTensor(fmt, (*scale.shape[:-1], k), {p_data: data, p_scale: scale})


def moe_reference(
    kind: str,
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: tuple[torch.Tensor, torch.Tensor],
    b1: torch.Tensor,
    w2: tuple[torch.Tensor, torch.Tensor],
    b2: torch.Tensor,
    limit: float,
    alpha: float,
) -> torch.Tensor:
    """The MoE in float32 on int8-rounded inputs, each selected expert decoded once for all the
    tokens that chose it."""
    gate_up, down = _expert_weight(kind, *w1), _expert_weight(kind, *w2)
    x = x.float()
    out = torch.zeros_like(x)
    for e in expert_ids.unique().tolist():
        rows, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        h = torch.nn.functional.linear(
            round_activations_int8(x[rows]), gate_up[e].dequantize(), b1[e].float()
        )
        gate = h[:, 0::2].clamp(max=limit)
        up = h[:, 1::2].clamp(min=-limit, max=limit)
        act = (up + 1) * gate * torch.sigmoid(alpha * gate)
        y = torch.nn.functional.linear(round_activations_int8(act), down[e].dequantize(), b2[e].float())
        out.index_add_(0, rows, y * weights[rows, slot, None].float())
    return out


def _define(kind: str) -> None:
    name = f"moe_{kind}"
    head = f"Tensor x, Tensor expert_ids, Tensor weights, {_ARGS[kind]}, float limit, float alpha"
    LIB.define(f"{name}({head}) -> Tensor")
    LIB.define(f"{name}.out({head}, *, Tensor(a!) out) -> Tensor(a!)")

    def functional(x, ids, w, d1, s1, b1, d2, s2, b2, limit, alpha):
        return moe_reference(kind, x, ids, w, (d1, s1), b1, (d2, s2), b2, limit, alpha)

    def out_variant(x, ids, w, d1, s1, b1, d2, s2, b2, limit, alpha, *, out):
        out.copy_(functional(x, ids, w, d1, s1, b1, d2, s2, b2, limit, alpha))
        return out

    def fake(x, ids, w, d1, s1, b1, d2, s2, b2, limit, alpha):
        return torch.empty_like(x, dtype=torch.float32)

    def fake_out(x, ids, w, d1, s1, b1, d2, s2, b2, limit, alpha, *, out):
        return out

    LIB.impl(name, functional, "CompositeExplicitAutograd")
    LIB.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    LIB.impl(name, fake, "Meta")
    LIB.impl(f"{name}.out", fake_out, "Meta")


for _kind in _FORMAT:
    _define(_kind)


def moe_packed_reference(
    kind: str, x: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor, top_k: int,
    intermediate: int, limit: float, alpha: float,
) -> torch.Tensor:  # fmt: skip
    """The packed operators' math: route, then `moe_reference` on the selected experts only."""

    fmt = _FORMAT[kind][0]
    layout = Layout(fmt, x.shape[-1], intermediate)
    top_v, top_i = torch.topk(logits.float(), top_k, dim=-1)  # [T, K]
    weights = torch.softmax(top_v, dim=-1)
    chosen = top_i.unique().tolist()
    local = torch.full((experts.shape[0],), -1, dtype=torch.long)
    local[chosen] = torch.arange(len(chosen))
    parts = [unpack_expert(layout, experts[e]) for e in chosen]

    def stack(name: str) -> torch.Tensor:
        return torch.stack([p[name] for p in parts])

    return moe_reference(
        kind, x, local[top_i], weights,
        (stack("gate_up_codes"), stack("gate_up_scales")), stack("gate_up_bias"),
        (stack("down_codes"), stack("down_scales")), stack("down_bias"), limit, alpha,
    )  # fmt: skip


def _define_packed(kind: str, *, ahead: bool = False) -> None:
    """moe_{kind}_packed, or with `ahead` moe_{kind}_ahead (two more tensors, the lookahead hint,
    which the math ignores)."""
    name = f"moe_{kind}_{'ahead' if ahead else 'packed'}"
    hint = "Tensor next_logits, Tensor next_experts, " if ahead else ""
    head = (f"Tensor x, Tensor router_logits, Tensor experts, {hint}int top_k, int intermediate, "
            "float limit, float alpha")  # fmt: skip
    LIB.define(f"{name}({head}) -> Tensor")
    LIB.define(f"{name}.out({head}, *, Tensor(a!) out) -> Tensor(a!)")
    skip = 2 if ahead else 0

    def functional(x, logits, experts, *rest):
        top_k, inter, limit, alpha = rest[skip:]
        return moe_packed_reference(kind, x, logits, experts, top_k, inter, limit, alpha)

    def out_variant(*args, out):
        out.copy_(functional(*args))
        return out

    LIB.impl(name, functional, "CompositeExplicitAutograd")
    LIB.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    LIB.impl(name, lambda x, *a: torch.empty_like(x, dtype=torch.float32), "Meta")
    LIB.impl(f"{name}.out", lambda x, *a, out: out, "Meta")


for _kind in _FORMAT:
    _define_packed(_kind)
    _define_packed(_kind, ahead=True)


def attend_reference(q, k, v, mask, sinks) -> torch.Tensor:
    """Attention with sinks over every slot (masked ones weigh zero)."""
    s = k.shape[1]
    scores = torch.bmm(q, k.transpose(1, 2)) + mask
    probs = torch.softmax(torch.cat([scores, sinks[..., None]], dim=-1), dim=-1)[..., :s]
    return torch.bmm(probs, v)


_ATTEND = "Tensor q, Tensor k, Tensor v, Tensor mask, Tensor sinks"
LIB.define(f"attend({_ATTEND}) -> Tensor")
LIB.define(f"attend.out({_ATTEND}, *, Tensor(a!) out) -> Tensor(a!)")


def _attend_out(q, k, v, mask, sinks, *, out):
    out.copy_(attend_reference(q, k, v, mask, sinks))
    return out


LIB.impl("attend", attend_reference, "CompositeExplicitAutograd")
LIB.impl("attend.out", _attend_out, "CompositeExplicitAutograd")
LIB.impl("attend", lambda q, k, v, mask, sinks: torch.empty_like(q), "Meta")
LIB.impl("attend.out", lambda q, k, v, mask, sinks, *, out: out, "Meta")
