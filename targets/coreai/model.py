"""gpt-oss as Core AI programs: torch modules in standard ATen ops that coreai-torch converts.

A chunk of the artifact is a `LayerGroup`, layers [first, last) with two functions made from the
same module (so they share its constants):

  decode   x [1, H] fp32, pos [1] int32 → h [1, H], and per layer l ids_l [1, k] int32 and
           w_l [1, k] fp32 (the experts the router chose and their weights)
  prefill  the same with x [T, H], T = 2 … max_prefill (a dynamic dimension)

KV caches are buffers the program updates in place, which Core AI keeps as states:

  full-attention layers   k_l / v_l [C, KV, D], position p in slot p (C = max_context)
  sliding-window layers   k_l / v_l [W, KV, D], a ring: position p in slot p % W

A sliding layer attends over the ring as it was before the call plus the new keys, then the new
keys take their slots, so a call holds at most W tokens (max_prefill ≤ W). Sinks are the extra
softmax column; the YaRN cos/sin tables of the C positions are constants.

Experts stay as the checkpoint stores them — MXFP4 blocks (uint8, two E2M1 codes per byte) and
E8M0 scales (uint8), or int4-g32 codes and fp16 scales — and are decoded in the program:

- decode gathers the bytes of the k chosen experts only (`index_select` on the expert axis of
  the uint8 tensors) and decodes those: a 256-entry table maps each byte to its two values and a
  256-entry table each scale byte to its power of two, so the weights are exact;
- prefill decodes each expert once for the whole call and weights its output by each token's
  routing weight (zero where the token did not choose it): a call reads every expert once,
  per token E/T experts, no more than decode's k once T ≥ E/k.

Linear layers follow the recipe: float weights as stored (bf16 for released checkpoints) and
computed in fp32; int8 per row and int4 groups of 32 as their codes and scales, decoded in the
program (the unembedding in pieces of rows, so that no call decodes all of it at once).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ossedge.quantize.mxfp4 import FP4_VALUES, SCALE_BIAS
from ossedge.quantize.qtensor import INT4_GROUP, QTensor
from ossedge.runtime.checkpoint import ATTENTION_WEIGHTS, MLP_WEIGHTS, NORM_WEIGHTS
from ossedge.runtime.config import GptOssConfig
from ossedge.runtime.model import SWIGLU_ALPHA, rope_tables
from ossedge.targets.coreai import PIECE_ELEMENTS

EXPERT_FORMATS = ("mxfp4", "int4-g32")


def mxfp4_byte_table() -> torch.Tensor:
    """[256, 2] fp32: byte → (value of its low nibble, value of its high nibble)."""
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([fp4[b % 16], fp4[b // 16]], dim=1)


def e8m0_table() -> torch.Tensor:
    """[256] fp32: E8M0 byte → 2^(byte − 127) (255, NaN in the spec, is +inf as in the reference)."""
    return torch.exp2(torch.arange(256, dtype=torch.float64) - SCALE_BIAS).float()


def int4_byte_table() -> torch.Tensor:
    """[256, 2] fp32: byte → (low nibble − 8, high nibble − 8), the symmetric int4 codes."""
    b = torch.arange(256)
    return torch.stack([b % 16 - 8, b // 16 - 8], dim=1).float()


class Tables(nn.Module):
    """The decoding tables, one copy per program."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fp4", mxfp4_byte_table())
        self.register_buffer("e8m0", e8m0_table())
        self.register_buffer("int4", int4_byte_table())


def decode_codes(tables: Tables, fmt: str, codes: torch.Tensor, scales: torch.Tensor,
                 k: int) -> torch.Tensor:  # fmt: skip
    """fp32 [..., N, K] from stored parts: MXFP4 blocks [..., N, K/32, 16] and scales
    [..., N, K/32] (uint8), or int4-g32 codes [..., N, K/2] (uint8) and scales [..., N, K/32]."""
    lead = codes.shape[:-2] if fmt == "mxfp4" else codes.shape[:-1]
    groups = k // 32
    if fmt == "mxfp4":
        values = tables.fp4[codes.to(torch.int32)].reshape(*lead, groups, 32)
        scale = tables.e8m0[scales.to(torch.int32)]
    else:
        values = tables.int4[codes.to(torch.int32)].reshape(*lead, groups, INT4_GROUP)
        scale = scales.float()
    return (values * scale[..., None]).reshape(*lead, k)


