"""`ossedge bench`: load time, time to first token, prefill and decode speed and peak memory of a
model per prompt length, over several runs (warm-up runs excluded), through one runner on one
transport, written as a RESULTS.json that carries the device, the artifact, the versions and
every raw timing (schema `ossedge-bench/1`, checked by `validate`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ossedge.benchmarks.limits import parse_size
from ossedge.benchmarks.peer import INSTALL_HINT, llama_cpp_available
from ossedge.benchmarks.roofline import bandwidth_gbs, decode_bytes, roofline
from ossedge.benchmarks.transports import open_transport
from ossedge.runtime.atomic import sha256_file
from ossedge.runtime.errors import BenchError
from ossedge.runtime.expert_cache import CacheOptionError, parse_option
from ossedge.targets import DEFAULT_TARGET, TARGETS, artifact_format, target_for_format

SCHEMA = "ossedge-bench/1"
DEFAULT_PROMPT_LENGTHS = (128, 512, 2048)
# the reference runtime on a checkpoint, or a target's artifact with its runners (registry order)
BACKENDS = ("reference", *TARGETS)
RUNNERS = {"reference": ("python",), **{name: t.runners for name, t in TARGETS.items()}}
SYSTEM_NAMES = {"Darwin": "macOS"}
# How the native runner holds the .ptd: mapped file pages (a phone's way, the default) or read
# into anonymous memory with transparent huge pages (a desktop's).
WEIGHTS = ("mmap", "heap")


def _takes(backend: str, option: str) -> bool:
    """Whether `backend`'s artifacts open with `option` (an expert cache, cache-aware routing)."""
    return backend in TARGETS and option in TARGETS[backend].open_options


def _owners(option: str) -> str:
    return " or ".join(t.title for t in TARGETS.values() if option in t.open_options)


def native_runner() -> Path:
    """The C++ runner built by `make install`."""
    return Path(__file__).parent / "runner" / "bin" / "ossedge_runner"


def describe_model(path: Path, backend: str) -> dict[str, Any]:
    """What is benchmarked: format, recipe, context and the manifest's sha256."""
    kind = artifact_format(path)
    want = None if backend == "reference" else backend
    if kind != want:
        if backend == "reference":
            raise BenchError(f"{path} is a {kind} artifact; the reference backend runs "
                             f"checkpoints — use --backend {kind}")
        raise BenchError(f"{path} is not an ossedge {want} artifact; make one with "
                         f"`ossedge convert --target {want}`")
    if kind is None:
        from ossedge.runtime.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        recipe = getattr(ckpt, "recipe", "native")
        manifest = path / "manifest.json"
        return {
            "path": str(path), "format": f"checkpoint ({ckpt.layout})", "recipe": recipe,
            "max_context": ckpt.config.max_position_embeddings,
            "vocab_size": ckpt.config.vocab_size,
            "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "config_sha256": sha256_file(path / "config.json") if (path / "config.json").is_file()
            else None,
        }
    m = json.loads((path / "manifest.json").read_text())
    return {"path": str(path), "format": m["format"], "recipe": m["recipe"],
            "max_context": m["max_context"], "vocab_size": m["config"]["vocab_size"],
            "manifest_sha256": sha256_file(path / "manifest.json"),
            "contract_version": m.get("contract_version")}



