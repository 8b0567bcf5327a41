"""The gpt-oss reference model in torch: the numerical ground truth for every artifact.

RMSNorm in fp32; attention with q/k/v/o biases, GQA, learned sinks and sliding windows; YaRN
RoPE honouring `truncate`; top-k MoE with clamped, interleaved SwiGLU. Experts stay packed (MXFP4
bytes, memory-mapped): only the selected experts are decoded, at each step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ossedge.quantize import mxfp4
from ossedge.runtime.cache import KVCache
from ossedge.runtime.checkpoint import Checkpoint, open_checkpoint
from ossedge.runtime.config import GptOssConfig

SWIGLU_ALPHA = 1.702
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def yarn_inv_freq(cfg: GptOssConfig) -> torch.Tensor:
    """[D/2] inverse frequencies: interpolated (÷factor) below the correction range, extrapolated
    above it, linearly blended between; the range is floored/ceiled only when `truncate`."""
    d, base, y = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
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
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def rope_tables(cfg: GptOssConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] (fp32), both scaled by YaRN's attention factor."""
    angles = positions.to(torch.float32)[:, None] * yarn_inv_freq(cfg)[None, :]
    scale = cfg.rope_scaling.attention_factor
    return angles.cos() * scale, angles.sin() * scale


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
        for name, value in t.items():
            self.register_buffer(name, value, persistent=False)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        kv, d = cfg.num_key_value_heads, cfg.head_dim
        g = cfg.num_attention_heads // kv
        q = F.linear(x, self.q_w, self.q_b).view(b, t, kv * g, d)
        k = F.linear(x, self.k_w, self.k_b).view(b, t, kv, d)
        v = F.linear(x, self.v_w, self.v_b).view(b, t, kv, d)
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
        return F.linear(out, self.o_w, self.o_b)


class Experts(nn.Module):
    """Router plus experts. MXFP4 experts are kept as their uint8 bytes; dense (dequantized HF)
    experts as stored, [E, in, out]. A selected expert is decoded when it is used."""

    def __init__(self, cfg: GptOssConfig, t: dict[str, torch.Tensor], *, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.packed = "gate_up_blocks" in t
        for name, value in t.items():
            self.register_buffer(name, value, persistent=False)

    def _weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [2I, H], W2 [H, I]) of expert e in the compute dtype."""
        if self.packed:
            w1 = mxfp4.dequantize(self.gate_up_blocks[e], self.gate_up_scales[e], dtype=self.dtype)
            w2 = mxfp4.dequantize(self.down_blocks[e], self.down_scales[e], dtype=self.dtype)
            return w1, w2
        return self.gate_up[e].t().to(self.dtype), self.down[e].t().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H] N=tokens
        logits = F.linear(x, self.router_w, self.router_b)  # [N, E]
        top_v, top_i = torch.topk(logits, cfg.num_experts_per_tok, dim=-1)  # [N, K]
        weights = torch.softmax(top_v.float(), dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        limit = cfg.swiglu_limit
        for e in top_i.unique().tolist():
            rows, slot = torch.nonzero(top_i == e, as_tuple=True)
            w1, w2 = self._weights(e)
            gate_up = F.linear(x[rows], w1, self.gate_up_b[e])  # [n, 2I], gate/up interleaved
            gate = gate_up[:, 0::2].clamp(max=limit)
            up = gate_up[:, 1::2].clamp(min=-limit, max=limit)
            h = (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)
            y = F.linear(h, w2, self.down_b[e])  # [n, H]
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
        embed: torch.Tensor,
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        *,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("embed", embed, persistent=False)  # kept as stored: a lookup
        self.register_buffer("norm", norm, persistent=False)
        self.register_buffer("lm_head", lm_head, persistent=False)

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size=batch_size, dtype=self.dtype, max_context=max_context)

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
        x = F.embedding(input_ids, self.embed).to(self.dtype)
        for n, block in enumerate(self.blocks):
            x = block(x, pos, rope, None if cache is None else cache.layers[n])
        if cache is not None:
            cache.advance_(t)
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return F.linear(x, self.lm_head)


_ATTN = {
    "q_w": "self_attn.q_proj.weight",
    "q_b": "self_attn.q_proj.bias",
    "k_w": "self_attn.k_proj.weight",
    "k_b": "self_attn.k_proj.bias",
    "v_w": "self_attn.v_proj.weight",
    "v_b": "self_attn.v_proj.bias",
    "o_w": "self_attn.o_proj.weight",
    "o_b": "self_attn.o_proj.bias",
    "sinks": "self_attn.sinks",
}
_MLP = {
    "router_w": "mlp.router.weight",
    "router_b": "mlp.router.bias",
    "gate_up_b": "mlp.experts.gate_up_proj_bias",
    "down_b": "mlp.experts.down_proj_bias",
}
_MLP_PACKED = {
    "gate_up_blocks": "mlp.experts.gate_up_proj_blocks",
    "gate_up_scales": "mlp.experts.gate_up_proj_scales",
    "down_blocks": "mlp.experts.down_proj_blocks",
    "down_scales": "mlp.experts.down_proj_scales",
}
_MLP_DENSE = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"}


def build_model(ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32) -> GptOssModel:
    """Assemble the model from a validated checkpoint, one tensor at a time. Float tensors are
    cast to `dtype` (no copy when already in it); expert bytes and the embedding stay mapped."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    cfg = ckpt.config

    def cast(name: str) -> torch.Tensor:
        return ckpt.get(name).to(dtype)

    blocks = []
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        attn = Attention(cfg, n, {k: cast(p + v) for k, v in _ATTN.items()})
        mlp_t = {k: cast(p + v) for k, v in _MLP.items()}
        raw = _MLP_PACKED if ckpt.expert_format == "mxfp4" else _MLP_DENSE
        mlp_t.update({k: ckpt.get(p + v) for k, v in raw.items()})
        norms = (cast(p + "input_layernorm.weight"), cast(p + "post_attention_layernorm.weight"))
        blocks.append(Block(attn, Experts(cfg, mlp_t, dtype=dtype), norms))
    return GptOssModel(
        cfg,
        blocks,
        ckpt.get("model.embed_tokens.weight"),
        cast("model.norm.weight"),
        cast("lm_head.weight"),
        dtype=dtype,
    ).eval()


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> GptOssModel:
    """Open, validate and load a gpt-oss checkpoint (HF or original layout) for inference."""
    return build_model(open_checkpoint(path), dtype=dtype)
