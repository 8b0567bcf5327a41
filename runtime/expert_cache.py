"""The expert cache of version-2 ExecuTorch artifacts, from a host's side: what `--expert-cache
auto|off|SIZE` means, the memory this process may use, and the calls into the kernel library
(`libossedge_kernels.so`, kernels/expert_cache.h) that open the cache and read its counters.

    off   experts are read in place from the memory-mapped model.ptd (the OS page cache holds
          them); what ExecuTorch's stock runners do
    SIZE  a cache of SIZE bytes of anonymous memory (e.g. 6G, 4500M); misses are read with pread
    auto  off where the whole artifact fits in this process's memory limit; else a cache of the
          limit minus the resident rest (runtime, packed linears, KV cache, activations) and a
          margin
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ossedge.runtime.errors import ArtifactError, BudgetError, OssedgeError

MARGIN = 256 << 20  # left free under the limit: allocator slack, the tokenizer, page tables
STATS = ("hits", "misses", "bytes_read", "wait_ns", "slots", "slot_bytes", "pinned", "resident",
         "layers_seen", "direct", "busy_ns", "rerouted", "prefetched", "prefetch_used")  # fmt: skip


class CacheOptionError(OssedgeError):
    """--expert-cache has a value that is not auto, off or a size."""

    exit_code = 2


def parse_option(text: str | int | None) -> str | int:
    """'auto' | 'off' | bytes from 'auto', 'off', '6G', '4500M', '1.5GiB' or a byte count."""
    if text is None:
        return "auto"
    if isinstance(text, int):
        return text
    t = text.strip().lower()
    if t in ("auto", "off"):
        return t
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", t)
    if not m:
        raise CacheOptionError(f"--expert-cache {text!r}: expected auto, off or a size such as "
                               "6G or 4500M")  # fmt: skip
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " "))


def memory_limit() -> int:
    """Bytes this process may use: its memory cgroup's limit where one is set, else MemTotal."""
    limits = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2
                f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
            elif "memory" in controllers.split(","):
                f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            else:
                continue
            v = f.read_text().strip() if f.is_file() else "max"
            if v != "max" and int(v) < 1 << 60:
                limits.append(int(v))
    except (OSError, ValueError):
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([total, *limits])


@dataclass(frozen=True)
class Store:
    """The packed experts of an artifact, from its manifest."""

    layers: int
    experts: int
    stride: int
    top_k: int

    @property
    def bytes(self) -> int:
        return self.layers * self.experts * self.stride

    @property
    def minimum(self) -> int:
        """The smallest useful cache: one decoded token's experts of one layer."""
        return self.top_k * self.stride


def store_of(manifest: dict[str, Any]) -> Store | None:
    s = manifest.get("experts", {}).get("store")
    if not s:
        return None
    return Store(int(s["layers"]), int(s["experts"]), int(s["stride"]), int(s["top_k"]))


def resolve(option: str | int, manifest: dict[str, Any], *, rest: int, total: int,
            limit: int | None = None) -> int:  # fmt: skip
    """The cache budget in bytes for `option` (0: off). `rest` is what the process holds besides
    the experts; `total` the bytes of the whole artifact (what `off` keeps mapped)."""
    store = store_of(manifest)
    if option == "off":
        return 0
    if store is None:
        if option == "auto":
            return 0
        raise ArtifactError(
            "--expert-cache needs a version-2 artifact (experts packed one per extent); this one "
            f"has contract version {manifest.get('contract_version')}: convert it again"
        )
    if option != "auto":
        if option < store.minimum:
            raise BudgetError(
                f"--expert-cache {option} bytes is below the minimum of {store.minimum} "
                f"({store.top_k} experts of {store.stride} bytes); give at least "
                f"{-(-store.minimum // (1 << 20))}M"
            )
        return min(option, store.bytes)
    limit = memory_limit() if limit is None else limit
    if rest + total + MARGIN <= limit:
        return 0
    budget = min(store.bytes, limit - rest - MARGIN)
    if budget < store.minimum:
        raise BudgetError(
            f"the memory limit of {limit / 1e9:.2f} GB leaves {max(0, budget) / 1e9:.2f} GB for "
            f"experts after the resident rest of {rest / 1e9:.2f} GB; the expert cache needs at "
            f"least {store.minimum / 1e9:.2f} GB (a limit of "
            f"{(rest + MARGIN + store.minimum) / 1e9:.2f} GB)"
        )
    return budget


