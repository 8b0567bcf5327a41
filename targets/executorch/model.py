"""gpt-oss in the form torch.export and ExecuTorch want: one static graph, the KV caches inside.

`forward(tokens [1, T], input_pos [1]) -> logits [1, V]` (float32, the last token only), T from 1
to `max_prefill`. Caches are mutable buffers, zero-initialised (the export marks them so the
program starts from zeros, not from whatever the memory arena held):

  full-attention layers   k/v [KV, C, D], position p in slot p (C = max_context)
  sliding-window layers   k/v [KV, W, D], a ring: position p in slot p % W (W = sliding_window)

A sliding layer attends over the ring as it was before this call plus the new keys, then the new
keys overwrite their slots — so prefill chunks are limited to W tokens (`max_prefill` ≤ W), which
keeps every shape static apart from T. Sinks are the extra softmax column; YaRN cos/sin tables
for the C positions are precomputed buffers.

Weights follow the recipe: experts stay as stored (MXFP4 or int4) and go through the
`ossedge::moe_*` operators; quantized linear layers become torchao tensors that XNNPACK lowers
(see `export.py`); the embedding table stays quantized and only the looked-up rows are decoded.
Expert weights may be zero placeholders of the right shape: the exporter writes the real bytes
into the .ptd itself, so they never pass through the exporter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ossedge.quantize.qtensor import INT4_GROUP, QTensor, part_specs
from ossedge.runtime.checkpoint import ATTENTION_WEIGHTS, MLP_WEIGHTS, NORM_WEIGHTS
from ossedge.runtime.config import GptOssConfig
from ossedge.runtime.model import SWIGLU_ALPHA, rope_tables
from ossedge.targets.executorch import ops  # noqa: F401  (registers ossedge::moe_*)
from ossedge.targets.executorch.pack import Layout, pack_layer

EXPERT_KINDS = {"mxfp4": ("blocks", "scales"), "int4-g32": ("q", "scale")}
EXPERT_OP = {"mxfp4": "moe_mxfp4", "int4-g32": "moe_int4"}
# Names of the expert tensors inside the exported program (constants the exporter fills itself):
# four stacked tensors per layer (version 1), or one packed tensor (version 2, `pack.py`).
EXPERT_BUFFERS = ("gate_up_data", "gate_up_scale", "down_data", "down_scale")
PACKED_BUFFER = "experts"

LinearFactory = Callable[["torch.Tensor | QTensor", "torch.Tensor | None"], nn.Module]


def dense_linear(w: torch.Tensor | QTensor, b: torch.Tensor | None) -> nn.Module:
    """A float32 nn.Linear holding the (decoded) weight."""
    weight = w.dequantize(torch.float32) if isinstance(w, QTensor) else w.float()
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.float(), requires_grad=False)
    return lin


def zeros_placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros that cost no memory until written (calloc'd pages): the stand-in for expert bytes."""
    np_dtype = {torch.uint8: np.uint8, torch.float16: np.float16}[dtype]
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype))


def _placeholder(source, name: str) -> QTensor:
    """The stored form of expert weight `name` with zero placeholder parts (nothing is read)."""
    fmt, shape = source.formats[name], source.shapes[name]
    parts = {p: zeros_placeholder(s, d) for p, (s, d) in part_specs(fmt, shape).items()}
    return QTensor(fmt, shape, parts)


