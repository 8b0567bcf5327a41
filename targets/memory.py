"""Memory model: the peak footprint of an artifact on a device, by part, and what a decoded token
reads. Two kinds of memory: `anon` (heap: packed linear weights, the KV cache and activations,
the runtime) must stay resident and counts against an app's limit; `mapped` (weights memory-mapped
from the artifact's files, clean pages) is resident while there is room and is paged back in from
flash by the OS when there is not. An artifact *fits* a device when anon + mapped ≤ the app
budget; it *streams* when only anon + a working set of experts fits.

The ExecuTorch figures are validated against RSS measured on Linux (tests/test_memory.py for the
tiny model, `python -m ossedge.benchmarks.devices_20b` for the 20b); the Core ML figures follow the
artifact's stored bytes and states and are not validated on an Apple device.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field

from ossedge.runtime.checkpoint import logical_tensors
from ossedge.runtime.config import GptOssConfig

# The runtime itself, as (heap, mapped library pages). python: this process with torch, the
# executorch pybindings and the ossedge kernels imported and a program initialized (measured on
# Linux x86-64, 2026-12-01: 0.30 GB of heap; the libraries' file-backed pages 0.09-0.15 GB, by
# what the page cache holds). app: the native ExecuTorch or Core ML runtime, XNNPACK and a
# tokenizer inside an app (estimate; the native benchmark runner alone peaks near 20 MB).
HOST_BYTES = {"python": (300_000_000, 150_000_000), "app": (130_000_000, 20_000_000)}
# Fraction of the experts a streaming run keeps in the page cache at least: below it, each token's
# experts are read from flash again.
STREAM_MIN_EXPERT_FRACTION = 0.15


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    kind: str  # "anon" | "mapped"
    note: str


@dataclass
class Footprint:
    target: str
    recipe: str
    context: int
    host: str
    parts: list[Part] = field(default_factory=list)

    def total(self, kind: str | None = None) -> int:
        return sum(p.bytes for p in self.parts if kind is None or p.kind == kind)

    @property
    def anon(self) -> int:
        return self.total("anon")

    @property
    def mapped(self) -> int:
        return self.total("mapped")

    @property
    def resident(self) -> int:
        """Peak with nothing paged out: what RSS reaches once every weight has been touched."""
        return self.anon + self.mapped

    def part(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    @property
    def streaming_minimum(self) -> int:
        """The least memory a run with experts paged from flash needs: anon, the non-expert mapped
        weights, and a working set of the experts."""
        experts = self.part("experts")
        return self.resident - experts + int(experts * STREAM_MIN_EXPERT_FRACTION)


def _grouped(cfg: GptOssConfig, recipe: str, size) -> dict[str, int]:
    """Bytes by group — experts (weights), expert_biases, linears (attention q/k/v/o and the
    unembedding, with their biases), embedding, small (norms, sinks, router) — with
    `size(fmt, name, shape)` the bytes a target stores one tensor in."""
    from ossedge.quantize.recipes import get_recipe

    rec = get_recipe(recipe)
    out = dict.fromkeys(("experts", "expert_biases", "linears", "embedding", "small"), 0)
    for name, shape in logical_tensors(cfg):
        n = size(rec.format_for(name, shape), name, shape)
        if ".experts." in name:
            out["expert_biases" if name.endswith("_bias") else "experts"] += n
        elif name == "model.embed_tokens.weight":
            out["embedding"] += n
        elif "_proj." in name or name == "lm_head.weight":
            out["linears"] += n
        else:
            out["small"] += n
    return out


def _weights(cfg: GptOssConfig, recipe: str, *, kept_bytes: int) -> dict[str, int]:
    """Stored bytes by group (`_grouped`). Kept (unquantized) tensors count `kept_bytes` per
    value: what the target stores them as."""
    from ossedge.quantize.qtensor import stored_bytes

    def size(fmt: str, name: str, shape: tuple[int, ...]) -> int:
        if fmt != "keep":
            return stored_bytes(fmt, shape)
        # a dense embedding table stays as stored (bf16): only its rows are converted
        return math.prod(shape) * (2 if name == "model.embed_tokens.weight" else kept_bytes)

    return _grouped(cfg, recipe, size)


def kv_cache_bytes(cfg: GptOssConfig, context: int, *, dtype_bytes: int) -> int:
    """K and V of every layer: `context` slots for full layers, the window for sliding ones."""
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return sum(
        per_slot * (cfg.sliding_window if cfg.is_sliding(i) else context)
        for i in range(cfg.num_hidden_layers)
    )


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
    return max(kv_cache_bytes(cfg, context, dtype_bytes=4), masks) + p * cfg.hidden_size * 4


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
    w = _weights(cfg, recipe, kept_bytes=4)
    f = Footprint("executorch", recipe, context, host)
    f.parts += [
        Part("runtime", HOST_BYTES[host][0], "anon", f"{host} host: runtime heap"),
        Part("libraries", HOST_BYTES[host][1], "mapped", f"{host} host: runtime code pages"),
        Part("linears", w["linears"] + w["small"], "anon",
             "attention and unembedding, repacked by XNNPACK at load; norms, router, sinks"),
        Part("kv_cache", kv_cache_bytes(cfg, context, dtype_bytes=4), "anon",
             f"fp32 K/V: {context} slots in full layers, {cfg.sliding_window} in sliding ones"),
        Part("activations", executorch_activation_bytes(cfg, context, p), "anon",
             f"planned arena at the largest prefill ({p} tokens)"),
        Part("experts", w["experts"] + w["expert_biases"], "mapped",
             "expert weights in model.ptd, read in place by the ossedge MoE kernel"),
        Part("embedding", w["embedding"], "mapped", "embedding table in model.ptd"),
    ]
    return f


def coreml_footprint(
    cfg: GptOssConfig, recipe: str, context: int, *, host: str = "app", max_prefill: int | None = None
) -> Footprint:
    """Predicted peak memory of a Core ML artifact: every function's weights as stored
    (compressed: Core ML expands constexpr weights as a function runs), fp16 KV states, the
    embedding file memory-mapped by the host. Not validated on an Apple device."""
    w = _weights(cfg, recipe, kept_bytes=2)
    f = Footprint("coreml", recipe, context, host)
    f.parts += [
        Part("runtime", HOST_BYTES[host][0], "anon", f"{host} host: Core ML runtime heap"),
        Part("libraries", HOST_BYTES[host][1], "mapped", f"{host} host: runtime code pages"),
        Part("linears", w["linears"] + w["small"] + w["expert_biases"], "mapped",
             "attention, router and head functions' weights"),
        Part("kv_cache", kv_cache_bytes(cfg, context, dtype_bytes=2), "anon",
             f"fp16 states: {context} slots in full layers, {cfg.sliding_window} in sliding ones"),
        Part("activations", cfg.num_attention_heads * context * 4 * 3, "anon",
             "one token's scores and softmax per call"),
        Part("experts", w["experts"], "mapped", "one function per expert, MXFP4 or int4"),
        Part("embedding", w["embedding"], "mapped", "embedding.safetensors, one row per token"),
    ]
    return f


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
    """As `_weights`, for the ONNX target's storage."""
    return _grouped(cfg, recipe, _onnx_bytes)


