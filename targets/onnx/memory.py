"""The ONNX artifact's memory in ONNX Runtime: weights memory-mapped from model.onnx.data, fp32 KV
buffers and a prefill chunk's activations on the heap."""

from __future__ import annotations

import math

from ossedge.runtime.config import GptOssConfig
from ossedge.targets.memory import Footprint, Part, grouped, host_parts
from ossedge.targets.onnx import PREFILL_CHUNK

def _onnx_bytes(fmt: str, name: str, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor in an ONNX artifact (targets/onnx/export.py): MXFP4 as int8 blocks of 32
    with fp32 scales, int4 g32 with fp32 scales, int8 rows as int8 blocks of 32 (linears) or int8
    rows with an fp32 scale (embedding), everything kept as fp32."""
    n = math.prod(shape)
    if fmt == "mxfp4":
        return n + n // 32 * 4
    if fmt == "int4-g32":
        return n // 2 + n // 32 * 4
    if fmt == "int8-ch":
        return n + (n // shape[-1] * 4 if name == "model.embed_tokens.weight" else n // 32 * 4)
    return n * 4


def onnx_weights(cfg: GptOssConfig, recipe: str) -> dict[str, int]:
    """As `stored_weights`, for the ONNX target's storage."""
    return grouped(cfg, recipe, _onnx_bytes)


def onnx_kv_bytes(cfg: GptOssConfig, context: int) -> int:
    """The runtime's KV buffers: fp32, `context` slots in every layer (sliding ones too)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * cfg.head_dim * 4


def onnx_footprint(cfg: GptOssConfig, recipe: str, context: int, *, host: str = "app",
                   max_prefill: int | None = None) -> Footprint:
    """Predicted peak memory of an ONNX artifact in ONNX Runtime with prepacking off: every weight
    stays in the memory-mapped model.onnx.data (checked: a 410 MB initializer adds 8 MB of RSS);
    the KV buffers, a prefill chunk's logits and GroupQueryAttention's scores are heap."""
    p = PREFILL_CHUNK  # tokens per call
    w = onnx_weights(cfg, recipe)
    f = Footprint("onnx", recipe, context, host)
    f.parts += [
        *host_parts(host, "ONNX Runtime"),
        Part("linears", w["linears"] + w["small"] + w["expert_biases"], "mapped",
             "attention, router and unembedding (MatMulNBits or fp32), mapped"),
        Part("kv_cache", onnx_kv_bytes(cfg, context), "anon",
             f"fp32 [1, KV, {context}, D] per layer, bound as past and present"),
        Part("activations", p * cfg.vocab_size * 4 + cfg.num_attention_heads * p * context * 4,
             "anon", f"a {p}-token prefill's logits and attention scores"),
        Part("experts", w["experts"], "mapped", "QMoE weights: int8 blocks (MXFP4) or int4"),
        Part("embedding", w["embedding"], "mapped", "one row per token"),
    ]
    return f




weights, kv_bytes = onnx_weights, onnx_kv_bytes