def routing_pool(store: Store | None, keep: int, pool: int | None, *, budget: int) -> int:
    """The candidate pool of `--cache-aware-routing keep` (`--routing-pool pool`, default twice
    the experts per token), checked against the artifact; 0 when routing stays exact."""
    if not keep:
        if pool:
            raise CacheOptionError("--routing-pool needs --cache-aware-routing K")
        return 0
    if store is None or not budget:
        raise CacheOptionError(
            "--cache-aware-routing needs the expert cache: give --expert-cache SIZE (auto is off "
            "when the artifact fits in memory; a version-2 artifact is needed)"
        )
    if not 1 <= keep < store.top_k:
        raise CacheOptionError(
            f"--cache-aware-routing {keep} must be 1 or more and below the model's "
            f"{store.top_k} experts per token (it is how many of them to keep)"
        )
    pool = min(store.experts, 2 * store.top_k) if pool is None else pool
    if not store.top_k < pool <= store.experts:
        raise CacheOptionError(
            f"--routing-pool {pool} must be above the {store.top_k} experts per token and at most "
            f"the {store.experts} experts"
        )
    return pool


def bind(lib: ctypes.CDLL) -> None:
    """Declare the cache functions of the kernel library."""
    lib.ossedge_expert_cache_open.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int,
                                              ctypes.c_double, ctypes.c_char_p, ctypes.c_int64]
    lib.ossedge_expert_cache_open.restype = ctypes.c_int
    lib.ossedge_expert_cache_close.argtypes = []
    lib.ossedge_expert_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    lib.ossedge_expert_cache_stats.restype = ctypes.c_int
    lib.ossedge_expert_cache_reset_stats.argtypes = []
    lib.ossedge_expert_cache_set_routing.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.ossedge_expert_cache_set_routing.restype = ctypes.c_int
    lib.ossedge_route_cache_aware.argtypes = [
        ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_float)]  # fmt: skip
    lib.ossedge_route_cache_aware.restype = ctypes.c_int64


def open_cache(lib: ctypes.CDLL, ptd: Path, budget: int, *, io_threads: int = 0,
               lru_share: float = -1.0) -> None:  # fmt: skip
    err = ctypes.create_string_buffer(512)
    if lib.ossedge_expert_cache_open(str(ptd).encode(), budget, io_threads, lru_share, err,
                                     len(err)) != 0:  # fmt: skip
        raise ArtifactError(f"cannot open the expert cache: {err.value.decode(errors='replace')}")


def set_routing(lib: ctypes.CDLL, keep: int, pool: int) -> None:
    if lib.ossedge_expert_cache_set_routing(keep, pool) != 0:
        raise ArtifactError("cannot set cache-aware routing: the expert cache is not open")


def route(lib: ctypes.CDLL, logits, k: int, keep: int, pool: int, resident) -> tuple[list, list, int]:
    """The kernel's cache-aware routing rule for one token: (ids, weights, changed)."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    r = np.ascontiguousarray(resident, dtype=np.uint8)
    ids = np.zeros(k, dtype=np.int64)
    w = np.zeros(k, dtype=np.float32)
    c = ctypes
    changed = lib.ossedge_route_cache_aware(
        x.ctypes.data_as(c.POINTER(c.c_float)), x.size, k, keep, pool,
        r.ctypes.data_as(c.POINTER(c.c_uint8)), ids.ctypes.data_as(c.POINTER(c.c_int64)),
        w.ctypes.data_as(c.POINTER(c.c_float)))  # fmt: skip
    if changed < 0:
        raise ValueError(f"bad routing arguments: experts {x.size}, k {k}, keep {keep}, pool {pool}")
    return ids.tolist(), w.tolist(), int(changed)


def stats(lib: ctypes.CDLL) -> dict[str, int] | None:
    out = (ctypes.c_int64 * len(STATS))()
    if lib.ossedge_expert_cache_stats(out, len(STATS)) != 0:
        return None
    return dict(zip(STATS, out, strict=True))
