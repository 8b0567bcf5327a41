"""The gpt-oss reference model in torch: the numerical ground truth for every artifact.

RMSNorm in fp32; attention with q/k/v/o biases, GQA, learned sinks and sliding windows; YaRN
RoPE honouring `truncate`; top-k MoE with clamped, interleaved SwiGLU. Quantized weights stay as
stored (MXFP4 or int4 experts, int4/int8 linear layers and embedding, memory-mapped) and are decoded
when used: only the selected experts at each step, the embedding rows looked up, the unembedding in
row chunks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from ossedge.quantize.intq import (
    ACTIVATIONS,
    LINEAR_ACTIVATIONS,
    round_activations_int8,
    round_activations_int8_asym_token,
    round_scales_bf16,
)
from ossedge.quantize.qtensor import QTensor
from ossedge.runtime.cache import KVCache
from ossedge.runtime.checkpoint import ATTENTION_WEIGHTS, MLP_WEIGHTS, NORM_WEIGHTS, open_checkpoint
from ossedge.runtime.config import GptOssConfig
from torch import nn

SWIGLU_ALPHA = 1.702
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
LINEAR_CHUNK_ROWS = 16384  # decode a quantized unembedding this many rows at a time
Weight = torch.Tensor | QTensor


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None, act=None) -> torch.Tensor:
    """F.linear for a plain or quantized weight [N, K]; large quantized weights are decoded in
    row chunks so a 201088-row unembedding never exists in full precision. `act`: what a
    backend's quantized linears do to their inputs (see `linear_rounding`), None for nothing."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    if act is not None:
        x = act(x.float()).to(x.dtype)
    n = w.shape[0]
    if n <= LINEAR_CHUNK_ROWS:
        return F.linear(x, w.dequantize(x.dtype), b)
    step = LINEAR_CHUNK_ROWS
    parts = [F.linear(x, w[a : a + step].dequantize(x.dtype)) for a in range(0, n, step)]
    out = torch.cat(parts, dim=-1)
    return out if b is None else out + b


def linear_rounding(mode: str):
    """(input rounding, weight transform) of quantized linears for `mode` in LINEAR_ACTIVATIONS:
    "float" none; "int8-b32" int8 per block of 32 (ONNX Runtime's MatMulNBits, accuracy level 4);
    "int8-asym-token" int8 per token with a zero point and int4 group scales in bf16 (XNNPACK)."""
    if mode not in LINEAR_ACTIVATIONS:
        raise ValueError(f"linear activations must be one of {LINEAR_ACTIVATIONS}, got {mode}")
    if mode == "float":
        return None, lambda w: w
    if mode == "int8-b32":
        return round_activations_int8, lambda w: w

    def bf16_scales(w: Weight) -> Weight:
        if not isinstance(w, QTensor) or w.fmt != "int4-g32":
            return w
        return QTensor(w.fmt, w.shape, {**w.parts, "scale": round_scales_bf16(w.parts["scale"])})

    return round_activations_int8_asym_token, bf16_scales


