"""Resident-memory readings from /proc (Linux)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
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


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of a child process; raises if it fails. What the child
    prints goes to stderr, so that a benchmark's stdout holds only its own JSON."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024
