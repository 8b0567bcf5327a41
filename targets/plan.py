"""What fits where: for a device and a model, every target × recipe the device runs, with its
predicted footprint (targets.memory), whether it fits resident, streams its experts from flash, or
does not fit, the largest context that fits, and the bandwidth-bound decode ceiling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ossedge.quantize.recipes import DEFAULT_RECIPE, get_recipe
from ossedge.runtime.checkpoint import detect_layout
from ossedge.runtime.config import (
    DEFAULT_CONTEXT,
    GptOssConfig,
    config_from_hf_dict,
    load_config,
    preset,
)
from ossedge.runtime.errors import BudgetError, OssedgeError
from ossedge.runtime.profile import hit_rate
from ossedge.targets import TARGETS, artifact_format
from ossedge.targets.devices import Device
from ossedge.targets.executorch.memory import executorch_footprint
from ossedge.targets.executorch.pack import Layout
from ossedge.targets.memory import Footprint, decode_read_bytes, footprint

# Best quality first: `convert --device` takes the first that fits.
RECIPE_PREFERENCE = ("native", "mobile-int8", "mobile", "int4")
# The smallest context `convert --device` accepts when it picks one.
MIN_CONTEXT = 512
FITS = ("resident", "streaming", "no")


@dataclass
class Option:
    target: str
    recipe: str
    deployment_target: str | None
    footprint: Footprint
    fits: str  # "resident" | "streaming" | "no"
    max_context_resident: int
    max_context_streaming: int
    decode_tok_s_ceiling: float  # from memory bandwidth (and flash reads when streaming)
    streaming: dict[str, Any] | None = None  # the expert cache's prediction when streaming

    def to_dict(self) -> dict[str, Any]:
        f = self.footprint
        return {
            "target": self.target,
            "recipe": self.recipe,
            "deployment_target": self.deployment_target,
            "context": f.context,
            "fits": self.fits,
            "anon_bytes": f.anon,
            "mapped_bytes": f.mapped,
            "resident_bytes": f.resident,
            "streaming_minimum_bytes": f.streaming_minimum,
            "max_context_resident": self.max_context_resident,
            "max_context_streaming": self.max_context_streaming,
            "decode_tok_s_ceiling": round(self.decode_tok_s_ceiling, 2),
            "streaming": self.streaming,
            "parts": [p.__dict__ for p in f.parts],
        }


def recipes_for(target: str, device: Device) -> list[tuple[str, str | None]]:
    """(recipe, deployment target) pairs the device can run for `target`, best first: the
    target's own choice where it has one (Core ML: by the device's deployment target), else every
    recipe where the device runs the target."""
    own = TARGETS[target].hook("plan_recipes")
    if own is not None:
        return own(device, RECIPE_PREFERENCE)
    return [(r, None) for r in RECIPE_PREFERENCE] if device.runs(target) else []


def _largest_context(cfg: GptOssConfig, fits) -> int:
    """Largest context in [1, max_position_embeddings] with fits(context) true (monotone), or 0."""
    lo, hi = 0, cfg.max_position_embeddings
    if fits(hi):
        return hi
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


CACHE_MARGIN = 256 << 20  # what the hosts leave free under the limit (runtime/expert_cache.py)


def expert_stride(cfg: GptOssConfig, recipe: str) -> int:
    """Bytes of one packed expert (one extent of a version-2 ExecuTorch artifact)."""

    shape = (cfg.num_local_experts, 2 * cfg.intermediate_size, cfg.hidden_size)
    fmt = get_recipe(recipe).format_for("model.layers.0.mlp.experts.gate_up_proj", shape)
    return Layout(fmt if fmt in ("mxfp4", "int4-g32") else "mxfp4", cfg.hidden_size,
                  cfg.intermediate_size).stride


def streaming_decode(cfg: GptOssConfig, f: Footprint, budget: int, *, storage_gbs: float,
                     compute_s: float, frequencies: list[list[float]] | None = None,
                     ) -> dict[str, Any]:  # fmt: skip
    """The expert cache's decode under `budget`: the cache gets the budget minus the resident
    rest (everything but the experts and the embedding, which is read by row) and a margin; its
    hit rate is the share of selections its slots serve (the profile's most frequent experts, or
    slots / all experts for uniform routing); each miss reads one expert at `storage_gbs`, after
    `compute_s` of computing the token."""

    stride = expert_stride(cfg, f.recipe)
    every = cfg.num_hidden_layers * cfg.num_local_experts
    rest = f.resident - f.part("experts") - f.part("embedding")
    cache = max(0, budget - rest - CACHE_MARGIN)
    slots = min(every, cache // stride)
    hit = hit_rate(frequencies, slots) if frequencies else slots / every
    misses = cfg.num_hidden_layers * cfg.num_experts_per_tok * (1 - hit)
    io_s = misses * stride / (storage_gbs * 1e9)
    return {"cache_bytes": slots * stride, "slots": slots, "hit_rate": round(hit, 4),
            "misses_per_token": round(misses, 2), "read_bytes_per_token": int(misses * stride),
            "decode_tok_s": round(1 / (compute_s + io_s), 3)}  # fmt: skip


def streamed_fraction(f: Footprint, budget: int) -> float:
    """Share of the experts that cannot stay in the page cache under `budget` (0 when it fits)."""
    experts = f.part("experts")
    room = budget - (f.resident - experts)
    return 0.0 if room >= experts else min(1.0, 1.0 - max(room, 0) / experts)


def evaluate(
    device: Device,
    cfg: GptOssConfig,
    target: str,
    recipe: str,
    context: int,
    *,
    deployment_target: str | None = None,
    max_prefill: int | None = None,
    frequencies: list[list[float]] | None = None,
) -> Option:
    budget = device.app_budget

    def fp(c: int) -> Footprint:
        return footprint(cfg, target, recipe, c, max_prefill=max_prefill)

    f = fp(context)
    stream_ok = TARGETS[target].streams
    if f.resident <= budget:
        fits = "resident"
    elif stream_ok and f.streaming_minimum <= budget:
        fits = "streaming"
    else:
        fits = "no"
    read = decode_read_bytes(cfg, target, recipe, context)
    seconds = read / (device.bandwidth_gbs * 1e9)
    streaming = None
    if fits == "streaming":
        # ExecuTorch streams through the expert cache; the speed follows its misses
        streaming = streaming_decode(cfg, f, budget, storage_gbs=device.storage_read_gbs,
                                     compute_s=seconds, frequencies=frequencies)  # fmt: skip
        seconds = 1 / streaming["decode_tok_s"]
    return Option(
        target=target,
        recipe=recipe,
        deployment_target=deployment_target,
        footprint=f,
        fits=fits,
        max_context_resident=_largest_context(cfg, lambda c: fp(c).resident <= budget),
        max_context_streaming=(
            _largest_context(cfg, lambda c: fp(c).streaming_minimum <= budget) if stream_ok else 0
        ),
        decode_tok_s_ceiling=1.0 / seconds,
        streaming=streaming,
    )


def plan(
    device: Device,
    cfg: GptOssConfig,
    *,
    targets: tuple[str, ...] = tuple(TARGETS),
    recipes: tuple[str, ...] | None = None,
    context: int | None = None,
    max_prefill: int | None = None,
    frequencies: list[list[float]] | None = None,
) -> list[Option]:
    """Every (target, recipe) the device runs, evaluated at `context` (default 4096, at most the
    model's); `frequencies` (a routing profile's) set the expert cache's hit rate."""
    context = context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if not 1 <= context <= cfg.max_position_embeddings:
        raise OssedgeError(
            f"--context must be 1..{cfg.max_position_embeddings} for this model, got {context}"
        )
    out = []
    for target in targets:
        for recipe, dt in recipes_for(target, device):
            if recipes is None or recipe in recipes:
                out.append(evaluate(device, cfg, target, recipe, context, deployment_target=dt,
                                    max_prefill=max_prefill, frequencies=frequencies))
    return out


