"""The full-size benchmark: synthetic gpt-oss-20b → ExecuTorch artifact → `ossedge bench` on this
machine (pybindings; the native runner with llama.cpp on the same weights as its peer, when
llama-cpp-python is installed; the native runner with its weights in huge-page heap memory; the
native runner under a memory limit; optionally the reference runtime) → `ossedge bench report`.

    python -m ossedge.benchmarks.full_20b [--ckpt out/gpt-oss-20b-synth] [--artifact out/20b-et]
        [--out out/bench-20b] [--prompt-lengths 128,512,1024] [--gen-tokens 16] [--runs 2]
        [--memory-limit 8G] [--reference]

Missing inputs are made first (`ossedge synth --preset 20b`, ~8 min; `ossedge convert --target
executorch`, ~7 min). Each step runs the `ossedge` command as a user would; the results and the
report land in --out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ossedge.benchmarks.peer import llama_cpp_available


def ossedge(*args: str) -> None:
    cmd = [sys.executable, "-m", "ossedge", *args]
    print("+ ossedge " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/gpt-oss-20b-synth")
    p.add_argument("--artifact", default="out/20b-et")
    p.add_argument("--out", default="out/bench-20b")
    p.add_argument("--prompt-lengths", default="128,512,1024")
    p.add_argument("--gen-tokens", default="16")
    p.add_argument("--runs", default="2")
    p.add_argument("--memory-limit", default="8G")
    p.add_argument("--no-peer", action="store_true", help="Skip llama.cpp")
    p.add_argument("--reference", action="store_true",
                   help="Also bench the reference runtime (bf16 torch: ~10 s per token here)")
    a = p.parse_args()

    ckpt, art, out = Path(a.ckpt), Path(a.artifact), Path(a.out)
    if not ckpt.exists():
        ossedge("synth", str(ckpt), "--preset", "20b")
    if not art.exists():
        ossedge("convert", str(ckpt), "--target", "executorch", "-o", str(art),
                "--verify-tokens", "0")
    out.mkdir(parents=True, exist_ok=True)
    common = ["--prompt-lengths", a.prompt_lengths, "--gen-tokens", a.gen_tokens,
              "--runs", a.runs, "--warmup", "1", "--force"]

    peer = [] if a.no_peer or not llama_cpp_available() else [
        "--peer", "llama.cpp", "--peer-gguf", str(out / "gpt-oss-20b.gguf")]
    results = []
    for name, extra in (
        ("et-pybindings", ["--runner", "pybindings"]),
        ("et-native", ["--runner", "native", *peer]),
        ("et-native-heap", ["--runner", "native", "--weights", "heap"]),
        (f"et-native-{a.memory_limit}", ["--runner", "native", "--memory-limit", a.memory_limit]),
    ):
        path = out / f"{name}.json"
        ossedge("bench", str(art), "--backend", "executorch", *extra, *common, "-o", str(path))
        results.append(str(path))
        if "--peer" in extra:
            results.append(str(out / f"{name}.llama-cpp.json"))
    if a.reference:
        path = out / "reference.json"
        ossedge("bench", str(ckpt), "--backend", "reference", "--prompt-lengths", "128",
                "--gen-tokens", "4", "--runs", "1", "--warmup", "0", "--force", "-o", str(path))
        results.append(str(path))
    ossedge("bench", "report", *results, "-o", str(out / "report"), "--force")


if __name__ == "__main__":
    main()
