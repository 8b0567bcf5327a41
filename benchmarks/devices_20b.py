"""The memory model and expert streaming on the synthetic gpt-oss-20b ExecuTorch artifact.

    python -m ossedge.benchmarks.devices_20b [--artifact out/20b-et] [--limits 12G,8G]
        [--prompt 128] [--gen 32] [--save]

Each run is a child process that loads the artifact, prefills `--prompt` random tokens and
decodes `--gen` greedily, reporting decode tok/s, major page faults and RSS:
  - `locked`: as the pybindings load it here as root (the weights mlock'ed: all resident);
  - `unlimited`: as an app (no memory locking), no memory limit;
  - one run per `--limits` entry: as an app inside a memory cgroup of that size, the OS paging
    the memory-mapped experts from disk as they are needed.
The artifact's pages are evicted from the page cache before every run. Prints one JSON object
with the memory model's prediction next to the measured peak RSS; `--save` writes the streaming
runs (the expert-streaming numbers `ossedge plan` reports come from streaming_20b.py --save).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ossedge.benchmarks.bench_child import child_result, command
from ossedge.benchmarks.limits import app_like, evict, memory_cgroup, parse_size
from ossedge.runtime.config import config_from_hf_dict

GB = 1e9


def run_once(artifact: Path, prompt: int, gen: int, *, limit: int | None, app: bool) -> dict:
    evict([artifact])
    argv = command("executorch", artifact, prompt, gen)
    if limit is None:
        cmd = app_like(argv) if app else argv
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    else:
        with memory_cgroup(limit) as procs:
            p = subprocess.run(app_like(argv, procs=procs), capture_output=True, text=True,
                               check=False)
    if p.returncode:
        why = ("killed: out of memory under the limit" if p.returncode == -9
               else f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
        return {"failed": why}
    r = child_result(json.loads(p.stdout.strip().splitlines()[-1]))
    return {
        "load_s": round(r["load_s"], 1),
        "prefill_tok_s": round(r["prompt_tokens"] / r["prefill_s"], 2),
        "decode_tok_s": round(r["gen_tokens"] / r["decode_s"], 3),
        "major_faults_per_token": round(r["decode_major_faults"] / r["gen_tokens"], 1),
        "prefill_major_faults": r["prefill_major_faults"],
        "peak_rss_gb": round(r["VmHWM"] / GB, 2),
        "rss_anon_gb": round(r["RssAnon"] / GB, 2),
        "rss_file_gb": round(r["RssFile"] / GB, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="out/20b-et")
    p.add_argument("--limits", default="12G,8G")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=32)
    a = p.parse_args()

    from ossedge.targets.executorch.memory import executorch_footprint

    art = Path(a.artifact)
    manifest = json.loads((art / "manifest.json").read_text())
    cfg = config_from_hf_dict(manifest["config"])
    f = executorch_footprint(cfg, manifest["recipe"], manifest["max_context"],
                             max_prefill=manifest["max_prefill"], host="python")
    result: dict = {
        "artifact": str(art),
        "recipe": manifest["recipe"],
        "max_context": manifest["max_context"],
        "predicted": {"resident_gb": round(f.resident / GB, 2), "anon_gb": round(f.anon / GB, 2),
                      "mapped_gb": round(f.mapped / GB, 2)},
        "runs": {},
    }
    plans = [("locked", None, False), ("unlimited", None, True)]
    plans += [(s, parse_size(s), True) for s in a.limits.split(",") if s]
    for name, limit, app in plans:
        t0 = time.perf_counter()
        result["runs"][name] = run_once(art, a.prompt, a.gen, limit=limit, app=app)
        result["runs"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {result['runs'][name]}", file=sys.stderr)
    base = result["runs"]["locked"]
    if "peak_rss_gb" in base:
        result["predicted_vs_measured_peak"] = round(
            result["predicted"]["resident_gb"] / base["peak_rss_gb"] - 1, 3)
        result["predicted_vs_measured_anon"] = round(
            result["predicted"]["anon_gb"] / base["rss_anon_gb"] - 1, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