def choose(
    device: Device,
    cfg: GptOssConfig,
    target: str,
    *,
    recipe: str | None = None,
    context: int | None = None,
    max_prefill: int | None = None,
    force: bool = False,
) -> Option:
    """What `convert --device` builds: the given recipe, or the best-quality one that fits
    resident (else streaming); the given context, or the largest that fits, at most 4096.
    BudgetError (exit 4) when nothing fits, unless `force` (then the given or default choice)."""
    recipes = [r for r, _ in recipes_for(target, device) if recipe is None or r == recipe]
    if not recipes:
        why = (f"recipe {recipe} is not available for {target} on it" if recipe
               else f"it does not run {target}")
        raise BudgetError(f"{device.name}: {why}; see `ossedge plan --device {device.name}`")
    default_ctx = min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    dt = dict(recipes_for(target, device)).get
    candidates = []  # (rank, option): resident in preference order, then the fastest streaming
    for i, r in enumerate(recipes):
        probe = evaluate(device, cfg, target, r, context or default_ctx,
                         deployment_target=dt(r), max_prefill=max_prefill)
        if context is None:
            for kind, limit in (("resident", probe.max_context_resident),
                                ("streaming", probe.max_context_streaming)):
                c = min(limit, default_ctx)
                if c >= min(MIN_CONTEXT, default_ctx):
                    probe = evaluate(device, cfg, target, r, c, deployment_target=dt(r),
                                     max_prefill=max_prefill)
                    break
        if probe.fits != "no":
            rank = (0, i) if probe.fits == "resident" else (1, -probe.decode_tok_s_ceiling)
            candidates.append((rank, probe))
    if candidates:
        return min(candidates, key=lambda x: x[0])[1]
    r = recipe or (DEFAULT_RECIPE if DEFAULT_RECIPE in recipes else recipes[-1])
    fallback = evaluate(device, cfg, target, r, context or default_ctx, deployment_target=dt(r),
                        max_prefill=max_prefill)
    if force:
        return fallback
    raise BudgetError(
        f"{target} recipe {fallback.recipe} at context {fallback.footprint.context} needs "
        f"{fallback.footprint.resident / 1e9:.2f} GB ({fallback.footprint.anon / 1e9:.2f} GB of "
        f"it heap), more than {device.name}'s app budget of {device.app_budget_gb} GB; pick a "
        "smaller --max-context or recipe (see `ossedge plan`), or --force to build it anyway"
    )


