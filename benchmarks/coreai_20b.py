"""Full-size benchmark of the Core AI target on the synthetic gpt-oss-20b.

    python -m ossedge.benchmarks.coreai_20b [--ckpt out/gpt-oss-20b-synth] [--out out/20b-coreai]
        [--slice-ckpt out/gpt-oss-20b-2layers] [--slice-out out/20b-2layers-coreai]
        [--slice-tokens 12] [--skip-convert] [--no-structure] [--no-slice]

1. `ossedge convert CKPT --target coreai` in a child process (no verify: the Linux runtime is an
   interpreter, minutes per token at this size): wall time and peak RSS (goal ≤ 8 GB), total and
   per-asset bytes.
2. Unless --no-structure: the structure check of `ossedge verify` over the whole artifact (every
   function's signature and states, every expert tensor read back from the assets and compared
   byte for byte with the checkpoint's), with its time and peak RSS, and the weight bytes one
   decoded token reads.
3. Unless --no-slice: parity of a full-width slice — a checkpoint of the 20b's shapes with its
   first two layers (one sliding, one full; synthesized when missing) — converted and run by
   coreai-core's runtime in fp32 against the reference (`ossedge verify --tokens N`), timed.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ossedge.benchmarks import structure
from ossedge.benchmarks.rss import run_measured
from ossedge.runtime.config import FULL, SLIDING, preset

GB = 1e9


def synth_slice(path: Path) -> None:
    """A checkpoint of gpt-oss-20b's shapes with two layers (sliding, then full)."""
    from ossedge.runtime.synth import synthesize

    cfg = preset("20b").replace(num_hidden_layers=2, layer_types=(SLIDING, FULL))
    synthesize(path, preset_name="20b", seed=0, config=cfg)


def convert(ckpt: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "ossedge", "convert", str(ckpt), "--target", "coreai", "-o",
           str(out), "--force", *extra]  # fmt: skip
    wall, peak = run_measured(cmd)
    m = json.loads((out / "manifest.json").read_text())
    assets: dict[str, int] = {}
    for name, f in m["files"].items():
        assets[name.split("/")[0]] = assets.get(name.split("/")[0], 0) + f["bytes"]
    return {"seconds": round(wall, 1), "peak_rss_gb": round(peak / GB, 2),
            "total_gb": round(m["total_bytes"] / GB, 3),
            "files_gb": {k: round(v / GB, 3) for k, v in assets.items()}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/gpt-oss-20b-synth")
    p.add_argument("--out", default="out/20b-coreai")
    p.add_argument("--slice-ckpt", default="out/gpt-oss-20b-2layers")
    p.add_argument("--slice-out", default="out/20b-2layers-coreai")
    p.add_argument("--slice-tokens", type=int, default=12)
    p.add_argument("--skip-convert", action="store_true", help="Reuse an existing --out")
    p.add_argument("--no-structure", action="store_true", help="Skip the structure check")
    p.add_argument("--no-slice", action="store_true", help="Skip the two-layer parity run")
    p.add_argument("--no-full", action="store_true", help="Only the two-layer parity run")
    a = p.parse_args()
    result: dict = {}
    if not a.no_full:
        ckpt, out = Path(a.ckpt), Path(a.out)
        if not ckpt.exists():
            subprocess.run([sys.executable, "-m", "ossedge", "synth", str(ckpt), "--preset",
                            "20b"], check=True)  # fmt: skip
        full: dict = {"checkpoint": str(ckpt), "artifact": str(out)}
        if not a.skip_convert:
            full["convert"] = convert(ckpt, out, "--verify-tokens", "0")
        if not a.no_structure:
            full["structure"] = structure.in_child(str(out), str(ckpt))
        result["full"] = full
    if not a.no_slice:
        ckpt, out = Path(a.slice_ckpt), Path(a.slice_out)
        if not ckpt.exists():
            synth_slice(ckpt)
        sliced: dict = {"checkpoint": str(ckpt), "artifact": str(out)}
        sliced["convert"] = convert(ckpt, out, "--verify-tokens", "0", "--max-context", "256")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "ossedge", "verify", str(out), "--reference",
                              str(ckpt), "--tokens", str(a.slice_tokens), "--json"],
                             capture_output=True, text=True, check=False)  # fmt: skip
        if run.returncode not in (0, 3):
            raise SystemExit(f"verify failed:\n{run.stderr[-3000:]}")
        v = json.loads(run.stdout)
        sliced["verify"] = {k: v.get(k) for k in ("passed", "tokens", "prefill_tokens",
                                                  "rel_err", "rel_err_p90", "top1_same",
                                                  "tolerance", "routing", "structure")}  # fmt: skip
        sliced["verify"]["wall_s"] = round(time.perf_counter() - t0, 1)
        result["slice"] = sliced
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
