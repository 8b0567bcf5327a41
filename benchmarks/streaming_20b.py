"""Streaming gpt-oss-20b inside a phone's memory budget: the native runner under memory cgroups of
10, 8 and 6 GiB and unconstrained, side by side in one run — today's memory-mapped experts
(`--expert-cache off`, the page cache holds what fits) against the expert cache
(`--expert-cache auto`: the limit minus the resident rest, misses read with O_DIRECT) and, with
`--modes …,route1,route2`, the cache with lossy `--cache-aware-routing 1` or `2`, and with
`--ahead-artifact DIR` (the same checkpoint converted with `--lookahead`) the cache on that
artifact, whose MoE ops start the next layer's likely reads early (mode `ahead`).

    python -m ossedge.benchmarks.streaming_20b --artifact out/20b-et [--ckpt out/gpt-oss-20b-synth]
        [--routing uniform|skewed] [--limits 10,8,6] [--modes mmap,cache,route2,route1]
        [--prompt 128] [--gen-tokens 64]
        [--out benchmarks/results/streaming-20b]

Before every run the artifact's pages are dropped from the page cache and the disk's read rate
for whole-expert O_DIRECT reads is probed (`disk_read_gbps`). Per run it records decode and
prefill tok/s, the decode hit rate, the bytes read from storage and the major faults per decoded
token, the disk's rate while the cache's reads were in flight and the share of decode it was
busy, and the decode speed those reads allow at that rate. Writes summary.json (or
summary-skewed.json), one raw JSON per run and report.md with plots.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ossedge.targets as targets
from ossedge.benchmarks.harness import native_runner, prompt_ids
from ossedge.benchmarks.limits import evict
from ossedge.benchmarks.transports import LocalTransport
from ossedge.runtime.atomic import write_json

GIB = 1 << 30


def disk_read_gbps(path: Path, *, extent: int, reads: int = 48, threads: int = 4,
                   chunk: int = 4 << 20, seed: int = 0) -> float:  # fmt: skip
    """GB/s of `reads` whole-extent O_DIRECT reads at random aligned offsets of `path`, `threads`
    at a time in `chunk`-sized preads: the expert cache's access pattern."""
    size = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, (size - extent) // 4096) * 4096 for _ in range(reads)]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    bufs = [mmap.mmap(-1, chunk) for _ in range(threads)]

    def one(i: int) -> int:
        buf, done = bufs[i % threads], 0
        while done < extent:
            n = min(chunk, extent - done)
            done += os.preadv(fd, [memoryview(buf)[:n]], offsets[i] + done)
        return done

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(one, range(reads)))
        return total / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def run_one(artifact: Path, mode: str, limit_gib: int | None, a, out: Path) -> dict[str, Any]:
    from ossedge.targets.executorch.library import kernel_library

    manifest = json.loads((artifact / "manifest.json").read_text())
    store = manifest["experts"]["store"]
    vocab = manifest["methods"]["get_vocab_size"]
    ids = ",".join(map(str, prompt_ids(a.prompt, vocab, 0)))
    argv = [str(native_runner()), "--model", str(artifact), "--kernels", str(kernel_library()),
            "--prompt-ids", ids, "--gen-tokens", str(a.gen_tokens), "--runs", "1", "--warmup", "0",
            "--expert-cache", "off" if mode == "mmap" else "auto"]  # fmt: skip
    if mode.startswith("route"):  # routeK: the cache with --cache-aware-routing K
        argv += ["--cache-aware-routing", mode.removeprefix("route")]
    evict([artifact])
    disk = disk_read_gbps(artifact / "model.ptd", extent=store["stride"])
    evict([artifact])
    transport = LocalTransport(memory_limit=limit_gib * GIB if limit_gib else None)
    t0 = time.perf_counter()
    try:
        p = transport.run(argv, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        p = None
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"limit_gib": limit_gib, "mode": mode, "disk_read_gbps": round(disk, 3),
                           "wall_s": round(wall, 1)}  # fmt: skip
    if p is None or p.returncode:
        # the runner's own last line, not ExecuTorch's log ("I 00:00:00.01 …")
        said = [] if p is None else [x for x in p.stderr.splitlines()
                                     if x.strip() and not re.match(r"[IWE] \d\d:\d\d", x)]
        why = "timed out" if p is None else f"exit {p.returncode}: {(said or ['?'])[-1]}"
        row.update(decode_tok_s=None, error=f"{why} after {wall:.0f} s")
        return row
    raw = json.loads(p.stdout.strip().splitlines()[-1])
    name = f"{mode}-{limit_gib or 'unconstrained'}"
    write_json(out / f"{name}.json", raw)
    r = raw["runs"][0]
    io = r["decode_io"]
    tokens = a.gen_tokens - 1
    hits, misses = io.get("cache_hits"), io.get("cache_misses")
    cache = raw.get("expert_cache", {})
    row.update(
        decode_tok_s=round(r["decode_tok_s"], 3),
        prefill_tok_s=round(r["prefill_tok_s"], 3),
        hit_rate=round(hits / (hits + misses), 4) if hits is not None else None,
        read_bytes_per_token=io["read_bytes"] // tokens,
        major_faults_per_token=round(io["major_faults"] / tokens, 2),
        decode_read_gbps=round(io["read_bytes"] / r["decode_s"] / 1e9, 3),
        # the disk's rate while the cache had reads in flight, and how much of decode that was
        cache_disk_gbps=(round(io["cache_read_bytes"] / io["cache_busy_s"] / 1e9, 3)
                         if io.get("cache_busy_s") else None),
        disk_busy_share=(round(io["cache_busy_s"] / r["decode_s"], 3)
                         if io.get("cache_busy_s") is not None else None),  # fmt: skip
        prefetched_per_token=(round(io["prefetched"] / tokens, 2)
                              if io.get("prefetched") is not None else None),
        prefetch_used_share=(round(io["prefetch_used"] / io["prefetched"], 4)
                             if io.get("prefetched") else None),
        rerouted_share=(round(io["rerouted"] / (hits + misses), 4)
                        if io.get("rerouted") is not None and hits + misses else None),
        cache_slots=cache.get("slots"),
        cache_budget_bytes=cache.get("budget_bytes"),
        peak_rss_bytes=raw["rss"].get("VmHWM"),
        rest_bytes=(raw["rss"].get("VmRSS", 0) - cache.get("resident", 0) * cache.get("slot_bytes", 0)
                    if cache.get("slots") else None),  # fmt: skip
    )
    return row


