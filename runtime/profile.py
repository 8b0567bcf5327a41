"""Routing profiles: how often each layer's router selects each expert over a text, measured with
the reference runtime. An expert cache pins the most frequent experts from it; the planner reads
its hit rate for a budget from it.

A profile is JSON: {"format": "ossedge-expert-profile", "version": 1, "layers", "experts",
"top_k", "tokens", "text", "counts": [[int] * E] * L, "frequencies": [[float] * E] * L (each
row sums to 1), "top_quarter_share": [float] * L (the share of a layer's selections taken by its
most selected quarter of experts: 8 of gpt-oss-20b's 32; 0.25 when routing is uniform)}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ossedge.runtime.errors import OssedgeError
from ossedge.runtime.model import Experts, linear

FORMAT = "ossedge-expert-profile"
VERSION = 1


class ProfileError(OssedgeError):
    """A routing profile is malformed or belongs to another model."""


def profile_experts(model, ids: list[int], *, window: int = 256, progress: bool = False
                    ) -> list[list[int]]:  # fmt: skip
    """Selection counts [L][E] of the reference `model` over token `ids`, fed in windows of
    `window` tokens (each from its own start)."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long)
    hooks = []
    layer_of = {}
    for n, m in enumerate(mod for mod in model.modules() if isinstance(mod, Experts)):
        layer_of[id(m)] = n

        def hook(mod, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            logits = linear(x, mod.router_w, mod.router_b)
            top = torch.topk(logits, cfg.num_experts_per_tok, dim=-1).indices
            counts[layer_of[id(mod)]] += torch.bincount(top.reshape(-1),
                                                        minlength=cfg.num_local_experts)

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            spans = range(0, len(ids), window)
            for a in tqdm(spans, desc="profile", unit="window", disable=not progress):
                chunk = torch.tensor([ids[a : a + window]])
                model(chunk)
    finally:
        for h in hooks:
            h.remove()
    return counts.tolist()


def make_profile(counts: list[list[int]], *, top_k: int, tokens: int, text: str) -> dict[str, Any]:
    freqs = []
    for row in counts:
        total = sum(row)
        freqs.append([c / total if total else 0.0 for c in row])
    return {
        "format": FORMAT,
        "version": VERSION,
        "layers": len(counts),
        "experts": len(counts[0]) if counts else 0,
        "top_k": top_k,
        "tokens": tokens,
        "text": text,
        "counts": counts,
        "frequencies": freqs,
        "top_quarter_share": [round(sum(sorted(f, reverse=True)[: max(1, len(f) // 4)]), 4)
                              for f in freqs],
    }


def read_profile(path: str | Path, *, layers: int, experts: int) -> dict[str, Any]:
    """A profile file, checked to belong to a model with `layers` × `experts`."""
    path = Path(path)
    try:
        p = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile; make one with `ossedge profile-experts`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path}: unreadable ({e}); make it again with `ossedge profile-experts`"
                           ) from None  # fmt: skip
    check_profile(p, layers=layers, experts=experts, where=str(path))
    return p


def check_profile(p: Any, *, layers: int, experts: int, where: str) -> None:
    if not isinstance(p, dict) or p.get("format") != FORMAT:
        raise ProfileError(f"{where}: not an ossedge expert profile")
    freqs = p.get("frequencies")
    ok = (
        isinstance(freqs, list)
        and len(freqs) == layers
        and all(isinstance(r, list) and len(r) == experts for r in freqs)
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for r in freqs for v in r)
    )
    if not ok:
        shape = (f"{len(freqs)} layers" if isinstance(freqs, list) else "no frequencies")
        raise ProfileError(
            f"{where}: a profile of {layers} layers × {experts} experts is needed, it has "
            f"{shape}; profile this model with `ossedge profile-experts`"
        )


def hit_rate(frequencies: list[list[float]], slots: int, *, lru_share: float = 0.0) -> float:
    """Expected share of expert selections served from a cache that pins the `slots` most frequent
    experts of all layers (static; the LRU part is counted as pinned by frequency too, which
    under-counts reuse). Uniform frequencies give slots / (L·E)."""
    flat = sorted((f for row in frequencies for f in row), reverse=True)
    layers = len(frequencies)
    if not flat or layers == 0:
        return 0.0
    return min(1.0, sum(flat[: max(0, slots)]) / layers)
