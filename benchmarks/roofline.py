"""The memory-bandwidth roofline of decoding: the bytes of weights one decoded token must read,
and this machine's read bandwidth. Decode on a CPU is bound by these two, so `ossedge bench`
records both and its report sets each decode speed against the speed they allow."""

from __future__ import annotations

from typing import Any

GB = 1e9


def decode_bytes(manifest: dict) -> int:
    """Bytes of weights one decoded token reads, from the artifact's config and recipe."""
    if manifest["format"] == "ossedge-onnx":
        from ossedge.runtime.config import config_from_hf_dict
        from ossedge.targets.memory import onnx_weights

        cfg = config_from_hf_dict(manifest["config"])
        w = onnx_weights(cfg, manifest["recipe"])
        experts = w["experts"] * cfg.num_experts_per_tok // cfg.num_local_experts
        return experts + w["linears"] + w["small"] + w["embedding"] // cfg.vocab_size
    from ossedge.quantize.qtensor import stored_bytes
    from ossedge.quantize.recipes import get_recipe
    from ossedge.runtime.checkpoint import logical_tensors
    from ossedge.runtime.config import config_from_hf_dict

    cfg = config_from_hf_dict(manifest["config"])
    recipe = get_recipe(manifest["recipe"])
    total = 0
    for name, shape in logical_tensors(cfg):
        if name.endswith(("_blocks", "_scales")):
            continue
        fmt = recipe.format_for(name, shape)
        size = stored_bytes(fmt, shape) if fmt != "keep" else _numel(shape) * 2
        if ".experts." in name and not name.endswith("_bias"):
            size = size * cfg.num_experts_per_tok // cfg.num_local_experts
        elif name == "model.embed_tokens.weight":
            size = size // shape[0]  # one row
        total += size
    return total

def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bandwidth_gbs() -> float:
    """This machine's read bandwidth now, GB/s (every CPU reading 0.5 GB, best of 3)."""
    from ossedge.targets.devices import measure_bandwidth

    return round(measure_bandwidth() / GB, 1)


def roofline(bytes_per_token: int | None, readings: list[float]) -> dict[str, Any]:
    """What a result records: the bytes per decoded token (None where unknown, as for a
    checkpoint run by the reference runtime) and the bandwidth readings (GB/s) taken around the
    runs, with the decode speed they allow at the best reading."""
    best = max(readings) if readings else None
    return {
        "bytes_per_token": bytes_per_token,
        "bandwidth_gbs": readings,
        "roofline_tok_s": round(best * GB / bytes_per_token, 2)
        if best and bytes_per_token else None,
    }