def bound(row: dict[str, Any], unconstrained: float | None) -> None:
    """The decode speeds the run's reads allow: reading a token's bytes at the disk's rate alone
    (`io_bound`: the rate measured while the cache's reads were in flight, else the probe's),
    with the token's compute after it (`serial`) or hidden under it (`overlap`)."""
    if row.get("decode_tok_s") is None or not unconstrained:
        return
    row["ratio_to_unconstrained"] = round(row["decode_tok_s"] / unconstrained, 3)
    gbps = row.get("cache_disk_gbps") or row["disk_read_gbps"]
    if not row["read_bytes_per_token"]:
        return
    io_s = row["read_bytes_per_token"] / (gbps * 1e9)
    compute_s = 1 / unconstrained
    row["io_bound_tok_s"] = round(1 / io_s, 3)
    row["bound_serial_tok_s"] = round(1 / (io_s + compute_s), 3)
    row["bound_overlap_tok_s"] = round(1 / max(io_s, compute_s), 3)
    row["of_io_bound"] = round(row["decode_tok_s"] * io_s, 3)


def report(summary: dict[str, Any], out: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in summary["runs"] if r.get("limit_gib")]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"mmap": "o--", "cache": "s-", "ahead": "D-", "route2": "^-", "route1": "v-"}
    labels = {"mmap": "--expert-cache off", "cache": "--expert-cache auto",
              "ahead": "auto, lookahead artifact",
              "route2": "auto, --cache-aware-routing 2", "route1": "auto, --cache-aware-routing 1"}
    for mode, style in styles.items():
        pts = [(r["limit_gib"], r.get("decode_tok_s") or 0) for r in runs if r["mode"] == mode]
        if not pts:
            continue
        ax[0].plot(*zip(*sorted(pts)), style, label=labels[mode])
        if mode != "mmap":
            label = "hit rate" if mode == "cache" else f"hit rate, {labels[mode].split(', ')[1]}"
            if mode == "ahead":
                label = "hit rate (prefetched counted), lookahead"
            pts = [(r["limit_gib"], r.get("hit_rate") or 0) for r in runs if r["mode"] == mode]
            ax[1].plot(*zip(*sorted(pts)), style, label=label)
    u = summary["unconstrained_decode_tok_s"]
    ax[0].axhline(u, color="grey", lw=0.8, label=f"unconstrained {u:.1f}")
    ax[0].set(xlabel="memory limit (GiB)", ylabel="decode tok/s", yscale="log",
              title=f"gpt-oss-20b decode, {summary['routing']} routing")
    ax[1].set(xlabel="memory limit (GiB)", ylabel="expert cache hit rate (decode)", ylim=(0, 1))
    for x in ax:
        x.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    cols = ("limit_gib", "mode", "decode_tok_s", "ratio_to_unconstrained", "prefill_tok_s",
            "hit_rate", "rerouted_share", "prefetched_per_token", "prefetch_used_share",
            "read_bytes_per_token", "major_faults_per_token",
            "disk_read_gbps", "cache_disk_gbps", "disk_busy_share", "io_bound_tok_s",
            "of_io_bound", "peak_rss_bytes", "rest_bytes")  # fmt: skip
    lines = [f"# Streaming gpt-oss-20b, {summary['routing']} routing ({summary['created']})", "",
             f"Command: `{summary['command']}`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    for r in summary["runs"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    lines += ["", f"![decode vs limit]({stem}.png)", ""]
    (out / f"report-{summary['routing']}.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--ckpt", type=Path, default=None, help="(recorded only)")
    p.add_argument("--routing", choices=["uniform", "skewed"], default="uniform")
    p.add_argument("--limits", default="10,8,6")
    p.add_argument("--modes", default="mmap,cache",
                   help="Of mmap, cache, ahead (needs --ahead-artifact), route1, route2 (the "
                        "cache with --cache-aware-routing 1 or 2)")  # fmt: skip
    p.add_argument("--ahead-artifact", type=Path, default=None,
                   help="The same checkpoint converted with --lookahead (mode ahead)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/streaming-20b"))
    p.add_argument("--save", action="store_true",
                   help="Also write targets/data/streaming.json, the runs `ossedge plan` reports")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    raw_dir = a.out / f"raw-{a.routing}"
    raw_dir.mkdir(exist_ok=True)
    limits = [int(x) for x in a.limits.split(",")]
    modes = a.modes.split(",")
    runs = []
    print(f"unconstrained ({a.artifact})", file=sys.stderr, flush=True)
    runs.append(run_one(a.artifact, "mmap", None, a, raw_dir))
    for limit in limits:
        for mode in modes:  # side by side: both modes at one limit, then the next limit
            print(f"{limit} GiB, {mode}", file=sys.stderr, flush=True)
            artifact = a.ahead_artifact if mode == "ahead" else a.artifact
            if artifact is None:
                p.error("--modes ahead needs --ahead-artifact")
            runs.append(run_one(artifact, mode, limit, a, raw_dir))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    unconstrained = runs[0].get("decode_tok_s")
    for r in runs:
        bound(r, unconstrained)
    summary = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m ossedge.benchmarks.streaming_20b", *sys.argv[1:]]),
        "artifact": str(a.artifact), "ckpt": str(a.ckpt) if a.ckpt else None,
        "routing": a.routing, "prompt_tokens": a.prompt, "gen_tokens": a.gen_tokens,
        "unconstrained_decode_tok_s": unconstrained, "runs": runs,
    }  # fmt: skip
    stem = "summary" if a.routing == "uniform" else f"summary-{a.routing}"
    write_json(a.out / f"{stem}.json", summary)
    report(summary, a.out, stem)
    print(f"wrote {a.out / (stem + '.json')}", file=sys.stderr)
    if a.save:
        save(summary)


def save(summary: dict[str, Any]) -> None:
    """targets/data/streaming.json: what `ossedge plan` sets beside its predictions."""
    keep = ("limit_gib", "mode", "decode_tok_s", "hit_rate", "read_bytes_per_token",
            "major_faults_per_token", "disk_read_gbps", "cache_disk_gbps",
            "ratio_to_unconstrained")  # fmt: skip
    m = json.loads((Path(summary["artifact"]) / "manifest.json").read_text())
    out = {
        "machine": f"Linux {platform.machine()}, {os.cpu_count()} CPUs, memory cgroup limits, "
                   "local disk",
        "date": summary["created"][:10],
        "artifact": f"synthetic gpt-oss-20b ({summary['routing']} routing), ExecuTorch, recipe "
                    f"{m['recipe']}, context {m['max_context']}",
        "command": summary["command"],
        "unconstrained_decode_tok_s": summary["unconstrained_decode_tok_s"],
        "runs": [{k: r.get(k) for k in keep} for r in summary["runs"]],
    }  # fmt: skip
    path = Path(targets.__file__).parent / "data" / "streaming.json"
    write_json(path, out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
