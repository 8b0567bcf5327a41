"""Memory model: the peak footprint of an artifact on a device, by part, and what a decoded token
reads. Two kinds of memory: `anon` (heap: packed linear weights, the KV cache and activations,
the runtime) must stay resident and counts against an app's limit; `mapped` (weights memory-mapped
from the artifact's files, clean pages) is resident while there is room and is paged back in from
flash by the OS when there is not. An artifact *fits* a device when anon + mapped ≤ the app
budget; it *streams* when only anon + a working set of experts fits.

This module holds what every target shares (the parts, the runtime's own bytes, weights grouped
by kind, the KV cache); each target's footprint is in its folder (targets/<t>/memory.py, named by
its registry entry). The ExecuTorch figures are validated against RSS measured on Linux
(tests/test_memory.py for the tiny model, `python -m ossedge.benchmarks.devices_20b` for the 20b);
the Core ML figures follow the artifact's stored bytes and states and are not validated on an
Apple device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ossedge.quantize.qtensor import stored_bytes
from ossedge.quantize.recipes import get_recipe
from ossedge.runtime.checkpoint import logical_tensors
from ossedge.runtime.config import GptOssConfig
from ossedge.targets import TARGETS

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


def grouped(cfg: GptOssConfig, recipe: str, size) -> dict[str, int]:
    """Bytes by group — experts (weights), expert_biases, linears (attention q/k/v/o and the
    unembedding, with their biases), embedding, small (norms, sinks, router) — with
    `size(fmt, name, shape)` the bytes a target stores one tensor in."""

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


def host_parts(host: str, runtime: str) -> list[Part]:
    """The runtime's own heap and code pages for `host` ("python" or "app"), named `runtime`."""
    return [Part("runtime", HOST_BYTES[host][0], "anon", f"{host} host: {runtime} heap"),
            Part("libraries", HOST_BYTES[host][1], "mapped", f"{host} host: runtime code pages")]


def stored_weights(cfg: GptOssConfig, recipe: str, *, kept_bytes: int) -> dict[str, int]:
    """Stored bytes by group (`grouped`). Kept (unquantized) tensors count `kept_bytes` per
    value: what the target stores them as."""

    def size(fmt: str, name: str, shape: tuple[int, ...]) -> int:
        if fmt != "keep":
            return stored_bytes(fmt, shape)
        # a dense embedding table stays as stored (bf16): only its rows are converted
        return math.prod(shape) * (2 if name == "model.embed_tokens.weight" else kept_bytes)

    return grouped(cfg, recipe, size)


def kv_cache_bytes(cfg: GptOssConfig, context: int, *, dtype_bytes: int) -> int:
    """K and V of every layer: `context` slots for full layers, the window for sliding ones."""
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return sum(
        per_slot * (cfg.sliding_window if cfg.is_sliding(i) else context)
        for i in range(cfg.num_hidden_layers)
    )


def footprint(cfg: GptOssConfig, target: str, recipe: str, context: int, **kw) -> Footprint:
    """The predicted peak memory of `target`'s artifact (its registered footprint model; the
    `max_prefill` of the ExecuTorch program, ignored where a target feeds prompts its own way)."""

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[target].footprint(cfg, recipe, context, **kw)


def decode_weight_bytes(cfg: GptOssConfig, target: str, recipe: str) -> int:
    """Weight bytes one decoded token reads: the k selected experts of every layer (with their
    biases), all linear layers and small tensors, one embedding row (the target's stored bytes)."""

    w = TARGETS[target].hook("weights")(cfg, recipe)
    selected = w["experts"] + w["expert_biases"]
    experts = selected * cfg.num_experts_per_tok // cfg.num_local_experts
    return experts + w["linears"] + w["small"] + w["embedding"] // cfg.vocab_size


def decode_read_bytes(cfg: GptOssConfig, target: str, recipe: str, context: int) -> int:
    """Bytes one decoded token reads: its weights (`decode_weight_bytes`) and the KV cache (the
    programs attend over every slot, masked)."""

    kv = TARGETS[target].hook("kv_bytes")(cfg, context)
    return decode_weight_bytes(cfg, target, recipe) + kv