def measured_streaming() -> dict[str, Any] | None:
    """Expert-streaming runs measured on this project's Linux machine under memory cgroup limits
    (the summary `python -m ossedge.benchmarks.streaming_20b` writes), or None."""
    f = resources.files("ossedge.targets").joinpath("data/streaming.json")
    return json.loads(f.read_text()) if f.is_file() else None


def predicted_rows(measured: dict[str, Any]) -> list[dict[str, Any]]:
    """The measured expert-cache runs beside what `streaming_decode` predicts for the same limit,
    disk rate and unconstrained speed (the 20b, recipe mobile, context 4096, app host)."""

    cfg, _ = model_config(None)
    f = executorch_footprint(cfg, "mobile", 4096)
    base = measured["unconstrained_decode_tok_s"]
    rows = []
    for r in measured["runs"]:
        if r.get("mode") != "cache" or not r.get("limit_gib") or not r.get("decode_tok_s"):
            continue
        disk = r.get("cache_disk_gbps") or r["disk_read_gbps"]
        p = streaming_decode(cfg, f, r["limit_gib"] << 30, storage_gbs=disk, compute_s=1 / base)
        rows.append({"limit_gib": r["limit_gib"], "measured_tok_s": r["decode_tok_s"],
                     "measured_hit_rate": r["hit_rate"], "predicted_tok_s": p["decode_tok_s"],
                     "predicted_hit_rate": p["hit_rate"], "disk_read_gbps": disk})
    return rows


def artifact_settings(path: str | Path | None) -> dict[str, Any]:
    """For an ossedge artifact: its target, recipe and context (what `plan` evaluates by
    default); {} for anything else."""

    if path is None or not artifact_format(path):
        return {}
    m = json.loads((Path(path) / "manifest.json").read_text())
    return {"target": artifact_format(path), "recipe": m.get("recipe"),
            "context": m.get("max_context"),
            "frequencies": (m.get("expert_profile") or {}).get("frequencies")}


def model_config(path: str | Path | None) -> tuple[GptOssConfig, str]:
    """(config, label) of a checkpoint, quantized checkpoint, artifact or config.json; None: the
    released gpt-oss-20b."""

    if path is None:
        return preset("20b"), "gpt-oss-20b"
    p = Path(path)
    manifest = p / "manifest.json"
    if manifest.is_file():
        try:
            d = json.loads(manifest.read_text())
        except ValueError as e:
            raise OssedgeError(f"{manifest}: unreadable ({e})") from None
        if isinstance(d, dict) and isinstance(d.get("config"), dict):
            return config_from_hf_dict(d["config"], str(manifest)), str(p)
    if p.suffix == ".json" and p.is_file():
        return load_config(p), str(p)

    root, _ = detect_layout(p)  # a clear error for a path that is no model
    return load_config(root), str(p)
