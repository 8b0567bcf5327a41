"""Full-size benchmark of the Core ML target on the synthetic gpt-oss-20b.

    python -m ossedge.benchmarks.coreml_20b [--ckpt out/gpt-oss-20b-synth] [--out out/20b-coreml]
        [--deployment-target ios26] [--skip-convert] [--no-structure]

1. `ossedge convert CKPT --target coreml` in a child process: wall time and peak RSS (goal
   ≤ 8 GB), total and per-package bytes.
2. From the manifest: predictions per generated token, and the bytes one token reads by the
   design (each layer's attention function, its k experts, the head, one embedding row).
3. Unless --no-structure: the structural checks of `ossedge verify` over the whole artifact
   (every function's signature and states, and every expert weight decoded by the MIL
   interpreter and compared bit for bit with the checkpoint's), with their time and peak RSS.
Prints one JSON object. No Core ML prediction happens here: that needs macOS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ossedge.benchmarks import structure
from ossedge.benchmarks.rss import run_measured
from ossedge.runtime.config import config_from_hf_dict

GB = 1e9

def bytes_per_token(manifest: dict) -> dict[str, int]:
    """Weight bytes of the functions one token runs (as the manifest records them): the
    attention function of every layer, k of its experts, the head, one embedding row."""
    cfg = config_from_hf_dict(manifest["config"])
    per_fn = {f: d["weight_bytes"] for f, d in manifest["functions"].items()}
    attn = sum(per_fn[f"attn_{layer}"] for layer in range(cfg.num_hidden_layers))
    expert = sum(per_fn[f"expert_{layer}_0"] for layer in range(cfg.num_hidden_layers))
    emb = manifest["embedding"]
    row = {"int8-ch": cfg.hidden_size + 4, "fp16": 2 * cfg.hidden_size}.get(emb["format"], 0)
    return {
        "attention": int(attn),
        "experts": int(expert * cfg.num_experts_per_tok),
        "head": int(per_fn["head"]),
        "embedding_row": row,
        "total": int(attn + expert * cfg.num_experts_per_tok + per_fn["head"] + row),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/gpt-oss-20b-synth")
    p.add_argument("--out", default="out/20b-coreml")
    p.add_argument("--deployment-target", default="ios26", choices=["ios26", "ios18"])
    p.add_argument("--skip-convert", action="store_true", help="Reuse an existing --out")
    p.add_argument("--no-structure", action="store_true", help="Skip the structural checks")
    a = p.parse_args()

    ckpt, out = Path(a.ckpt), Path(a.out)
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "ossedge", "synth", str(ckpt), "--preset", "20b"],
                       check=True)
    result: dict = {"checkpoint": str(ckpt), "artifact": str(out),
                    "deployment_target": a.deployment_target}
    if not a.skip_convert:
        cmd = [sys.executable, "-m", "ossedge", "convert", str(ckpt), "--target", "coreml",
               "--deployment-target", a.deployment_target, "-o", str(out), "--verify-tokens",
               "0", "--force"]
        wall, peak = run_measured(cmd)
        result["convert"] = {"seconds": round(wall, 1), "peak_rss_gb": round(peak / GB, 2)}
    manifest = json.loads((out / "manifest.json").read_text())
    result["recipe"] = manifest["recipe"]
    result["total_gb"] = round(manifest["total_bytes"] / GB, 3)
    result["packages_gb"] = {k: round(v["bytes"] / GB, 3) for k, v in manifest["packages"].items()}
    result["embedding_gb"] = round(manifest["files"][manifest["embedding"]["file"]]["bytes"] / GB,
                                   3)
    result["predictions_per_token"] = manifest["predictions_per_token"]
    result["bytes_per_token"] = bytes_per_token(manifest)
    if not a.no_structure:
        result["structure"] = structure.in_child(str(out), str(ckpt))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
