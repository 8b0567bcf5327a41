"""Resident-memory readings from /proc (Linux)."""

from __future__ import annotations

import resource
from pathlib import Path


def proc_status() -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def children_peak_rss() -> int:
    """Largest peak RSS of any waited-for child process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