class Linear(nn.Module):
    """y = x Wᵀ (+ b) with W as the recipe stores it, decoded in fp32 (in pieces of rows when
    large)."""

    def __init__(self, tables: Tables, w: torch.Tensor | QTensor, b: torch.Tensor | None) -> None:
        super().__init__()
        self.tables = [tables]  # shared, not a submodule: one copy of its buffers
        self.fmt = w.fmt if isinstance(w, QTensor) else "dense"
        self.n, self.k = w.shape
        rows = max(1, PIECE_ELEMENTS // self.k)
        self.pieces = [(a, min(a + rows, self.n)) for a in range(0, self.n, rows)]
        if self.fmt == "dense":
            self.register_buffer("weight", w if w.dtype in (torch.bfloat16, torch.float16,
                                                            torch.float32) else w.float())
        elif self.fmt in ("int8-ch", "int4-g32"):
            self.register_buffer("q", w.parts["q"])
            self.register_buffer("scale", w.parts["scale"])
        else:
            raise ValueError(f"{self.fmt} linear weights have no Core AI mapping here")
        self.register_buffer("bias", None if b is None else b.float())

    def _weight(self, a: int, z: int) -> torch.Tensor:
        if self.fmt == "dense":
            return self.weight[a:z].float()
        if self.fmt == "int8-ch":
            return self.q[a:z].float() * self.scale[a:z].float()[:, None]
        return decode_codes(self.tables[0], "int4-g32", self.q[a:z], self.scale[a:z], self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x @ self._weight(a, z).t() for a, z in self.pieces]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if self.bias is None else y + self.bias


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotation of x [T, N, D] with cos, sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mod(x: torch.Tensor, n: int) -> torch.Tensor:
    """x mod n (x ≥ 0) by a tensor divisor: Core AI lowers remainder.Tensor, not .Scalar."""
    return torch.remainder(x, torch.full((), n, dtype=x.dtype))


def _float(w: torch.Tensor | QTensor) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QTensor) else w.float()


