"""The Core ML artifact's memory: every function's weights as stored, fp16 KV states, the embedding
file memory-mapped by the host."""

from __future__ import annotations

from ossedge.runtime.config import GptOssConfig
from ossedge.targets.memory import Footprint, Part, host_parts, kv_cache_bytes, stored_weights



def weights(cfg: GptOssConfig, recipe: str) -> dict[str, int]:
    """Stored bytes by group; kept tensors as fp16."""
    return stored_weights(cfg, recipe, kept_bytes=2)


def kv_bytes(cfg: GptOssConfig, context: int) -> int:
    return kv_cache_bytes(cfg, context, dtype_bytes=2)


def coreml_footprint(
    cfg: GptOssConfig, recipe: str, context: int, *, host: str = "app",
    max_prefill: int | None = None,
) -> Footprint:
    """Predicted peak memory of a Core ML artifact: every function's weights as stored
    (compressed: Core ML expands constexpr weights as a function runs), fp16 KV states, the
    embedding file memory-mapped by the host. Not validated on an Apple device."""
    w = weights(cfg, recipe)
    f = Footprint("coreml", recipe, context, host)
    f.parts += [
        *host_parts(host, "Core ML runtime"),
        Part("linears", w["linears"] + w["small"] + w["expert_biases"], "mapped",
             "attention, router and head functions' weights"),
        Part("kv_cache", kv_bytes(cfg, context), "anon",
             f"fp16 states: {context} slots in full layers, {cfg.sliding_window} in sliding ones"),
        Part("activations", cfg.num_attention_heads * context * 4 * 3, "anon",
             "one token's scores and softmax per call"),
        Part("experts", w["experts"], "mapped", "one function per expert, MXFP4 or int4"),
        Part("embedding", w["embedding"], "mapped", "embedding.safetensors, one row per token"),
    ]
    return f