class Embedding(nn.Module):
    """Row lookup into a dense, int8-per-row or int4-g32 table; only the looked-up rows are
    decoded (float32)."""

    def __init__(self, w: torch.Tensor | QTensor) -> None:
        super().__init__()
        self.fmt = w.fmt if isinstance(w, QTensor) else "dense"
        if self.fmt == "dense":
            self.register_buffer("table", w)
        elif self.fmt in ("int8-ch", "int4-g32"):
            self.register_buffer("table", w.parts["q"])
            self.register_buffer("scale", w.parts["scale"])
        else:
            raise ValueError(f"embedding format {self.fmt} is not supported by this target")
        self.dim = w.shape[-1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [T] → [T, H]
        rows = self.table.index_select(0, ids)
        if self.fmt == "dense":
            return rows.float()
        scale = self.scale.index_select(0, ids).float()
        if self.fmt == "int8-ch":
            return rows.float() * scale[:, None]
        low = (rows & 15).to(torch.int16) - 8  # element 2k low nibble, 2k+1 high, offset 8
        high = (rows >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], dim=-1).reshape(ids.shape[0], -1, INT4_GROUP)
        return (q.float() * scale[:, :, None]).reshape(ids.shape[0], self.dim)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: GptOssConfig,
        layer: int,
        t: dict[str, torch.Tensor | QTensor],
        make_linear: LinearFactory,
        *,
        max_context: int,
    ) -> None:
        super().__init__()
        self.kv, self.d = cfg.num_key_value_heads, cfg.head_dim
        self.g = cfg.num_attention_heads // self.kv
        self.sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window
        self.q_proj = make_linear(t["q_w"], t["q_b"])
        self.k_proj = make_linear(t["k_w"], t["k_b"])
        self.v_proj = make_linear(t["v_w"], t["v_b"])
        self.o_proj = make_linear(t["o_w"], t["o_b"])
        self.register_buffer("sinks", t["sinks"].float().view(self.kv, self.g, 1, 1))
        slots = self.window if self.sliding else max_context
        self.register_buffer("k_cache", torch.zeros(self.kv, slots, self.d))
        self.register_buffer("v_cache", torch.zeros(self.kv, slots, self.d))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        """x [T, H] at positions `pos`; `mask` [G·T, S (+ T for sliding layers)] is additive
        (0 or -inf), computed once per call for all layers of this kind."""
        t = x.shape[0]
        kv, g, d = self.kv, self.g, self.d
        q = _rope(self.q_proj(x).view(t, kv * g, d), cos, sin)
        k = _rope(self.k_proj(x).view(t, kv, d), cos, sin).transpose(0, 1)  # [KV, T, D]
        v = self.v_proj(x).view(t, kv, d).transpose(0, 1)
        if self.sliding:
            # the ring as it was before this call, then the new keys; then they take their slots
            keys = torch.cat([self.k_cache, k], dim=1)
            values = torch.cat([self.v_cache, v], dim=1)
            slots = torch.remainder(pos, self.window)
            self.k_cache.index_copy_(1, slots, k)
            self.v_cache.index_copy_(1, slots, v)
        else:
            self.k_cache.index_copy_(1, pos, k)
            self.v_cache.index_copy_(1, pos, v)
            keys, values = self.k_cache, self.v_cache
        # the G query heads sharing a KV head are rows [KV, G·T, D] against that head's keys: no
        # broadcast copy of the cache per query head
        q = q.view(t, kv, g, d).permute(1, 2, 0, 3).reshape(kv, g * t, d) * (1 / math.sqrt(d))
        sinks = self.sinks.view(kv, g, 1).expand(kv, g, t).reshape(kv, g * t)
        # ossedge::attend: only the slots the mask leaves open are read (ops.py)
        out = torch.ops.ossedge.attend(q, keys, values, mask, sinks).view(kv, g, t, d)
        out = out.permute(2, 0, 1, 3).reshape(t, kv * g * d)
        return self.o_proj(out)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotation of x [T, N, D] with cos, sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class MoE(nn.Module):
    """Router (top-k of the logits, softmax over the k) and the experts through `ossedge::moe_*`."""

    def __init__(
        self,
        cfg: GptOssConfig,
        t: dict[str, torch.Tensor | QTensor],
        make_linear: LinearFactory,
        *,
        packed: torch.Tensor | None = None,
        ahead: bool = False,
    ) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.intermediate = cfg.intermediate_size
        self.limit = float(cfg.swiglu_limit)
        self.router = make_linear(t["router_w"], t["router_b"])
        fmt = t["gate_up"].fmt if isinstance(t["gate_up"], QTensor) else "dense"
        if fmt not in EXPERT_KINDS:
            raise ValueError(
                f"experts stored as {fmt}: this target runs MXFP4 or int4-g32 experts "
                "(use recipe mobile, mobile-int8 or int4)"
            )
        self.packed = packed is not None
        self.ahead = ahead and self.packed
        op = EXPERT_OP[fmt] + ("_ahead" if self.ahead else "_packed" if self.packed else "")
        self.fmt, self.op_name = fmt, f"ossedge::{op}"
        self.op = getattr(torch.ops.ossedge, op)
        if self.packed:
            self.register_buffer(PACKED_BUFFER, packed)
            return
        data, scale = EXPERT_KINDS[fmt]
        for prefix, w in (("gate_up", t["gate_up"]), ("down", t["down"])):
            for part, buf in ((data, "data"), (scale, "scale")):
                self.register_buffer(f"{prefix}_{buf}", w.parts[part])
        self.register_buffer("gate_up_bias", t["gate_up_b"].float())
        self.register_buffer("down_bias", t["down_b"].float())

    def forward(self, x: torch.Tensor, nxt: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:  # fmt: skip
        """x [T, H]; `nxt` (lookahead ops only): the next layer's router logits from this layer's
        hidden state and its packed experts."""
        if self.ahead:
            return self.op(x, self.router(x), self.experts, nxt[0], nxt[1], self.top_k,
                           self.intermediate, self.limit, SWIGLU_ALPHA)  # fmt: skip
        if self.packed:
            return self.op(x, self.router(x), self.experts, self.top_k, self.intermediate,
                           self.limit, SWIGLU_ALPHA)  # fmt: skip
        top_v, top_i = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.softmax(top_v, dim=-1)
        return self.op(
            x, top_i, weights,
            self.gate_up_data, self.gate_up_scale, self.gate_up_bias,
            self.down_data, self.down_scale, self.down_bias,
            self.limit, SWIGLU_ALPHA,
        )  # fmt: skip


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: MoE, norms: tuple[torch.Tensor, torch.Tensor], eps):
        super().__init__()
        self.attn, self.mlp, self.eps = attn, mlp, eps
        self.register_buffer("attn_norm", norms[0].float())
        self.register_buffer("mlp_norm", norms[1].float())

    def forward(self, x, pos, cos, sin, masks, nxt: Block | None = None) -> torch.Tensor:
        """`nxt`: the next block, whose router a lookahead MoE applies to this block's hidden
        state (as that block will to its own) to name the experts worth reading early."""
        mask = masks[1] if self.attn.sliding else masks[0]
        x = x + self.attn(_rms(x, self.attn_norm, self.eps), pos, cos, sin, mask)
        if nxt is None or not self.mlp.ahead:
            return x + self.mlp(_rms(x, self.mlp_norm, self.eps))
        guess = nxt.mlp.router(_rms(x, nxt.mlp_norm, self.eps))
        return x + self.mlp(_rms(x, self.mlp_norm, self.eps), (guess, nxt.mlp.experts))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


