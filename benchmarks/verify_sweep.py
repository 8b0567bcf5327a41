"""Does `ossedge verify` refuse valid conversions? Every target × recipe over many random-weight
checkpoints and the bundled trained model, judged by the rule `ossedge convert` applies now and
by the rule before it (logits against a reference routed on its own, float linear inputs).

    python -m ossedge.benchmarks.verify_sweep [--seeds 20] [--targets executorch,onnx,coreml]
        [--recipes mobile,...] [--out benchmarks/results/verify-sweep]
    python -m ossedge.benchmarks.verify_sweep --merge DIR... [--out DIR]   # parts run in parallel

Each checkpoint is `ossedge synth --preset tiny --seed S` (plus the bundled model), converted with
`ossedge convert --verify-tokens 0` and then verified in this process. Writes rows.json (one row
per conversion, with both rules' metrics) and report.md (failures per target and recipe).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ossedge.assets import default_model_dir
from ossedge.runtime.atomic import write_json
from ossedge.runtime.tokenizer import Tokenizer
from ossedge.targets import open_artifact

RECIPES = {"executorch": ("native", "mobile", "mobile-int8", "int4"),
           "onnx": ("native", "mobile", "mobile-int8", "int4"),
           "coreml": ("native", "mobile", "mobile-int8", "int4")}  # fmt: skip
DEPLOYMENT = {"int4": "ios18"}  # Core ML: MXFP4 experts need ios26, int4 ones run on ios18


def _ossedge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ossedge", *args], check=True, capture_output=True)


def old_rule(root: Path, reference: Path, tolerance: float) -> dict:
    """The rule before routing was matched: rel_err_p90 against the same-recipe reference routed
    on its own, linear layers' inputs in float."""
    from ossedge.convert import verify as v
    from ossedge.runtime.checkpoint import open_checkpoint
    from ossedge.runtime.evaluate import default_text
    from ossedge.runtime.model import build_model
    from ossedge.runtime.quantized import QuantizedView

    model = open_artifact(root, engine="interpreter")
    ckpt = open_checkpoint(reference)
    cfg = ckpt.config
    n = min(2 * cfg.sliding_window + 16, model.max_context)
    x = torch.tensor([Tokenizer.from_dir(reference).encode(default_text()[0])[:n]])
    prefill = min(model.max_prefill, max(1, n // 4))
    art, _ = v._run_artifact(model, x, prefill, False)
    same = build_model(QuantizedView(ckpt, model.manifest["recipe"]),
                       expert_activations=v.expert_activations(model.manifest))  # fmt: skip
    rels = v._rel_errors(art, v._reference(same, x, None)[0][prefill - 1 :])
    return {"rel_err_p90": v._p90(rels), "tolerance": tolerance, "passed": v._p90(rels) <= tolerance}


def main() -> None:
    from ossedge.convert.verify import verify_artifact

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--targets", default="executorch,onnx,coreml")
    p.add_argument("--recipes", default=None, help="Only these recipes [default: every one]")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/verify-sweep"))
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="Merge the rows.json of these sweeps (e.g. one per target, run in "
                   "parallel) into --out instead of running one")  # fmt: skip
    a = p.parse_args()
    if a.merge:
        missing = [str(d) for d in a.merge if not (d / "rows.json").is_file()]
        if missing:
            sys.exit(f"error: no rows.json in {', '.join(missing)}; give directories a sweep wrote")
        rows = [r for d in a.merge for r in json.loads((d / "rows.json").read_text())]
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(a.out / "rows.json", rows)
        (a.out / "report.md").write_text(report(rows))
        print(report(rows))
        return
    only = set(a.recipes.split(",")) if a.recipes else None
    rows = []
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"trained": Path(default_model_dir())}
        for s in range(a.seeds):
            models[f"seed{s}"] = Path(tmp) / f"seed{s}"
            _ossedge("synth", str(models[f"seed{s}"]), "--preset", "tiny", "--seed", str(s))
        for target in a.targets.split(","):
            for recipe in RECIPES[target]:
                if only and recipe not in only:
                    continue
                for name, ckpt in models.items():
                    out = Path(tmp) / f"{target}-{recipe}-{name}"
                    extra = (["--deployment-target", DEPLOYMENT.get(recipe, "ios26")]
                             if target == "coreml" else [])  # fmt: skip
                    t0 = time.perf_counter()
                    _ossedge("convert", str(ckpt), "--target", target, "--recipe", recipe, "-o",
                             str(out), "--verify-tokens", "0", *extra)  # fmt: skip
                    r = verify_artifact(out, ckpt)
                    row = {"target": target, "recipe": recipe, "model": name,
                           "passed": r["passed"], "rel_err_p90": r["rel_err_p90"],
                           "rel_err": r["rel_err"], "tolerance": r["tolerance"],
                           "routing": r["routing"], "linear_activations": r["linear_activations"],
                           "old": old_rule(out, ckpt, r["tolerance"] if target == "coreml"
                                           else 1e-3 if recipe == "native" else 8e-2),
                           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_json(a.out / "rows.json", rows)
                    subprocess.run(["rm", "-rf", str(out)], check=True)
    (a.out / "report.md").write_text(report(rows))
    print(report(rows))


def report(rows: list[dict]) -> str:
    lines = [("| target | recipe | conversions | refused before | refused now | worst p90 now "
              "(tolerance) | router flips |"), "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["recipe"]), []).append(r)
    for (target, recipe), g in groups.items():
        flips = sum(r["routing"]["flips"] for r in g)
        decisions = sum(r["routing"]["decisions"] for r in g)
        lines.append(
            f"| {target} | {recipe} | {len(g)} | {sum(not r['old']['passed'] for r in g)} | "
            f"{sum(not r['passed'] for r in g)} | {max(r['rel_err_p90'] for r in g):.2e} "
            f"({g[0]['tolerance']:g}) | {flips}/{decisions} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