class Attention(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, t: dict, tables: Tables, *,
                 max_context: int) -> None:  # fmt: skip
        super().__init__()
        self.kv, self.d = cfg.num_key_value_heads, cfg.head_dim
        self.g = cfg.num_attention_heads // self.kv
        self.sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window
        for c in "qkvo":
            setattr(self, f"{c}_proj", Linear(tables, t[f"{c}_w"], t[f"{c}_b"]))
        self.register_buffer("sinks", _float(t["sinks"]).view(self.kv, self.g, 1, 1))
        slots = self.window if self.sliding else max_context
        self.register_buffer("k_cache", torch.zeros(slots, self.kv, self.d))
        self.register_buffer("v_cache", torch.zeros(slots, self.kv, self.d))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        """x [T, H] at positions `pos` [T]; `mask` [T, S] is additive (0 or -inf)."""
        t = x.shape[0]
        kv, g, d = self.kv, self.g, self.d
        q = _rope(self.q_proj(x).view(t, kv * g, d), cos, sin)
        k = _rope(self.k_proj(x).view(t, kv, d), cos, sin)  # [T, KV, D]
        v = self.v_proj(x).view(t, kv, d)
        # caches are [slots, KV, D]: Core AI writes a dynamic number of rows along dim 0 only
        if self.sliding:
            keys = torch.cat([self.k_cache, k], dim=0)
            values = torch.cat([self.v_cache, v], dim=0)
            slots = _mod(pos, self.window)
            self.k_cache.index_copy_(0, slots, k)
            self.v_cache.index_copy_(0, slots, v)
        else:
            self.k_cache.index_copy_(0, pos, k)
            self.v_cache.index_copy_(0, pos, v)
            keys, values = self.k_cache, self.v_cache
        keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [KV, S, D]
        q = q.view(t, kv, g, d).permute(1, 2, 0, 3) * (1 / math.sqrt(d))  # [KV, G, T, D]
        scores = q @ keys[:, None].transpose(-1, -2) + mask  # [KV, G, T, S]
        sinks = self.sinks.expand(kv, g, t, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        out = (probs @ values[:, None]).permute(2, 0, 1, 3).reshape(t, kv * g * d)
        return self.o_proj(out)


class Experts(nn.Module):
    """Router (top-k of the logits, softmax over the k) and the experts as stored; see the module
    docstring for what decode and prefill read."""

    def __init__(self, cfg: GptOssConfig, t: dict, tables: Tables) -> None:
        super().__init__()
        self.tables = [tables]
        self.top_k, self.e = cfg.num_experts_per_tok, cfg.num_local_experts
        self.limit = float(cfg.swiglu_limit)
        self.h, self.i = cfg.hidden_size, cfg.intermediate_size
        self.router = Linear(tables, t["router_w"], t["router_b"])
        fmt = t["gate_up"].fmt if isinstance(t["gate_up"], QTensor) else "dense"
        if fmt not in EXPERT_FORMATS:
            raise ValueError(f"experts stored as {fmt}: the Core AI target keeps MXFP4 or int4-g32 "
                             "experts (recipe mobile, mobile-int8, native or int4)")  # fmt: skip
        self.fmt = fmt
        codes, scales = ("blocks", "scales") if fmt == "mxfp4" else ("q", "scale")
        for name, w in (("gate_up", t["gate_up"]), ("down", t["down"])):
            self.register_buffer(f"{name}_codes", w.parts[codes])
            self.register_buffer(f"{name}_scales", w.parts[scales])
        self.register_buffer("gate_up_bias", _float(t["gate_up_b"]))
        self.register_buffer("down_bias", _float(t["down_b"]))
        self.dense = False  # prefill: every expert once per call (see LayerGroup.function)

    def _decode(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """The experts `idx` of `name` (gate_up, down), gathered as stored, decoded to fp32."""
        codes, scales = getattr(self, f"{name}_codes"), getattr(self, f"{name}_scales")
        codes, scales = codes.index_select(0, idx), scales.index_select(0, idx)
        k = self.h if name == "gate_up" else self.i
        return decode_codes(self.tables[0], self.fmt, codes, scales, k)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        shape = gate_up.shape
        pairs = gate_up.reshape(*shape[:-1], self.i, 2)  # interleaved: gate, up
        gate = pairs[..., 0].clamp(max=self.limit)
        up = pairs[..., 1].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)

    def forward(self, x: torch.Tensor):
        """x [T, H] → (y [T, H], ids [T, k] int32, weights [T, k])."""
        t = x.shape[0]
        top_v, top_i = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.softmax(top_v, dim=-1)
        if self.dense:
            chosen = top_i[..., None] == torch.arange(self.e)  # [T, k, E]
            routing = (chosen.float() * weights[..., None]).sum(1)  # [T, E]
            # every expert once, most used first: the order comes from the routing, so the
            # compiler cannot fold a decode of constants into a dense copy of the weights
            order = torch.topk(routing.sum(0), self.e).indices
            out = torch.zeros_like(x)
            for j in range(self.e):
                e = order[j : j + 1]
                h = self._swiglu(x @ self._decode("gate_up", e)[0].t()
                                 + self.gate_up_bias.index_select(0, e))  # fmt: skip
                y = h @ self._decode("down", e)[0].t() + self.down_bias.index_select(0, e)
                out = out + y * routing.index_select(1, e)
        else:
            idx = top_i.reshape(-1)  # T·k experts, gathered as stored then decoded
            w1 = self._decode("gate_up", idx).reshape(t, self.top_k, 2 * self.i, self.h)
            b1 = self.gate_up_bias.index_select(0, idx).reshape(t, self.top_k, 2 * self.i)
            h = self._swiglu((w1 @ x[:, None, :, None]).squeeze(-1) + b1)  # [T, k, I]
            w2 = self._decode("down", idx).reshape(t, self.top_k, self.h, self.i)
            b2 = self.down_bias.index_select(0, idx).reshape(t, self.top_k, self.h)
            y = (w2 @ h[..., None]).squeeze(-1) + b2  # [T, k, H]
            out = (y * weights[..., None]).sum(1)
        return out, top_i.to(torch.int32), weights


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: Experts, norms, eps: float) -> None:
        super().__init__()
        self.attn, self.mlp, self.eps = attn, mlp, eps
        self.register_buffer("attn_norm", _float(norms[0]))
        self.register_buffer("mlp_norm", _float(norms[1]))

    def forward(self, x, pos, cos, sin, masks):
        x = x + self.attn(_rms(x, self.attn_norm, self.eps), pos, cos, sin,
                          masks[1] if self.attn.sliding else masks[0])  # fmt: skip
        y, ids, w = self.mlp(_rms(x, self.mlp_norm, self.eps))
        return x + y, ids, w