_ATTN, _MLP = ATTENTION_WEIGHTS, MLP_WEIGHTS


class ExportableGptOss(nn.Module):
    """The whole model for export; see the module docstring for the contract."""

    def __init__(
        self,
        source,
        *,
        max_context: int,
        max_prefill: int,
        make_linear: LinearFactory = dense_linear,
        placeholders: bool = False,
        packed: bool = True,
        lookahead: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        cfg: GptOssConfig = source.config
        if not 1 <= max_prefill <= cfg.sliding_window:
            raise ValueError(f"max_prefill must be 1..{cfg.sliding_window} (the sliding window)")
        if not max_prefill <= max_context <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_context must be {max_prefill}..{cfg.max_position_embeddings}, "
                f"got {max_context}"
            )
        self.config = cfg
        self.max_context, self.max_prefill = max_context, max_prefill
        blocks = []
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}."
            attn = {k: source.weight(p + v) for k, v in _ATTN.items()}
            if packed:
                mlp = {k: source.weight(p + v) for k, v in _MLP.items() if k.startswith("router")}
                mlp["gate_up"] = _placeholder(source, p + _MLP["gate_up"])
                fmt = mlp["gate_up"].fmt
                experts = (
                    None if fmt not in EXPERT_KINDS  # MoE refuses it, naming the format
                    else zeros_placeholder(
                        (cfg.num_local_experts, packed_layout(cfg, fmt).stride), torch.uint8)
                    if placeholders
                    else packed_layer(source, n)
                )  # fmt: skip
            else:
                experts = None
                mlp = {
                    k: _placeholder(source, p + v) if placeholders and k in ("gate_up", "down")
                    else source.weight(p + v)
                    for k, v in _MLP.items()
                }
            norms = tuple(
                source.weight(p + s)
                for s in NORM_WEIGHTS.values()
            )
            blocks.append(
                Block(
                    Attention(cfg, n, attn, make_linear, max_context=max_context),
                    MoE(cfg, mlp, make_linear, packed=experts,
                        ahead=lookahead and n + 1 < cfg.num_hidden_layers),
                    norms,
                    cfg.rms_norm_eps,
                )
            )
            if progress:
                progress(n)
        self.blocks = nn.ModuleList(blocks)
        self.embed = Embedding(source.weight("model.embed_tokens.weight"))
        self.register_buffer("norm", source.weight("model.norm.weight").float())
        self.lm_head = make_linear(source.weight("lm_head.weight"), None)
        cos, sin = rope_tables(cfg, torch.arange(max_context))
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start = input_pos[0]
        pos = start + torch.arange(t)
        cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)
        x = self.embed(tokens[0])
        masks = self.masks(start, pos)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cos, sin, masks, self.blocks[i + 1] if i < last else None)
        x = _rms(x[-1:], self.norm, self.config.rms_norm_eps)
        return self.lm_head(x)  # [1, V]

    def masks(self, start: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks [G·T, S] (rows ordered (head in group, token)) for full layers (S = C
        slots, slot p holds position p) and sliding layers (S = W ring slots as they were
        before this call, then the T new keys)."""
        cfg = self.config
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        w = cfg.sliding_window
        key_pos = torch.arange(self.max_context)
        full = key_pos[None, :] <= pos[:, None]
        slot = torch.arange(w)
        # the position each slot holds before this call: the latest p < start with p ≡ slot
        # (mod w); operands kept non-negative, where remainder and fmod kernels agree
        ring_pos = torch.cat([start - 1 - torch.remainder(start + w - 1 - slot, w), pos])
        sliding = (ring_pos[None, :] >= 0) & (ring_pos[None, :] <= pos[:, None])
        sliding = sliding & (pos[:, None] - ring_pos[None, :] < w)
        zero, never = torch.tensor(0.0), torch.tensor(float("-inf"))
        return (torch.where(full, zero, never).repeat(g, 1),
                torch.where(sliding, zero, never).repeat(g, 1))

    def reset(self) -> None:
        """Empty the KV caches (eager use)."""
        for block in self.blocks:
            block.attn.k_cache.zero_()
            block.attn.v_cache.zero_()


def expert_constants(model: ExportableGptOss) -> dict[str, tuple[int, str]]:
    """FQN of every expert byte buffer → (layer, buffer name): what the exporter fills in."""
    bufs = (PACKED_BUFFER,) if model.blocks[0].mlp.packed else EXPERT_BUFFERS
    return {f"blocks.{n}.mlp.{buf}": (n, buf) for n in range(len(model.blocks)) for buf in bufs}


def packed_layout(cfg: GptOssConfig, fmt: str) -> Layout:
    return Layout(fmt, cfg.hidden_size, cfg.intermediate_size)


def packed_layer(
    source, layer: int, *, file_offset: int = 0, frequencies: list[float] | None = None
) -> torch.Tensor:
    """Layer `layer`'s experts from `source`, packed (uint8 [E, stride]); read when called."""
    cfg = source.config
    p = f"model.layers.{layer}.mlp.experts."
    gate_up, down = source.weight(p + "gate_up_proj"), source.weight(p + "down_proj")
    codes, scales = EXPERT_KINDS[gate_up.fmt]
    parts = {
        "gate_up_codes": gate_up.parts[codes], "gate_up_scales": gate_up.parts[scales],
        "gate_up_bias": source.weight(p + "gate_up_proj_bias"),
        "down_codes": down.parts[codes], "down_scales": down.parts[scales],
        "down_bias": source.weight(p + "down_proj_bias"),
    }  # fmt: skip
    return pack_layer(packed_layout(cfg, gate_up.fmt), parts, layer=layer,
                      layers=cfg.num_hidden_layers, file_offset=file_offset,
                      frequencies=frequencies)  # fmt: skip
