"""Full-size benchmark of the reference runtime on the synthetic gpt-oss-20b.

    python -m ossedge.benchmarks.reference_20b [--ckpt out/gpt-oss-20b-synth] [--dtype bf16]

Synthesizes the 20b checkpoint (once; an existing, valid one is reused and said so), then in a
fresh process loads it, prefills 128 tokens and decodes 32, and prints one JSON object with peak
RSS (goal ≤ 14 GB) and prefill/decode tok/s. Synthesis runs in its own process so its peak RSS
(goal ≤ 2 GB) is measured separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from ossedge.benchmarks.bench_child import one_run
from ossedge.benchmarks.harness import prompt_ids
from ossedge.benchmarks.rss import children_peak_rss, proc_status

GB = 1e9


def _child(ckpt: str, dtype: str, prompt_len: int, gen: int) -> None:
    import torch

    from ossedge.runtime.model import load_model

    t0 = time.perf_counter()
    model = load_model(ckpt, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    load_s = time.perf_counter() - t0
    after_load = proc_status()
    ids = torch.tensor([prompt_ids(prompt_len, model.config.vocab_size, 0)])
    run = one_run(model, ids, gen + 1)
    prefill_s, decode_s = run["prefill_s"], run["decode_s"]
    end = proc_status()
    print(
        json.dumps(
            {
                "load_s": round(load_s, 2),
                "prefill_tokens": prompt_len,
                "prefill_s": round(prefill_s, 2),
                "prefill_tok_s": round(prompt_len / prefill_s, 2),
                "decode_tokens": gen,
                "decode_s": round(decode_s, 2),
                "decode_tok_s": round(gen / decode_s, 3),
                "peak_rss_gb": round(end["VmHWM"] / GB, 2),
                "rss_after_load_gb": round(after_load["VmRSS"] / GB, 2),
                "rss_anon_gb": round(end["RssAnon"] / GB, 2),
                "rss_file_gb": round(end["RssFile"] / GB, 2),
                "logits_finite": run["logits_finite"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/gpt-oss-20b-synth")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.ckpt, a.dtype, a.prompt_tokens, a.gen_tokens)
        return

    result: dict[str, object] = {"machine": platform.machine(), "python": platform.python_version()}
    ckpt = Path(a.ckpt)
    if ckpt.exists():
        from ossedge.runtime.checkpoint import open_checkpoint

        open_checkpoint(ckpt)  # validates every tensor's shape and dtype
        result["synth"] = f"reused existing {ckpt}"
    else:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "ossedge", "synth", str(ckpt), "--preset", "20b"]
        subprocess.run(cmd, check=True)
        result["synth_s"] = round(time.perf_counter() - t0, 1)
        result["synth_peak_rss_gb"] = round(children_peak_rss() / GB, 2)
        result["checkpoint_gb"] = round(sum(f.stat().st_size for f in ckpt.iterdir()) / GB, 2)
    cmd = [sys.executable, "-m", "ossedge.benchmarks.reference_20b", "--child", "--ckpt", str(ckpt)]
    cmd += ["--dtype", a.dtype, "--prompt-tokens", str(a.prompt_tokens)]
    cmd += ["--gen-tokens", str(a.gen_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result["dtype"] = a.dtype
    result.update(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
