"""The ExecuTorch artifact's memory: XNNPACK's repacked linears, the fp32 KV cache and the planned
arena on the heap; experts and embedding memory-mapped from model.ptd."""

from __future__ import annotations

from pathlib import Path

from ossedge.runtime.config import GptOssConfig
from ossedge.targets.memory import Footprint, Part, host_parts, kv_cache_bytes, stored_weights



def weights(cfg: GptOssConfig, recipe: str) -> dict[str, int]:
    """Stored bytes by group; kept tensors as fp32 (what the program holds)."""
    return stored_weights(cfg, recipe, kept_bytes=4)


def kv_bytes(cfg: GptOssConfig, context: int) -> int:
    return kv_cache_bytes(cfg, context, dtype_bytes=4)


def executorch_activation_bytes(cfg: GptOssConfig, context: int, max_prefill: int) -> int:
    """The program's activation memory beside the KV cache (memory-planned, fp32). Attention
    (`ossedge::attend`) keeps no scores in the arena, so the peak is one more cache-sized region
    (the planned outputs of the caches' in-place updates) or, when larger, the additive masks of a
    full prefill [G·P, C + P] and [P, C] (G = query heads per KV head), plus the hidden states
    [P, H]. Within 1% of the planned arena of exported programs at context 2048
    (tests/test_devices.py)."""
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    p = max_prefill
    masks = g * p * (context + p) * 4 + p * context * 4
    return max(kv_bytes(cfg, context), masks) + p * cfg.hidden_size * 4


def executorch_footprint(
    cfg: GptOssConfig,
    recipe: str,
    context: int,
    *,
    max_prefill: int | None = None,
    host: str = "app",
) -> Footprint:
    """Predicted peak memory of an ExecuTorch artifact: XNNPACK repacks the linear layers into
    its own heap buffers at load (anon, ≈ their stored bytes; float weights as fp32); the experts,
    their biases and the embedding stay memory-mapped in model.ptd; the KV cache (fp32) and the
    activations live in the program's planned arena (anon)."""
    p = max_prefill or cfg.sliding_window
    w = weights(cfg, recipe)
    f = Footprint("executorch", recipe, context, host)
    f.parts += [
        *host_parts(host, "runtime"),
        Part("linears", w["linears"] + w["small"], "anon",
             "attention and unembedding, repacked by XNNPACK at load; norms, router, sinks"),
        Part("kv_cache", kv_bytes(cfg, context), "anon",
             f"fp32 K/V: {context} slots in full layers, {cfg.sliding_window} in sliding ones"),
        Part("activations", executorch_activation_bytes(cfg, context, p), "anon",
             f"planned arena at the largest prefill ({p} tokens)"),
        Part("experts", w["experts"] + w["expert_biases"], "mapped",
             "expert weights in model.ptd, read in place by the ossedge MoE kernel"),
        Part("embedding", w["embedding"], "mapped", "embedding table in model.ptd"),
    ]
    return f


def program_arena_bytes(pte: str | Path) -> int:
    """The memory-planned arena of an ExecuTorch program's `forward` (KV cache + activations),
    read from the .pte's flatbuffer header without loading its segments."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _get_extended_header

    with open(pte, "rb") as f:
        head = f.read(64)
        eh = _get_extended_header(head)
        size = eh.program_size if eh is not None and eh.is_valid() else None
        f.seek(0)
        data = f.read(size) if size else f.read()
    program = _flatbuffer_to_program(data)
    (plan,) = [p for p in program.execution_plan if p.name == "forward"]
    return sum(plan.non_const_buffer_sizes)
