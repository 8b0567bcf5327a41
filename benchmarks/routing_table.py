"""What lossy cache-aware routing costs and saves, as a Markdown table for the README.

    python -m ossedge.benchmarks.routing_table [--model DIR] [--text FILE] [--max-tokens N]
        [--slots 8,16,24] [--out benchmarks/results/routing-tiny]

MODEL (default: the bundled tiny trained model) is profiled and converted to ExecuTorch with its
routing profile, as `make demo` does; then `ossedge eval` scores the artifact against MODEL in
one-token (decode) calls through an expert cache of each size in `--slots` (experts of all
layers), with exact routing and with `--cache-aware-routing 1` at the default pool (twice the
experts per token) and at the whole layer. Per row: perplexity, KL(reference ‖ artifact), top-1
agreement, the cache's hit rate, the share of expert choices routing changed, and the experts
read per decoded token. Writes summary.json and report.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ossedge.assets import default_model_dir
from ossedge.benchmarks.recipe_table import _ossedge
from ossedge.runtime.atomic import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Checkpoint [default: bundled tiny]")
    p.add_argument("--text", default=None, help="Evaluation text [default: packaged held-out]")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--slots", default="8,16,24", help="Cache sizes, in experts")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/routing-tiny"))
    a = p.parse_args()
    model = a.model or str(default_model_dir())
    text = ["--text", a.text] if a.text else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        profile, art = str(Path(tmp) / "profile.json"), Path(tmp) / "et"
        _ossedge("profile-experts", model, *text, "-o", profile)
        _ossedge("convert", model, "--target", "executorch", "-o", str(art), "--max-context",
                 "1024", "--expert-profile", profile, "--verify-tokens", "0")  # fmt: skip
        store = json.loads((art / "manifest.json").read_text())["experts"]["store"]
        k, experts = store["top_k"], store["experts"]
        settings = [(0, None), (1, None), (1, experts)]
        for slots in map(int, a.slots.split(",")):
            for keep, pool in settings:
                args = ["eval", str(art), "--reference", model, *text, "--max-tokens",
                        str(a.max_tokens), "--expert-cache", str(slots * store["stride"]),
                        "--cache-aware-routing", str(keep), "--json"]  # fmt: skip
                if pool:
                    args += ["--routing-pool", str(pool)]
                r = json.loads(_ossedge(*args))
                c = r["expert_cache"]
                print(f"{slots} slots, keep {keep}, pool {c['routing_pool']}: KL "
                      f"{r['kl_mean']:.5f}, hit {c['hit_rate']:.3f}", file=sys.stderr)
                rows.append({
                    "slots": slots, "share_of_experts": slots / (store["layers"] * experts),
                    "cache_aware_routing": keep, "routing_pool": c["routing_pool"],
                    **{m: r[m] for m in ("perplexity_model", "perplexity_reference", "kl_mean",
                                         "kl_median", "kl_p99", "top1_agreement",
                                         "tokens_scored")},
                    "hit_rate": c["hit_rate"], "rerouted_share": c["rerouted_share"],
                    "experts_read_per_token": (1 - c["hit_rate"]) * k * store["layers"],
                })  # fmt: skip
    summary = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m ossedge.benchmarks.routing_table", *sys.argv[1:]]),
        "model": model, "layers": store["layers"], "experts": experts, "top_k": k, "rows": rows,
    }  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "summary.json", summary)
    lines = [
        f"Model: {model}; {rows[0]['tokens_scored']} tokens scored in decode calls; "
        f"{store['layers']} layers × {experts} experts, {k} per token; reference perplexity "
        f"{rows[0]['perplexity_reference']:.3f}", "",
        "| cache (experts) | routing | perplexity | KL mean | KL p99 | top-1 agreement | "
        "hit rate | choices changed | experts read / token |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        routing = (f"keep {r['cache_aware_routing']}, pool {r['routing_pool']}"
                   if r["cache_aware_routing"] else "exact")  # fmt: skip
        lines.append(
            f"| {r['slots']} ({r['share_of_experts']:.0%}) | {routing} | "
            f"{r['perplexity_model']:.3f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | "
            f"{r['top1_agreement']:.2%} | {r['hit_rate']:.1%} | {r['rerouted_share']:.1%} | "
            f"{r['experts_read_per_token']:.2f} |"
        )
    report = "\n".join([f"# Cache-aware routing on {model} ({summary['created']})", "",
                        f"Command: `{summary['command']}`", "", *lines, ""])  # fmt: skip
    (a.out / "report.md").write_text(report)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