class LayerGroup(nn.Module):
    """Layers `layers` of the model, one chunk of the artifact; see the module docstring."""

    def __init__(self, source, layers: range, *, max_context: int) -> None:
        super().__init__()
        cfg: GptOssConfig = source.config
        self.config, self.layers, self.max_context = cfg, layers, max_context
        self.tables = Tables()
        blocks = []
        for n in layers:
            p = f"model.layers.{n}."
            attn = {k: source.weight(p + v) for k, v in ATTENTION_WEIGHTS.items()}
            mlp = {k: source.weight(p + v) for k, v in MLP_WEIGHTS.items()}
            norms = tuple(source.weight(p + s) for s in NORM_WEIGHTS.values())
            blocks.append(Block(Attention(cfg, n, attn, self.tables, max_context=max_context),
                                Experts(cfg, mlp, self.tables), norms, cfg.rms_norm_eps))  # fmt: skip
        self.blocks = nn.ModuleList(blocks)
        cos, sin = rope_tables(cfg, torch.arange(max_context))
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    def set_prefill(self, on: bool) -> None:
        """Trace the prefill function (every expert once per call) or decode (the k chosen)."""
        for b in self.blocks:
            b.mlp.dense = on

    def forward(self, x: torch.Tensor, pos: torch.Tensor):
        t = x.shape[0]
        start = pos[0]
        positions = start + torch.arange(t, dtype=pos.dtype)
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        masks = self.masks(start, positions)
        routing = []
        for block in self.blocks:
            x, ids, w = block(x, positions, cos, sin, masks)
            routing += [ids, w]
        return (x, *routing)

    def masks(self, start: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks [T, S] for full layers (S = C slots, slot p holds position p) and
        sliding layers (S = the W ring slots as they were before this call, then the T new
        keys)."""
        w = self.config.sliding_window
        key_pos = torch.arange(self.max_context, dtype=pos.dtype)
        full = key_pos[None, :] <= pos[:, None]
        slot = torch.arange(w, dtype=pos.dtype)
        # the position each slot holds before this call: the latest p < start with p ≡ slot (mod
        # w); operands kept non-negative
        ring_pos = torch.cat([start - 1 - _mod(start + w - 1 - slot, w), pos])
        sliding = (ring_pos[None, :] >= 0) & (ring_pos[None, :] <= pos[:, None])
        sliding = sliding & (pos[:, None] - ring_pos[None, :] < w)
        zero, never = torch.tensor(0.0), torch.tensor(float("-inf"))
        return torch.where(full, zero, never), torch.where(sliding, zero, never)

    def state_names(self) -> dict[str, str]:
        """Buffer FQN of every KV cache → its state name in the program (k_l, v_l)."""
        return {f"blocks.{i}.attn.{kind}_cache": f"{kind}_{n}"
                for i, n in enumerate(self.layers) for kind in "kv"}  # fmt: skip

    def output_names(self) -> list[str]:
        return ["h", *(f"{kind}_{n}" for n in self.layers for kind in ("ids", "w"))]


class Head(nn.Module):
    """The final norm and the unembedding: x [1, H] → logits [1, V]."""

    def __init__(self, source) -> None:
        super().__init__()
        cfg = source.config
        self.eps = cfg.rms_norm_eps
        self.tables = Tables()
        self.register_buffer("norm", _float(source.weight("model.norm.weight")))
        self.lm_head = Linear(self.tables, source.weight("lm_head.weight"), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms(x, self.norm, self.eps))
