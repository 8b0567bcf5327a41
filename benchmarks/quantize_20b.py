"""Full-size benchmark of `ossedge quantize` on the synthetic gpt-oss-20b.

    python -m ossedge.benchmarks.quantize_20b [--ckpt out/gpt-oss-20b-synth] [--recipe mobile ...]

For each recipe, runs `ossedge quantize` in a child process and prints one JSON object per recipe:
wall time, the child's peak RSS (goal ≤ 3 GB), bytes written vs the size predicted from shapes,
and a smoke run of the quantized model in the reference runtime (load, prefill, decode in bf16,
as `reference_20b` measures). The 20b checkpoint is synthesized first if missing
(`ossedge synth --preset 20b`, ~6 min, 13.8 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ossedge.benchmarks.rss import run_measured
from ossedge.runtime.config import preset

GB = 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/gpt-oss-20b-synth")
    p.add_argument(
        "--out-dir", default="out", help="Quantized checkpoints go to OUT_DIR/20b-RECIPE"
    )
    p.add_argument("--recipe", action="append", help="Recipe(s) to run [default: mobile]")
    p.add_argument("--keep", action="store_true", help="Keep the quantized checkpoints")
    p.add_argument("--smoke-prompt", type=int, default=16)
    p.add_argument("--smoke-gen", type=int, default=4)
    a = p.parse_args()

    from ossedge.runtime.checkpoint import read_manifest
    from ossedge.runtime.quantized import recipe_bytes

    ckpt = Path(a.ckpt)
    if not ckpt.exists():
        cmd = [sys.executable, "-m", "ossedge", "synth", str(ckpt), "--preset", "20b"]
        subprocess.run(cmd, check=True)
    for recipe in a.recipe or ["mobile"]:
        out = Path(a.out_dir) / f"20b-{recipe}"
        cmd = [
            sys.executable,
            "-m",
            "ossedge",
            "quantize",
            str(ckpt),
            "-o",
            str(out),
            "--recipe",
            recipe,
            "--force",
        ]
        seconds, peak = run_measured(cmd)
        m = read_manifest(out)
        smoke_cmd = [
            sys.executable,
            "-m",
            "ossedge.benchmarks.reference_20b",
            "--child",
            "--ckpt",
            str(out),
            "--prompt-tokens",
            str(a.smoke_prompt),
            "--gen-tokens",
            str(a.smoke_gen),
        ]
        smoke = subprocess.run(smoke_cmd, check=True, capture_output=True, text=True).stdout
        result = {
            "recipe": recipe,
            "quantize_s": round(seconds, 1),
            "quantize_peak_rss_gb": round(peak / GB, 2),
            "bytes_total": m["total_bytes"],
            "bytes_by_format": m["bytes_by_format"],
            "weights_bytes_predicted": recipe_bytes(preset("20b"), recipe)["total"],
            "files": len(m["files"]),
            "smoke_bf16": json.loads(smoke.strip().splitlines()[-1]),
        }
        print(json.dumps(result, indent=2), flush=True)
        if not a.keep:
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
