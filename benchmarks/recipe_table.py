"""The cost of each quantization recipe, as a Markdown table for the README.

    python -m ossedge.benchmarks.recipe_table [--model DIR] [--text FILE] [--json]

For every recipe: the size of the gpt-oss-20b weights it produces (computed from the 20b shapes),
and, measured on MODEL (default: the bundled tiny trained model) quantized with it, perplexity,
KL divergence from the unquantized model and top-1 agreement over the evaluation text (default:
the packaged held-out text), with `ossedge quantize` and `ossedge eval` as a user runs them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ossedge.assets import default_model_dir
from ossedge.quantize.recipes import RECIPES
from ossedge.runtime.config import preset


def _ossedge(*args: str) -> str:
    cmd = [sys.executable, "-m", "ossedge", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    from ossedge.runtime.evaluate import METRICS
    from ossedge.runtime.quantized import recipe_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Checkpoint to quantize [default: bundled tiny]")
    p.add_argument("--text", default=None, help="Evaluation text [default: packaged held-out]")
    p.add_argument("--json", action="store_true", help="Print the rows as JSON too")
    a = p.parse_args()
    model = a.model or str(default_model_dir())
    text = ["--text", a.text] if a.text else []
    cfg20 = preset("20b")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in RECIPES:
            out = str(Path(tmp) / name)
            _ossedge("quantize", model, "-o", out, "--recipe", name)
            r = json.loads(_ossedge("eval", out, "--reference", model, *text, "--json"))
            rows.append(
                {
                    "recipe": name,
                    "bytes_20b": recipe_bytes(cfg20, name)["total"],
                    "bytes_model": r["model"]["bytes"],
                    **{k: r[k] for k in (*METRICS, "tokens_scored")},
                }
            )
    ref = rows[0]["perplexity_reference"]
    print(
        f"Model: {model}; {rows[0]['tokens_scored']} evaluation tokens; unquantized perplexity "
        f"{ref:.3f}\n"
    )
    print("| recipe | 20b weights | perplexity | KL mean | KL median | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['recipe']}` | {r['bytes_20b'] / 1e9:.2f} GB | {r['perplexity_model']:.3f} | "
            f"{r['kl_mean']:.5f} | {r['kl_median']:.5f} | {r['top1_agreement']:.2%} |"
        )
    if a.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
