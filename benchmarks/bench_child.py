"""One benchmark process for the Python runners, with the native runner's JSON contract:

    python -m ossedge.benchmarks.bench_child --backend reference|executorch|coreml|onnx --model DIR
        [--prompt-length N] [--gen-tokens N] [--runs R] [--warmup W] [--threads T] [--seed S]
        [--expert-cache auto|off|SIZE]

Loads the model once (timed), then per run prefills the same seeded random prompt and decodes
greedily; prints one JSON object: load_s, runs [{ttft_s, prefill_s, decode_s, prefill_tok_s,
decode_tok_s, tokens}], rss (VmHWM, VmRSS, RssAnon, RssFile), major_faults. Warm-up runs are done
first and not reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from ossedge.benchmarks.harness import BACKENDS, prompt_ids
from ossedge.benchmarks.rss import proc_status
from ossedge.runtime.expert_cache import parse_option
from ossedge.targets import open_artifact


def load(backend: str, model: str, threads: int | None = None, expert_cache: str = "auto",
         routing: tuple[int, int | None] = (0, None)):  # fmt: skip
    """(model, vocab size) with the reference runtime's generation contract: a checkpoint in the
    reference runtime, or an artifact opened by its target (each takes the options it has)."""
    if backend == "reference":
        import torch

        from ossedge.runtime.model import load_model

        m = load_model(model, dtype=torch.float32)
        return m, m.config.vocab_size

    m = open_artifact(model, threads=threads, expert_cache=parse_option(expert_cache),
                      cache_aware_routing=routing[0], routing_pool=routing[1])  # fmt: skip
    return m, m.config.vocab_size


def read_bytes() -> int:
    """Bytes this process read from storage (/proc/self/io: page faults and preads alike)."""
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def counters(model) -> dict:
    """The native runner's per-phase counters: storage reads, major faults, expert cache."""
    out = {"read_bytes": read_bytes(),
           "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt}  # fmt: skip
    stats = getattr(model, "expert_cache_stats", lambda: None)()
    if stats:
        out.update(cache_hits=stats["hits"], cache_misses=stats["misses"],
                   cache_read_bytes=stats["bytes_read"], cache_wait_s=stats["wait_ns"] * 1e-9,
                   cache_busy_s=stats["busy_ns"] * 1e-9)
    return out


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def one_run(model, ids, gen: int) -> dict:
    """The timed loop every benchmark uses: prefill `ids` [1, N] in one call (the time to the first
    token), then decode greedily to `gen` tokens in all; times, speeds, I/O counters, tokens."""
    import torch

    cache = model.new_cache()
    c0 = counters(model)
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, last_only=True)
    tok = int(logits[0, -1].argmax())
    prefill = time.perf_counter() - t0
    c1 = counters(model)
    tokens, finite = [tok], bool(torch.isfinite(logits).all())
    t0 = time.perf_counter()
    for _ in range(gen - 1):
        logits = model(torch.tensor([[tok]]), cache=cache, last_only=True)
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
    finite = finite and bool(torch.isfinite(logits).all())
    decode = time.perf_counter() - t0
    c2 = counters(model)
    n = ids.shape[1]
    return {
        "ttft_s": prefill,
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_tok_s": n / prefill,
        "decode_tok_s": (gen - 1) / decode if gen > 1 else 0.0,
        "prefill_io": _delta(c0, c1),
        "decode_io": _delta(c1, c2),
        "tokens": tokens,
        "logits_finite": finite,  # of the prefill and the last step
    }


def command(backend: str, model: str | Path, prompt: int, gen: int, *, seed: int = 0) -> list[str]:
    """The argv of one measured run of this child: `prompt` seeded random tokens, then `gen`
    decode steps (the full-size benchmarks run it under their limits and read its JSON)."""
    return [sys.executable, "-m", "ossedge.benchmarks.bench_child", "--backend", backend,
            "--model", str(model), "--prompt-length", str(prompt), "--gen-tokens", str(gen + 1),
            "--runs", "1", "--warmup", "0", "--seed", str(seed)]  # fmt: skip


def child_result(out: dict) -> dict:
    """One run's figures from `command`'s JSON, flat: load_s, prefill_s, decode_s, prompt_tokens,
    gen_tokens (decode steps), prefill_major_faults, decode_major_faults, VmHWM, RssAnon, …"""
    run = out["runs"][0]
    return {"load_s": out["load_s"], "prefill_s": run["prefill_s"], "decode_s": run["decode_s"],
            "prompt_tokens": out["prompt_tokens"], "gen_tokens": out["gen_tokens"] - 1,
            "prefill_major_faults": run["prefill_io"]["major_faults"],
            "decode_major_faults": run["decode_io"]["major_faults"], **out["rss"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=BACKENDS)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-cache", default="auto", help="ExecuTorch: auto, off or a size")
    p.add_argument("--cache-aware-routing", type=int, default=0)
    p.add_argument("--routing-pool", type=int, default=None)
    p.add_argument("--prompt-ids", default=None, help="Comma-separated prompt token ids "
                   "(instead of a seeded random prompt of --prompt-length)")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, vocab = load(a.backend, a.model, a.threads, a.expert_cache,
                        (a.cache_aware_routing, a.routing_pool))
    load_s = time.perf_counter() - t0
    if a.prompt_ids:
        ids = torch.tensor([[int(x) for x in a.prompt_ids.split(",")]])
        a.prompt_length = ids.shape[1]
    else:
        ids = torch.tensor([prompt_ids(a.prompt_length, vocab, a.seed)])
    context = getattr(model, "max_context", None) or model.config.max_position_embeddings
    if a.prompt_length + a.gen_tokens > context:
        sys.exit(f"error: {a.prompt_length} prompt + {a.gen_tokens} generated tokens exceed the "
                 f"context of {context}; use shorter --prompt-lengths")
    for _ in range(a.warmup):
        one_run(model, ids, a.gen_tokens)
    runs = [one_run(model, ids, a.gen_tokens) for _ in range(a.runs)]
    print(json.dumps({
        "runner": f"python-{a.backend}",
        "model": a.model,
        "load_s": load_s,
        "threads": a.threads or torch.get_num_threads(),
        "prompt_tokens": a.prompt_length,
        "gen_tokens": a.gen_tokens,
        "warmup_runs": a.warmup,
        "runs": runs,
        "rss": proc_status(),
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
        "expert_cache": {"option": a.expert_cache,
                         "budget_bytes": getattr(model, "expert_cache_bytes", 0)},
    }))


if __name__ == "__main__":
    main()
