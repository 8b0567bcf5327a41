"""`ossedge inspect`: what a checkpoint is, how big, and whether it is valid."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ossedge.quantize import mxfp4
from ossedge.runtime.checkpoint import logical_tensors, open_checkpoint


def parameter_counts(cfg) -> tuple[int, int]:
    """(total, active per token), from the logical shapes: the same for every storage format.
    Active counts the top-k experts and excludes the embedding lookup, as OpenAI counts (3.6 B
    for gpt-oss-20b)."""
    total = expert = 0
    for name, shape in logical_tensors(cfg):
        n = math.prod(shape)
        total += n
        if ".mlp.experts." in name:
            expert += n
    embed = cfg.vocab_size * cfg.hidden_size
    inactive = expert * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    return total, total - inactive - embed


def mxfp4_census(ckpt, *, sample_codes: bool = True) -> dict[str, Any] | None:
    """Scale-exponent range over every MXFP4 tensor, and the E2M1 code histogram of each tensor's
    first expert (a sample: counting every code of the 20b would read all 12 GB)."""
    blocks = [n for n in ckpt.names() if n.endswith("_blocks")]
    if not blocks:
        return None
    scale_hist = torch.zeros(256, dtype=torch.long)
    code_hist = torch.zeros(16, dtype=torch.long)
    values = 0
    for name in blocks:
        scales = ckpt.get(name.replace("_blocks", "_scales"))
        scale_hist += torch.bincount(scales.reshape(-1).to(torch.int32), minlength=256)
        values += scales.numel() * mxfp4.BLOCK
        if sample_codes:
            b = ckpt.get(name)[0].reshape(-1)
            code_hist += torch.bincount((b & 0xF).to(torch.int32), minlength=16)
            code_hist += torch.bincount((b >> 4).to(torch.int32), minlength=16)
    used = torch.nonzero(scale_hist).flatten()
    nbytes = sum(ckpt.nbytes(n) + ckpt.nbytes(n.replace("_blocks", "_scales")) for n in blocks)
    return {
        "tensors": len(blocks),
        "values": values,
        "bytes": nbytes,
        "bits_per_weight": 8 * nbytes / values,
        "scale_exponent_min": int(used.min()) - mxfp4.SCALE_BIAS,
        "scale_exponent_max": int(used.max()) - mxfp4.SCALE_BIAS,
        "code_histogram_sampled": code_hist.tolist() if sample_codes else None,
    }


def summarize(path: str | Path) -> dict[str, Any]:
    """Everything `inspect` reports. A quantized checkpoint's sha256 checksums are verified."""
    ckpt = open_checkpoint(path, verify=True)
    cfg = ckpt.config
    by_dtype: Counter[str] = Counter()
    for name in ckpt.names():
        by_dtype[str(ckpt.entry(name).dtype).removeprefix("torch.")] += ckpt.nbytes(name)
    total, active = parameter_counts(cfg)
    sliding = sum(cfg.is_sliding(n) for n in range(cfg.num_hidden_layers))
    return {
        "path": str(ckpt.root),
        "layout": ckpt.layout,
        "experts": ckpt.expert_format,
        "files": [p.name for p in ckpt.files],
        "file_bytes": sum(p.stat().st_size for p in ckpt.files),
        "config": {
            "layers": cfg.num_hidden_layers,
            "sliding_layers": sliding,
            "sliding_window": cfg.sliding_window,
            "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "experts": cfg.num_local_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
            "max_context": cfg.max_position_embeddings,
            "rope": f"yarn x{cfg.rope_scaling.factor:g} theta {cfg.rope_theta:g} "
            f"truncate={cfg.rope_scaling.truncate}",
        },
        "parameters": {"total": total, "active": active},
        "bytes_by_dtype": dict(by_dtype),
        "mxfp4": mxfp4_census(ckpt),
        "quantization": _quantization(ckpt),
        "validation": f"ok: {len(ckpt.names())} tensors present with the expected shapes and dtypes"
        + ("; every sha256 matches the manifest" if ckpt.layout == "quantized" else ""),
    }


def _quantization(ckpt) -> dict[str, Any] | None:
    if ckpt.layout != "quantized":
        return None
    m = ckpt.manifest
    return {
        "recipe": ckpt.recipe,
        "tensors_by_format": dict(Counter(ckpt.formats.values())),
        "bytes_by_format": m.get("bytes_by_format", {}),
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def format_summary(s: dict[str, Any]) -> str:
    c = s["config"]
    lines = [
        f"{s['path']}  ({s['layout']} layout, experts {s['experts']}, {len(s['files'])} file(s), "
        f"{_human(s['file_bytes'])})",
        f"  layers {c['layers']} ({c['sliding_layers']} sliding, window {c['sliding_window']}), "
        f"hidden {c['hidden_size']}, heads {c['heads']}q/{c['kv_heads']}kv x {c['head_dim']}",
        f"  experts {c['experts']} (top-{c['experts_per_token']}), intermediate "
        f"{c['intermediate_size']}, vocab {c['vocab_size']}, context {c['max_context']}, {c['rope']}",
        f"  parameters {_count(s['parameters']['total'])} total, "
        f"{_count(s['parameters']['active'])} active per token (embedding lookup excluded)",
        "  bytes by dtype: "
        + ", ".join(f"{k} {_human(v)}" for k, v in sorted(s["bytes_by_dtype"].items())),
    ]
    m = s["mxfp4"]
    if m:
        lines.append(
            f"  mxfp4: {m['tensors']} tensors, {_count(m['values'])} values, "
            f"{_human(m['bytes'])} ({m['bits_per_weight']:.2f} bits/weight), scale exponents "
            f"{m['scale_exponent_min']}..{m['scale_exponent_max']}"
        )
    q = s.get("quantization")
    if q:
        lines.append(
            f"  recipe {q['recipe']}: "
            + ", ".join(
                f"{f} {n} tensors {_human(q['bytes_by_format'].get(f, 0))}"
                for f, n in sorted(q["tensors_by_format"].items())
            )
        )
    lines.append(f"  validation: {s['validation']}")
    return "\n".join(lines)
