"""The memory-bandwidth roofline of decoding: the bytes of weights one decoded token must read,
and this machine's read bandwidth. Decode on a CPU is bound by these two, so `ossedge bench`
records both and its report sets each decode speed against the speed they allow."""

from __future__ import annotations

from typing import Any

from ossedge.runtime.config import config_from_hf_dict
from ossedge.targets import target_for_format
from ossedge.targets.devices import measure_bandwidth

GB = 1e9


def decode_bytes(manifest: dict) -> int:
    """Weight bytes one decoded token reads in an ExecuTorch, ONNX or Core ML artifact, from its
    manifest's config and recipe (the memory model's `decode_weight_bytes`; the KV cache aside)."""
    from ossedge.targets.memory import decode_weight_bytes

    target = target_for_format(manifest["format"]).name
    return decode_weight_bytes(config_from_hf_dict(manifest["config"]), target,
                               manifest["recipe"])


def bandwidth_gbs() -> float:
    """This machine's read bandwidth now, GB/s (every CPU reading 0.5 GB, best of 3)."""
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
