"""Full-size benchmark of the ExecuTorch target on the synthetic gpt-oss-20b.

    python -m ossedge.benchmarks.executorch_20b [--ckpt out/gpt-oss-20b-synth] [--out out/20b-et]
        [--prompt 1024] [--gen 64] [--skip-convert]

1. `ossedge convert CKPT --target executorch` in a child process: wall time and peak RSS (goals:
   ≤ 15 min, ≤ 8 GB), artifact bytes.
2. In another child: load the artifact, prefill a `--prompt`-token prompt (in chunks of the
   program's prefill length), decode `--gen` tokens greedily; prefill and decode tok/s, RSS split
   into anonymous and file-backed (memory-mapped weights).
3. The roofline: bytes a decoded token must read (the 4 selected experts' MXFP4 bytes in each
   layer, attention and router weights, the unembedding, one embedding row) ÷ the read bandwidth
   measured here; decode time ÷ that lower bound (goal ≥ 70% means roofline/decode ≥ 0.7).
Prints one JSON object. The checkpoint is synthesized first if missing (~6 min, 13.8 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ossedge.benchmarks.bench_child import child_result, command
from ossedge.benchmarks.roofline import decode_bytes
from ossedge.benchmarks.rss import run_measured
from ossedge.targets.devices import measure_bandwidth

GB = 1e9




def main(target: str = "executorch", out: str = "out/20b-et", recipe: str = "mobile") -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/gpt-oss-20b-synth")
    p.add_argument("--out", default=out)
    p.add_argument("--recipe", default=recipe)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--skip-convert", action="store_true", help="Reuse an existing --out")
    a = p.parse_args()

    ckpt, out = Path(a.ckpt), Path(a.out)
    if not ckpt.exists():
        cmd = [sys.executable, "-m", "ossedge", "synth", str(ckpt), "--preset", "20b"]
        subprocess.run(cmd, check=True)
    result: dict = {"checkpoint": str(ckpt), "artifact": str(out), "target": target,
                    "recipe": a.recipe}
    if not a.skip_convert:
        cmd = [sys.executable, "-m", "ossedge", "convert", str(ckpt), "--target", target,
               "-o", str(out), "--recipe", a.recipe, "--verify-tokens", "0", "--force"]
        wall, peak = run_measured(cmd)
        result["convert"] = {"seconds": round(wall, 1), "peak_rss_gb": round(peak / GB, 2)}
    manifest = json.loads((out / "manifest.json").read_text())
    result["artifact_bytes"] = {k: v["bytes"] for k, v in manifest["files"].items()}
    if "stages_s" in manifest["convert"]:
        result["convert_stages_s"] = manifest["convert"]["stages_s"]
    run = subprocess.run(command(target, out, a.prompt, a.gen), capture_output=True, text=True,
                         check=False)  # fmt: skip
    if run.returncode:
        raise SystemExit(f"the decode run failed:\n{run.stderr[-3000:]}")
    r = child_result(json.loads(run.stdout.strip().splitlines()[-1]))
    per_token = decode_bytes(manifest)
    bandwidth = measure_bandwidth(gb=2.0, runs=5)
    roofline_s = per_token / bandwidth
    decode_tok_s = r["gen_tokens"] / r["decode_s"]
    result.update(
        load_s=round(r["load_s"], 2),
        prefill_tok_s=round(r["prompt_tokens"] / r["prefill_s"], 2),
        decode_tok_s=round(decode_tok_s, 2),
        peak_rss_gb=round(r["VmHWM"] / GB, 2),
        rss_anon_gb=round(r["RssAnon"] / GB, 2),
        rss_file_gb=round(r["RssFile"] / GB, 2),
        bytes_per_token_gb=round(per_token / GB, 3),
        read_bandwidth_gb_s=round(bandwidth / GB, 1),
        roofline_tok_s=round(1 / roofline_s, 2),
        fraction_of_roofline=round(roofline_s * decode_tok_s, 3),
        prompt_tokens=r["prompt_tokens"],
        gen_tokens=r["gen_tokens"],
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
