"""The Core AI artifact's memory: the weights as stored (experts MXFP4 or int4, float tensors in
their stored dtype), fp32 KV states, the weights a call decodes to fp32, the embedding file
memory-mapped by the host."""

from __future__ import annotations

from ossedge.runtime.config import GptOssConfig
from ossedge.targets.coreai import PIECE_ELEMENTS
from ossedge.targets.memory import Footprint, Part, host_parts, kv_cache_bytes, stored_weights


def weights(cfg: GptOssConfig, recipe: str) -> dict[str, int]:
    """Stored bytes by group; kept tensors as stored (bf16)."""
    return stored_weights(cfg, recipe, kept_bytes=2)


def kv_bytes(cfg: GptOssConfig, context: int) -> int:
    return kv_cache_bytes(cfg, context, dtype_bytes=4)


def decoded_bytes(cfg: GptOssConfig) -> int:
    """The most fp32 weight bytes one call holds decoded at once: a decode step's k experts of a
    layer (gate_up, then down), or a piece of the unembedding."""
    h, i, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    experts = k * (2 * i * h + h * i) * 4
    head = min(cfg.vocab_size * h, max(1, PIECE_ELEMENTS // h) * h) * 4
    return max(experts, head)


def coreai_footprint(
    cfg: GptOssConfig, recipe: str, context: int, *, host: str = "app",
    max_prefill: int | None = None,
) -> Footprint:
    """Predicted peak memory of a Core AI artifact: the assets' weights as stored, memory-mapped;
    fp32 KV states; the fp32 weights a call decodes (a decode step's k experts); the embedding
    file. Not validated on an Apple device (the Linux runtime is an interpreter)."""
    w = weights(cfg, recipe)
    f = Footprint("coreai", recipe, context, host)
    f.parts += [
        *host_parts(host, "Core AI runtime"),
        Part("linears", w["linears"] + w["small"] + w["expert_biases"], "mapped",
             "attention, router and head weights as stored"),
        Part("kv_cache", kv_bytes(cfg, context), "anon",
             f"fp32 states: {context} slots in full layers, {cfg.sliding_window} in sliding ones"),
        Part("activations", decoded_bytes(cfg) + cfg.num_attention_heads * context * 4 * 3,
             "anon", "the k chosen experts decoded to fp32, one token's scores and softmax"),
        Part("experts", w["experts"], "mapped", "MXFP4 or int4 bytes, gathered per token"),
        Part("embedding", w["embedding"], "mapped", "embedding.safetensors, one row per token"),
    ]
    return f
