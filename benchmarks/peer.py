"""llama.cpp as a peer runner (through llama-cpp-python), with ossedge's runner JSON contract:

    python -m ossedge.benchmarks.peer --model FILE.gguf --prompt-ids 1,2,3 [--gen-tokens N]
        [--runs R] [--warmup W] [--threads T]

Loads the GGUF once (timed), then per run clears the context, evaluates the prompt (prefill, which
is also the time to the first token) and decodes greedily one token at a time, taking the argmax of
the raw logits (no sampler, so runs are deterministic). Prints one JSON object like
`bench_child`: load_s, runs [{ttft_s, prefill_s, decode_s, prefill_tok_s, decode_tok_s, tokens}],
rss, major_faults. `run_llama_cpp_child` runs it in a child process, so its memory is its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time

import numpy as np

from ossedge.benchmarks.rss import proc_status
from ossedge.runtime.errors import BenchError

INSTALL_HINT = "llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python"


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _import_llama():
    try:
        import llama_cpp
    except ImportError as e:
        raise BenchError(f"{INSTALL_HINT} ({e})") from None
    return llama_cpp


def load_llama(model: str, n_ctx: int, threads: int, *, logits_all: bool = False):
    """A llama.cpp context over `model`, memory-mapped, quiet."""
    llama_cpp = _import_llama()
    return llama_cpp.Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        logits_all=logits_all,
        verbose=False,
        use_mmap=True,
    )


def _last_logits(llm):
    ptr = llm._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def one_run(llm, ids: list[int], gen: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(_last_logits(llm).argmax())
    prefill = time.perf_counter() - t0
    tokens = [tok]
    t0 = time.perf_counter()
    for _ in range(gen - 1):
        llm.eval([tok])
        tok = int(_last_logits(llm).argmax())
        tokens.append(tok)
    decode = time.perf_counter() - t0
    return {
        "ttft_s": prefill,
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_tok_s": len(ids) / prefill,
        "decode_tok_s": (gen - 1) / decode if gen > 1 else 0.0,
        "tokens": tokens,
    }


def bench(model: str, ids: list[int], gen: int, runs: int, warmup: int, threads: int) -> dict:
    if not ids:
        raise BenchError("the llama.cpp peer needs a non-empty prompt")
    if gen < 1:
        raise BenchError(f"--gen-tokens must be at least 1, got {gen}")
    t0 = time.perf_counter()
    llm = load_llama(model, len(ids) + gen + 8, threads)
    load_s = time.perf_counter() - t0
    for _ in range(warmup):
        one_run(llm, ids, gen)
    results = [one_run(llm, ids, gen) for _ in range(runs)]
    return {
        "runner": "llama.cpp",
        "model": str(model),
        "load_s": load_s,
        "threads": threads,
        "prompt_tokens": len(ids),
        "gen_tokens": gen,
        "warmup_runs": warmup,
        "runs": results,
        "rss": proc_status(),
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
    }


def run_llama_cpp_child(
    gguf_path,
    prompt_ids: list[int],
    gen_tokens: int,
    runs: int,
    warmup: int,
    threads: int,
    *,
    timeout: float | None = None,
) -> dict:
    """Run the llama.cpp benchmark in a child Python process; its parsed JSON."""
    if not llama_cpp_available():
        raise BenchError(INSTALL_HINT)
    cmd = [
        sys.executable, "-m", "ossedge.benchmarks.peer",
        "--model", str(gguf_path),
        "--prompt-ids", ",".join(str(int(i)) for i in prompt_ids),
        "--gen-tokens", str(gen_tokens),
        "--runs", str(runs),
        "--warmup", str(warmup),
        "--threads", str(threads),
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"llama.cpp peer on {gguf_path} ran past {timeout} s") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise BenchError(
            f"llama.cpp peer on {gguf_path} exited with {p.returncode}: " + " | ".join(tail)
        )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"llama.cpp peer on {gguf_path} printed no JSON: {p.stdout[-500:]!r}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a GGUF file")
    p.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=4)
    a = p.parse_args(argv)
    ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
    try:
        out = bench(a.model, ids, a.gen_tokens, a.runs, a.warmup, a.threads)
    except BenchError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
