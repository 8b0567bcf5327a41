"""The MIL functions of a gpt-oss Core ML artifact, built op by op with coremltools' MIL builder.

Three function types, all for one token per call (the host loops over a prompt):

- `attention(layer)`: x fp32 [1, H], pos int32 [1] → h fp32 [1, H] (residual stream after the
  attention block), m fp16 [1, H] (the post-attention norm of h, the experts' input), ids int32
  [1, k] (the router's top-k experts), w fp32 [1, k] (their softmax weights). States `k_cache`
  and `v_cache` fp16 [1, KV, S, D]: S = the context for full layers, `sliding_window` slots (a
  ring written at pos mod W) for sliding layers. Sinks are the extra softmax column; YaRN cos/sin
  tables are constants gathered at pos.
- `expert(layer, e)`: m fp16 [1, H] → y fp16 [1, H], one expert's clamped SwiGLU FFN with biases.
- `head`: h fp32 [1, H] → logits fp32 [1, V] (final norm, unembedding).

Weights: fp16 constants, or compressed constants the device expands at load — int8 per row and
int4 blocks of 32 as `constexpr_blockwise_shift_scale`; MXFP4 exactly as `constexpr_lut_to_dense`
over the 16 E2M1 values followed by a power-of-two `constexpr_blockwise_shift_scale` per block of
32 (an iOS26 program; older targets would rewrite it into per-block tables, ~3× the bytes).
Norms, the router and the softmaxes run in fp32, matrix products in fp16.
The cache update uses the `slice_update` result directly: the saved program never reads a
state after writing it (coremltools merges such a re-read with the read before the write).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ossedge.quantize import mxfp4
from ossedge.quantize.intq import unpack_nibbles
from ossedge.quantize.qtensor import INT4_GROUP, QTensor
from ossedge.runtime.config import GptOssConfig
from ossedge.runtime.model import SWIGLU_ALPHA, rope_tables

MASKED = -1e9  # additive mask in fp32 (finite: no inf - inf anywhere)
# E8M0 scale bytes whose every MXFP4 value is exact in fp16 (multiples of 2^-24 up to 6 · 2^13)
EXACT_FP16_SCALES = (104, 140)


def _mil():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    return mb, types


def fp4_lut() -> np.ndarray:
    return np.array(mxfp4.FP4_VALUES, dtype=np.float16)


def _codes(packed: torch.Tensor) -> np.ndarray:
    """uint8 [..., N, K/2] nibble pairs → codes [..., N, K] (element 2k in the low nibble)."""
    return unpack_nibbles(packed).numpy()


def compressed_parts(w: QTensor) -> dict[str, np.ndarray]:
    """The constant inputs a compressed weight [N, K] is stored as in the program."""
    _, types = _mil()
    n, k = w.shape
    if w.fmt == "mxfp4":
        blocks, scales = w.parts["blocks"], w.parts["scales"]
        codes = _codes(blocks.reshape(n, k // 2))
        scale = np.exp2(scales.numpy().astype(np.float64) - mxfp4.SCALE_BIAS).astype(np.float16)
        return {
            "indices": codes.astype(types.np_uint4_dtype),
            "lut": fp4_lut().reshape(1, 1, 16, 1),
            "scale": scale.reshape(n, k // mxfp4.BLOCK),
        }
    if w.fmt == "int4-g32":
        codes = _codes(w.parts["q"]).astype(np.int8) - 8
        return {
            "data": codes.astype(types.np_int4_dtype),
            "scale": w.parts["scale"].numpy().astype(np.float16).reshape(n, k // INT4_GROUP),
        }
    if w.fmt == "int8-ch":
        return {
            "data": w.parts["q"].numpy(),
            "scale": w.parts["scale"].numpy().astype(np.float16).reshape(n, 1),
        }
    raise ValueError(f"no Core ML storage for weights in format {w.fmt!r}")


def weight(w: torch.Tensor | QTensor, name: str):
    """A MIL value for weight [N, K]: an fp16 constant, or the constexpr chain of its format."""
    mb, _ = _mil()
    if isinstance(w, torch.Tensor):
        return mb.const(val=w.to(torch.float32).numpy().astype(np.float16), name=name)
    p = compressed_parts(w)
    if w.fmt == "mxfp4":
        dense = mb.constexpr_lut_to_dense(indices=p["indices"], lut=p["lut"], name=name + "_lut")
        return mb.constexpr_blockwise_shift_scale(data=dense, scale=p["scale"], name=name)
    return mb.constexpr_blockwise_shift_scale(data=p["data"], scale=p["scale"], name=name)


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy().astype(np.float16)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


def _rms_norm(x, w: torch.Tensor, eps: float, name: str):
    """fp32 RMSNorm of x [1, H]."""
    mb, _ = _mil()
    ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
    inv = mb.rsqrt(x=mb.add(x=ms, y=np.float32(eps)))
    return mb.mul(x=mb.mul(x=x, y=inv), y=_f32(w)[None, :], name=name)


def _rope(x, cos, sin, heads: int, d: int, name: str):
    """NeoX half-split rotation of x fp16 [1, heads·D] → fp16 [1, heads, D] (in fp32)."""
    mb, _ = _mil()
    x = mb.cast(x=mb.reshape(x=x, shape=[1, heads, d]), dtype="fp32")
    h = d // 2
    x1 = mb.slice_by_size(x=x, begin=[0, 0, 0], size=[1, heads, h])
    x2 = mb.slice_by_size(x=x, begin=[0, 0, h], size=[1, heads, h])
    a = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
    b = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))
    return mb.cast(x=mb.concat(values=[a, b], axis=-1), dtype="fp16", name=name)


def attention_function(cfg: GptOssConfig, layer: int, w: dict, context: int, opset):
    """The MIL function of layer `layer`'s attention block and router (see the module doc).
    `w` maps short names (attn_norm, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, sinks, mlp_norm,
    router_w, router_b) to the checkpoint's weights after the recipe."""
    mb, types = _mil()
    h_size, d = cfg.hidden_size, cfg.head_dim
    nh, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = nh // kv
    sliding = cfg.is_sliding(layer)
    slots = cfg.sliding_window if sliding else context
    cos_t, sin_t = (_f32(t) for t in rope_tables(cfg, torch.arange(context)))
    eps = cfg.rms_norm_eps

    @mb.function(
        input_specs=[
            mb.TensorSpec((1, h_size), dtype=types.fp32),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.StateTensorSpec((1, kv, slots, d), dtype=types.fp16),
            mb.StateTensorSpec((1, kv, slots, d), dtype=types.fp16),
        ],
        opset_version=opset,
    )
    def fn(x, pos, k_cache, v_cache):
        xn = mb.cast(x=_rms_norm(x, w["attn_norm"], eps, "attn_norm"), dtype="fp16")
        q = mb.linear(x=xn, weight=weight(w["q_w"], "q_w"), bias=_f16(w["q_b"]), name="q")
        k = mb.linear(x=xn, weight=weight(w["k_w"], "k_w"), bias=_f16(w["k_b"]), name="k")
        v = mb.linear(x=xn, weight=weight(w["v_w"], "v_w"), bias=_f16(w["v_b"]), name="v")
        cos = mb.reshape(x=mb.gather(x=cos_t, indices=pos, axis=0), shape=[1, 1, d // 2])
        sin = mb.reshape(x=mb.gather(x=sin_t, indices=pos, axis=0), shape=[1, 1, d // 2])
        q = _rope(q, cos, sin, nh, d, "q_rope")  # [1, NH, D]
        k = mb.reshape(x=_rope(k, cos, sin, kv, d, "k_rope"), shape=[1, kv, 1, d])
        v = mb.reshape(x=v, shape=[1, kv, 1, d])

        # write this token's key and value into its slot
        slot = mb.mod(x=pos, y=np.int32(slots), name="slot") if sliding else pos
        zero2 = np.zeros(2, dtype=np.int32)
        begin = mb.concat(values=[zero2, slot, np.zeros(1, dtype=np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([1, kv, 1, d], dtype=np.int32))
        keys = mb.slice_update(x=mb.read_state(input=k_cache), update=k, begin=begin, end=end)
        values = mb.slice_update(x=mb.read_state(input=v_cache), update=v, begin=begin, end=end)
        mb.coreml_update_state(state=k_cache, value=keys, name="write_k")
        mb.coreml_update_state(state=v_cache, value=values, name="write_v")

        # which slots hold visible positions
        iota = np.arange(slots, dtype=np.int32)
        if sliding:  # slot s holds position pos - ((pos - s) mod W); visible when ≥ 0
            back = mb.mod(x=mb.sub(x=mb.add(x=pos, y=np.int32(slots)), y=iota), y=np.int32(slots))
            visible = mb.greater_equal(x=mb.sub(x=pos, y=back), y=np.int32(0))
        else:
            visible = mb.less_equal(x=iota, y=pos)
        mask = mb.select(cond=visible, a=np.zeros(slots, np.float32),
                         b=np.full(slots, MASKED, np.float32))
        mask = mb.reshape(x=mask, shape=[1, 1, 1, slots], name="mask")

        qg = mb.reshape(x=mb.mul(x=q, y=np.float16(1 / math.sqrt(d))), shape=[1, kv, g, d])
        scores = mb.matmul(x=qg, y=keys, transpose_y=True)  # [1, KV, G, S]
        scores = mb.add(x=mb.cast(x=scores, dtype="fp32"), y=mask)
        sinks = _f32(w["sinks"]).reshape(1, kv, g, 1)
        probs = mb.softmax(x=mb.concat(values=[scores, sinks], axis=-1), axis=-1)
        probs = mb.slice_by_size(x=probs, begin=[0, 0, 0, 0], size=[1, kv, g, slots])
        out = mb.matmul(x=mb.cast(x=probs, dtype="fp16"), y=values)  # [1, KV, G, D]
        out = mb.reshape(x=out, shape=[1, nh * d])
        o = mb.linear(x=out, weight=weight(w["o_w"], "o_w"), bias=_f16(w["o_b"]), name="o")
        h = mb.add(x=x, y=mb.cast(x=o, dtype="fp32"), name="h")

        m32 = _rms_norm(h, w["mlp_norm"], eps, "mlp_norm")
        logits = mb.linear(x=m32, weight=_f32(w["router_w"]), bias=_f32(w["router_b"]))
        top_v, top_i = mb.topk(x=logits, k=cfg.num_experts_per_tok, axis=-1, name="router_topk")
        weights = mb.softmax(x=top_v, axis=-1, name="w")
        ids = mb.identity(x=top_i, name="ids")
        m = mb.cast(x=m32, dtype="fp16", name="m")
        return h, m, ids, weights

    return fn


def expert_function(cfg: GptOssConfig, gate_up, gate_up_b, down, down_b, opset):
    """One expert: m fp16 [1, H] → y fp16 [1, H]. gate_up [2I, H] has gate and up interleaved
    (gate in even rows), as gpt-oss stores them."""
    mb, types = _mil()
    inter = cfg.intermediate_size
    limit = np.float16(cfg.swiglu_limit)

    @mb.function(input_specs=[mb.TensorSpec((1, cfg.hidden_size), dtype=types.fp16)],
                 opset_version=opset)
    def fn(m):
        gu = mb.linear(x=m, weight=weight(gate_up, "gate_up_w"), bias=_f16(gate_up_b))
        gu = mb.reshape(x=gu, shape=[1, inter, 2])
        gate = mb.reshape(x=mb.slice_by_size(x=gu, begin=[0, 0, 0], size=[1, inter, 1]),
                          shape=[1, inter])
        up = mb.reshape(x=mb.slice_by_size(x=gu, begin=[0, 0, 1], size=[1, inter, 1]),
                        shape=[1, inter])
        gate = mb.minimum(x=gate, y=limit)
        up = mb.clip(x=up, alpha=-limit, beta=limit)
        glu = mb.mul(x=gate, y=mb.sigmoid(x=mb.mul(x=gate, y=np.float16(SWIGLU_ALPHA))))
        act = mb.mul(x=mb.add(x=up, y=np.float16(1)), y=glu)
        return mb.linear(x=act, weight=weight(down, "down_w"), bias=_f16(down_b), name="y")

    return fn


def head_function(cfg: GptOssConfig, norm: torch.Tensor, unembed, opset):
    """h fp32 [1, H] → logits fp32 [1, V]."""
    mb, types = _mil()

    @mb.function(input_specs=[mb.TensorSpec((1, cfg.hidden_size), dtype=types.fp32)],
                 opset_version=opset)
    def fn(h):
        x = mb.cast(x=_rms_norm(h, norm, cfg.rms_norm_eps, "norm"), dtype="fp16")
        logits = mb.linear(x=x, weight=weight(unembed, "unembed_w"))
        return mb.cast(x=logits, dtype="fp32", name="logits")

    return fn