def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("ossedge", "torch", "executorch", "coremltools", "llama_cpp_python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    """The benchmark prompt: n seeded random ids below the special tokens (the same for every
    runner, so their greedy outputs can be compared)."""
    return np.random.default_rng(seed).integers(0, max(2, vocab - 1100), n).tolist()


def _command(backend: str, runner: str, remote: dict[str, str], n: int, a: dict,
             vocab: int) -> list[str]:
    ids = ",".join(map(str, prompt_ids(n, vocab, a["seed"])))
    common = ["--prompt-ids", ids, "--gen-tokens", str(a["gen_tokens"]),
              "--runs", str(a["runs"]), "--warmup", str(a["warmup"])]
    if a["threads"]:
        common += ["--threads", str(a["threads"])]
    if _takes(backend, "expert_cache"):
        common += ["--expert-cache", a["expert_cache"]]
        if a["cache_aware_routing"]:
            common += ["--cache-aware-routing", str(a["cache_aware_routing"])]
        if a["routing_pool"]:
            common += ["--routing-pool", str(a["routing_pool"])]
    if runner == "native":
        return [remote["runner"], "--model", remote["model"], "--kernels", remote["kernels"],
                "--weights", a["weights"], *common]
    return [sys.executable, "-m", "ossedge.benchmarks.bench_child", "--backend", backend,
            "--model", remote["model"], *common]


def run_bench(
    model: str | Path,
    *,
    backend: str = DEFAULT_TARGET,
    runner: str | None = None,
    device: str = "local",
    prompt_lengths: tuple[int, ...] | None = None,
    gen_tokens: int = 32,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    memory_limit: str | None = None,
    seed: int = 0,
    runner_bin: str | Path | None = None,
    weights: str = "mmap",
    expert_cache: str = "auto",
    cache_aware_routing: int = 0,
    routing_pool: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    model = Path(model)
    if backend not in BACKENDS:
        raise BenchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not model.exists():
        raise BenchError(f"{model}: no such model or artifact directory")
    if device != "local" and runner is None:
        runner = "native"  # nothing but the native runner runs on a phone
    runner = runner or RUNNERS[backend][0]
    if runner not in RUNNERS[backend]:
        raise BenchError(f"runner {runner!r} does not run the {backend} backend; choose "
                         f"{' or '.join(RUNNERS[backend])}")
    if device != "local" and runner != "native":
        raise BenchError(f"--device {device} runs the native ExecuTorch runner only "
                         "(--backend executorch --runner native)")
    if weights not in WEIGHTS:
        raise BenchError(f"unknown weights mode {weights!r}; choose {' or '.join(WEIGHTS)}")
    if weights != "mmap" and runner != "native":
        raise BenchError(f"--weights {weights} is a native runner mode (--backend executorch "
                         "--runner native); the other runners map the weights")

    try:
        parse_option(expert_cache)
    except CacheOptionError as e:
        raise BenchError(str(e)) from None
    if expert_cache != "auto" and not _takes(backend, "expert_cache"):
        raise BenchError(f"--expert-cache is an {_owners('expert_cache')} option; drop it for "
                         f"--backend {backend}")  # fmt: skip
    if (cache_aware_routing or routing_pool) and not _takes(backend, "cache_aware_routing"):
        raise BenchError(f"--cache-aware-routing is an {_owners('cache_aware_routing')} option; "
                         f"drop it for --backend {backend}")  # fmt: skip
    if expert_cache not in ("auto", "off") and weights == "heap":
        raise BenchError("--expert-cache reads experts from model.ptd; it does not apply to "
                         "--weights heap")
    needs = TARGETS[backend].predicts_on if backend in TARGETS else None
    if needs and platform.system() != needs:
        raise BenchError(f"{TARGETS[backend].title} predictions need "
                         f"{SYSTEM_NAMES.get(needs, needs)}; "
                         f"on {platform.system()} check the artifact with `ossedge verify` instead")
    if gen_tokens < 2 or runs < 1 or warmup < 0:
        raise BenchError("need --gen-tokens ≥ 2, --runs ≥ 1 and --warmup ≥ 0")
    info = describe_model(model, backend)
    if prompt_lengths is None:  # the defaults that fit this model's context
        prompt_lengths = tuple(n for n in DEFAULT_PROMPT_LENGTHS
                               if n + gen_tokens <= info["max_context"]) or (
            max(1, info["max_context"] - gen_tokens),)
    too_long = [n for n in prompt_lengths if n + gen_tokens > info["max_context"]]
    if too_long:
        raise BenchError(f"prompt length {too_long[0]} + {gen_tokens} generated tokens exceed "
                         f"{model}'s context of {info['max_context']}; use shorter "
                         "--prompt-lengths or convert with a larger --max-context")
    limit = parse_size(memory_limit) if memory_limit else None
    transport = open_transport(device, memory_limit=limit)
    files = {"model": model}
    if runner == "native":
        from ossedge.targets.executorch.library import kernel_library

        binary = Path(runner_bin) if runner_bin else native_runner()
        if not binary.is_file():
            raise BenchError(f"{binary}: the native runner is missing; run `make install` "
                             "(or give --runner-bin)")
        files.update(runner=binary, kernels=kernel_library())
        if not files["kernels"].is_file():
            raise BenchError(f"{files['kernels']}: the kernel library is missing; run "
                             "`make install`")
    remote = transport.stage(files)
    settings = {"prompt_lengths": list(prompt_lengths), "gen_tokens": gen_tokens, "runs": runs,
                "warmup": warmup, "threads": threads, "seed": seed, "weights": weights,
                "expert_cache": expert_cache if _takes(backend, "expert_cache") else None,
                "cache_aware_routing": cache_aware_routing, "routing_pool": routing_pool,
                "memory_limit": memory_limit, "memory_limit_bytes": limit}
    results, readings = _with_bandwidth(device, lambda: measure(
        transport, lambda n: _command(backend, runner, remote, n, settings, info["vocab_size"]),
        prompt_lengths, evict=[model], memory_limit=memory_limit, what=f"the {runner} runner",
        progress=progress,
    ))
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "backend": backend,
        "runner": runner,
        "device": transport.describe(),
        "artifact": info,
        "versions": versions(),
        "settings": settings,
        "results": results,
        "roofline": roofline(_bytes_per_token(model, info), readings),
    }


def _with_bandwidth(device: str, run):
    """run()'s value and the machine's read bandwidth (GB/s) read just before and just after it:
    the machine's, so for local runs only (a phone's is not read over adb)."""
    if device != "local":
        return run(), []
    before = bandwidth_gbs()
    value = run()
    return value, [before, bandwidth_gbs()]


def _bytes_per_token(model: Path, info: dict[str, Any]) -> int | None:
    """Weight bytes a decoded token reads in this artifact (its memory model); None for a
    checkpoint (the reference runtime computes in bf16/fp32 from whatever it stores)."""
    if target_for_format(info["format"]) is None:
        return None  # a checkpoint
    return decode_bytes(json.loads((model / "manifest.json").read_text()))


def measure(transport, argv_for, prompt_lengths, *, evict: list[Path], memory_limit: str | None,
            what: str, progress: bool = False) -> list[dict[str, Any]]:
    """Run one process per prompt length (`argv_for(n)`) on the transport; their summaries."""
    results = []
    for n in tqdm(prompt_lengths, desc="bench", unit="prompt", disable=not progress):
        if memory_limit is not None:
            transport.evict(evict)  # the limited run pays for its own reads
        t0 = time.perf_counter()
        p = transport.run(argv_for(n))
        if p.returncode:
            if p.returncode in (-9, 137) and memory_limit is not None:
                raise BenchError(f"prompt {n}: killed, out of memory under --memory-limit "
                                 f"{memory_limit}; the model's heap does not fit that limit")
            last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or ["(no output)"]
            raise BenchError(f"prompt {n}: {what} failed (exit {p.returncode}): "
                             f"{last[0][:300]}")
        raw = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(summarize(raw, wall_s=time.perf_counter() - t0))
    return results


def run_peer(ours: dict[str, Any], *, gguf: str | Path, progress: bool = False) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) on the same weights as the benchmarked ExecuTorch artifact
    — written as a GGUF from the artifact's source checkpoint with its recipe (MXFP4 experts and
    int4 linears repacked losslessly) unless `gguf` exists — with the same prompts, token counts,
    runs, threads and memory limit. Returns a result in the same schema (backend `llama.cpp`)."""
    if not llama_cpp_available():
        raise BenchError(INSTALL_HINT)
    if ours["backend"] != "executorch" or ours["device"]["transport"] != "local":
        raise BenchError("--peer llama.cpp compares with a local ExecuTorch benchmark")
    art = Path(ours["artifact"]["path"])
    manifest = json.loads((art / "manifest.json").read_text())
    gguf = Path(gguf)
    export = None
    if not gguf.is_file():
        from ossedge.benchmarks.gguf_export import write_gguf

        source = Path(manifest.get("source", ""))
        if not source.exists():
            raise BenchError(f"{art} was converted from {source}, which is gone; the llama.cpp "
                             "peer writes its GGUF from that checkpoint (or give --peer-gguf)")
        export = write_gguf(source, gguf, recipe=manifest["recipe"], progress=progress)
    st = ours["settings"]
    threads = st["threads"] or os.cpu_count() or 1
    vocab = ours["artifact"]["vocab_size"]
    limit = st["memory_limit"]
    transport = open_transport("local", memory_limit=parse_size(limit) if limit else None)

    def argv(n: int) -> list[str]:
        ids = ",".join(map(str, prompt_ids(n, vocab, st["seed"])))
        return [sys.executable, "-m", "ossedge.benchmarks.peer", "--model", str(gguf),
                "--prompt-ids", ids, "--gen-tokens", str(st["gen_tokens"]), "--runs",
                str(st["runs"]), "--warmup", str(st["warmup"]), "--threads", str(threads)]

    results, readings = _with_bandwidth("local", lambda: measure(
        transport, argv, st["prompt_lengths"], evict=[gguf], memory_limit=limit,
        what="llama.cpp", progress=progress))
    return {
        **{k: ours[k] for k in ("schema", "command", "device", "versions")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": "llama.cpp",
        "runner": "llama-cpp-python",
        "artifact": {"path": str(gguf), "format": "gguf", "recipe": manifest["recipe"],
                     "max_context": ours["artifact"]["max_context"], "vocab_size": vocab,
                     "manifest_sha256": ours["artifact"]["manifest_sha256"],
                     "weights_of": str(art), "export": export},
        # llama.cpp places its weights itself (mapped, repacked into the heap where it can)
        "settings": {**{k: v for k, v in st.items() if k != "weights"}, "threads": threads},
        "results": results,
        # the same weights, so the same bytes per token
        "roofline": roofline(ours["roofline"]["bytes_per_token"], readings),
    }


def summarize(raw: dict[str, Any], *, wall_s: float) -> dict[str, Any]:
    runs = raw["runs"]
    rss = raw.get("rss", {})
    return {
        "prompt_tokens": raw["prompt_tokens"],
        "gen_tokens": raw["gen_tokens"],
        "load_s": raw["load_s"],
        "ttft_s": stats([r["ttft_s"] for r in runs]),
        "prefill_tok_s": stats([r["prefill_tok_s"] for r in runs]),
        "decode_tok_s": stats([r["decode_tok_s"] for r in runs]),
        "peak_rss_bytes": rss.get("VmHWM"),
        "rss_anon_bytes": rss.get("RssAnon"),
        "rss_file_bytes": rss.get("RssFile"),
        "anon_huge_bytes": rss.get("AnonHugePages"),
        "major_faults": raw.get("major_faults"),
        "threads": raw.get("threads"),
        "wall_s": round(wall_s, 2),
        "raw": raw,
    }


_REQUIRED = {"schema": str, "backend": str, "runner": str, "device": dict, "artifact": dict,
             "versions": dict, "settings": dict, "results": list}
_RESULT = {"prompt_tokens": int, "gen_tokens": int, "load_s": float, "ttft_s": dict,
           "prefill_tok_s": dict, "decode_tok_s": dict, "raw": dict}


def validate(d: Any, where: str = "results") -> dict[str, Any]:
    """Check a RESULTS.json against the schema; BenchError names the first problem."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise BenchError(f"{where}: not an ossedge bench result (schema {SCHEMA} expected)")
    for key, typ in _REQUIRED.items():
        if not isinstance(d.get(key), typ):
            raise BenchError(f"{where}: {key!r} missing or not a {typ.__name__}")
    if not d["results"]:
        raise BenchError(f"{where}: no results")
    for i, r in enumerate(d["results"]):
        for key, typ in _RESULT.items():
            v = r.get(key)
            ok = isinstance(v, (int, float)) if typ is float else isinstance(v, typ)
            if not ok:
                raise BenchError(f"{where}: results[{i}].{key} missing or not a {typ.__name__}")
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
            if set(r[key]) != {"median", "min", "max", "stdev"} or r[key]["median"] <= 0:
                raise BenchError(f"{where}: results[{i}].{key} is not a positive statistic")
        if len(r["raw"].get("runs", [])) != d["settings"].get("runs"):
            raise BenchError(f"{where}: results[{i}] has {len(r['raw'].get('runs', []))} raw "
                             f"runs, settings say {d['settings'].get('runs')}")
    return d