def _keep(module: nn.Module, tensors: dict[str, Weight]) -> None:
    """Plain tensors become (non-persistent) buffers, quantized weights plain attributes."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            module.register_buffer(name, value, persistent=False)
        else:
            setattr(module, name, value)


def yarn_inv_freq(cfg: GptOssConfig) -> torch.Tensor:
    """[D/2] inverse frequencies (fp32): interpolated (÷factor) below the correction range,
    extrapolated above it, linearly blended between; the range is floored/ceiled only when
    `truncate`. Computed in fp64 and rounded once, so every machine gets the same bits (fp32 `pow`
    differs in the last bit between torch's AVX2 and AVX-512 kernels)."""
    d, base, y = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (y.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        ctx = y.original_max_position_embeddings
        return d * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    blended = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return blended.float()


def rope_tables(cfg: GptOssConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] (fp32), both scaled by YaRN's attention factor: the angle is position ×
    inv_freq rounded to fp32 (as HF computes it), its cos and sin are taken in fp64 and rounded
    once — the same bits on every machine (fp32 cos differs in the last bit between SIMD paths)."""
    angles = (positions.to(torch.float32)[:, None] * yarn_inv_freq(cfg)[None, :]).double()
    scale = cfg.rope_scaling.attention_factor
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rope_allowance(cfg: GptOssConfig, positions: torch.Tensor) -> torch.Tensor:
    """[T, D/2]: how far apart two correct fp32 computations of `rope_tables` may be — the angle
    position × inv_freq carries fp32 rounding of itself and of inv_freq (an error that grows with
    the position: at position 2000 one bit of the angle moves cos by ~1e-4), the value one more
    rounding; all times the attention factor, with a factor 2 to spare. A table made by another
    build or machine passes; a table off in its frequencies (a flipped `truncate`, another theta
    or factor) misses by orders of magnitude."""
    angles = positions.to(torch.float64)[:, None] * yarn_inv_freq(cfg).double()[None, :]
    return cfg.rope_scaling.attention_factor * 2.0**-21 * (angles.abs() + 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotation of x [B, T, N, D] with cos, sin [T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, t: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.sliding = cfg.is_sliding(layer)
        self.act = None  # input rounding of the quantized linears (build_model's linear_activations)
        _keep(self, t)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        kv, d = cfg.num_key_value_heads, cfg.head_dim
        g = cfg.num_attention_heads // kv
        q = linear(x, self.q_w, self.q_b, self.act).view(b, t, kv * g, d)
        k = linear(x, self.k_w, self.k_b, self.act).view(b, t, kv, d)
        v = linear(x, self.v_w, self.v_b, self.act).view(b, t, kv, d)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, T, D]
        if cache is None:
            keys, values, key_pos = k, v, pos
        else:
            keys, values, key_pos = cache.update(k, v, pos, limit=cfg.max_position_embeddings)
        q = q.view(b, t, kv, g, d).permute(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
        scores = torch.einsum("bkgtd,bksd->bkgts", q, keys) / math.sqrt(d)  # S=keys
        visible = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] >= 0)  # [T, S]
        if self.sliding:
            visible &= pos[:, None] - key_pos[None, :] < cfg.sliding_window
        scores = scores.float().masked_fill(~visible, float("-inf"))
        sinks = self.sinks.float().view(kv, g)[None, :, :, None, None].expand(b, kv, g, t, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        out = torch.einsum("bkgts,bksd->bkgtd", probs.to(values.dtype), values)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, t, kv * g * d)
        return linear(out, self.o_w, self.o_b, self.act)


class Experts(nn.Module):
    """Router plus experts. Expert weights are [E, N, K]: quantized ones (MXFP4 or int4 bytes)
    stay as stored and a selected expert is decoded when it is used; dense ones are views."""

    def __init__(
        self, cfg: GptOssConfig, t: dict[str, Weight], *, dtype: torch.dtype, activations="float"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        # "int8-b32": both expert inputs rounded as the native MoE kernels do (quantize/intq.py)
        self.round = round_activations_int8 if activations == "int8-b32" else (lambda v: v)
        _keep(self, t)
        # verify's hooks (None: route by the router's top-k, record nothing): `forced` [N, K]
        # expert ids to use instead of the top-k (an artifact's own choices); `seen` a list that
        # gets each call's router logits [N, E]
        self.forced: torch.Tensor | None = None
        self.seen: list[torch.Tensor] | None = None

    def _weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [2I, H], W2 [H, I]) of expert e in the compute dtype."""
        return tuple(
            w[e].dequantize(self.dtype) if isinstance(w, QTensor) else w[e].to(self.dtype)
            for w in (self.gate_up, self.down)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H] N=tokens
        logits = linear(x, self.router_w, self.router_b)  # [N, E]
        if self.seen is not None:
            self.seen.append(logits.float())
        if self.forced is not None:
            if self.forced.shape != (x.shape[0], cfg.num_experts_per_tok):
                raise ValueError(f"forced routing is {tuple(self.forced.shape)}, the call routes "
                                 f"{x.shape[0]} tokens to {cfg.num_experts_per_tok} experts")  # fmt: skip
            top_i = self.forced.to(torch.long)
            top_v = logits.gather(1, top_i)
        else:
            top_v, top_i = torch.topk(logits, cfg.num_experts_per_tok, dim=-1)  # [N, K]
        weights = torch.softmax(top_v.float(), dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        limit = cfg.swiglu_limit
        for e in top_i.unique().tolist():
            rows, slot = torch.nonzero(top_i == e, as_tuple=True)
            w1, w2 = self._weights(e)
            gate_up = F.linear(self.round(x[rows]), w1, self.gate_up_b[e])  # [n, 2I] interleaved
            gate = gate_up[:, 0::2].clamp(max=limit)
            up = gate_up[:, 1::2].clamp(min=-limit, max=limit)
            h = (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)
            y = F.linear(self.round(h), w2, self.down_b[e])  # [n, H]
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: Experts, norms: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.register_buffer("attn_norm", norms[0], persistent=False)
        self.register_buffer("mlp_norm", norms[1], persistent=False)

    def forward(self, x, pos, rope, cache) -> torch.Tensor:
        eps = self.attn.cfg.rms_norm_eps
        x = x + self.attn(rms_norm(x, self.attn_norm, eps), pos, rope, cache)
        return x + self.mlp(rms_norm(x, self.mlp_norm, eps))


class GptOssModel(nn.Module):
    """`model(input_ids)` → logits [B, T, V]; with `cache=model.new_cache()` calls continue where
    the cache left off (incremental decode)."""

    def __init__(
        self,
        cfg: GptOssConfig,
        blocks: list[Block],
        embed: Weight,
        norm: torch.Tensor,
        lm_head: Weight,
        *,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.blocks = nn.ModuleList(blocks)
        self.act = None  # as Attention.act, for the unembedding
        _keep(self, {"embed": embed, "norm": norm, "lm_head": lm_head})  # embed kept as stored

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> KVCache:
        return KVCache(
            self.config, batch_size=batch_size, dtype=self.dtype, max_context=max_context
        )

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, *, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if cache is None:
            if t > self.config.max_position_embeddings:
                raise ValueError(f"{t} tokens exceed max_position_embeddings")
            pos = torch.arange(t)
        else:
            pos = cache.positions(t)
        rope = rope_tables(self.config, pos)
        if isinstance(self.embed, QTensor):
            x = self.embed.rows(input_ids, self.dtype)
        else:
            x = F.embedding(input_ids, self.embed).to(self.dtype)
        for n, block in enumerate(self.blocks):
            x = block(x, pos, rope, None if cache is None else cache.layers[n])
        if cache is not None:
            cache.advance_(t)
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return linear(x, self.lm_head, None, self.act)


_ATTN, _MLP = ATTENTION_WEIGHTS, MLP_WEIGHTS


def build_model(
    ckpt, *, dtype: torch.dtype = torch.float32, expert_activations: str = "float",
    linear_activations: str = "float",
) -> GptOssModel:  # fmt: skip
    """Assemble the model from a validated checkpoint (plain or quantized), one weight at a time.
    Float tensors are cast to `dtype` (no copy when already in it); quantized weights, expert
    bytes and the embedding stay mapped as stored. `expert_activations="int8-b32"` rounds the
    experts' inputs as an ExecuTorch artifact's kernels do, `linear_activations` the quantized
    linear layers' as a backend does (`linear_rounding`; for parity checks against artifacts)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    if expert_activations not in ACTIVATIONS:
        raise ValueError(f"expert activations must be one of {ACTIVATIONS}, got {expert_activations}")
    act, transform = linear_rounding(linear_activations)
    cfg = ckpt.config

    def weight(name: str, *, cast: bool = True) -> Weight:
        w = ckpt.weight(name)
        return w.to(dtype) if cast and isinstance(w, torch.Tensor) else w

    blocks = []
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        attn = Attention(cfg, n, {k: transform(weight(p + v)) for k, v in _ATTN.items()})
        attn.act = act
        # dense experts stay in their stored dtype: a selected expert is cast when used
        mlp = {k: weight(p + v, cast=k not in ("gate_up", "down")) for k, v in _MLP.items()}
        norm_names = tuple(NORM_WEIGHTS.values())
        norms = (weight(p + norm_names[0]), weight(p + norm_names[1]))
        experts = Experts(cfg, mlp, dtype=dtype, activations=expert_activations)
        blocks.append(Block(attn, experts, norms))
    model = GptOssModel(
        cfg,
        blocks,
        weight("model.embed_tokens.weight", cast=False),
        weight("model.norm.weight"),
        transform(weight("lm_head.weight")),
        dtype=dtype,
    )
    model.act = act
    return model.eval()


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, verify: bool = False
) -> GptOssModel:
    """Open, validate and load a gpt-oss checkpoint (HF, original or ossedge-quantized layout;
    `verify` also checks a quantized checkpoint's sha256 checksums)."""
    return build_model(open_checkpoint(path, verify=verify), dtype=dtype)