def onnx_kv_bytes(cfg: GptOssConfig, context: int) -> int:
    """The runtime's KV buffers: fp32, `context` slots in every layer (sliding ones too)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * cfg.head_dim * 4


def onnx_footprint(cfg: GptOssConfig, recipe: str, context: int, *, host: str = "app",
                   max_prefill: int | None = None) -> Footprint:
    """Predicted peak memory of an ONNX artifact in ONNX Runtime with prepacking off: every weight
    stays in the memory-mapped model.onnx.data (checked: a 410 MB initializer adds 8 MB of RSS);
    the KV buffers, a prefill chunk's logits and GroupQueryAttention's scores are heap."""
    from ossedge.targets.onnx import PREFILL_CHUNK as p  # tokens per call

    w = onnx_weights(cfg, recipe)
    f = Footprint("onnx", recipe, context, host)
    f.parts += [
        Part("runtime", HOST_BYTES[host][0], "anon", f"{host} host: ONNX Runtime heap"),
        Part("libraries", HOST_BYTES[host][1], "mapped", f"{host} host: runtime code pages"),
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


def footprint(cfg: GptOssConfig, target: str, recipe: str, context: int, **kw) -> Footprint:
    """The predicted peak memory of `target`'s artifact (its registered footprint model; the
    `max_prefill` of the ExecuTorch program, ignored where a target feeds prompts its own way)."""
    from ossedge.targets import TARGETS

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[target].footprint(cfg, recipe, context, **kw)


def decode_weight_bytes(cfg: GptOssConfig, target: str, recipe: str) -> int:
    """Weight bytes one decoded token reads: the k selected experts of every layer (with their
    biases), all linear layers and small tensors, one embedding row."""
    if target == "onnx":
        w = onnx_weights(cfg, recipe)
    else:
        w = _weights(cfg, recipe, kept_bytes=4 if target == "executorch" else 2)
    selected = w["experts"] + w["expert_biases"]
    experts = selected * cfg.num_experts_per_tok // cfg.num_local_experts
    return experts + w["linears"] + w["small"] + w["embedding"] // cfg.vocab_size


def decode_read_bytes(cfg: GptOssConfig, target: str, recipe: str, context: int) -> int:
    """Bytes one decoded token reads: its weights (`decode_weight_bytes`) and the KV cache (the
    programs attend over every slot, masked)."""
    if target == "onnx":
        kv = onnx_kv_bytes(cfg, context)
    else:
        kv = kv_cache_bytes(cfg, context, dtype_bytes=4 if target == "executorch" else 2)
    return decode_weight_bytes(cfg, target, recipe) + kv


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
