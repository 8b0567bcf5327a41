"""`ossedge bench MODEL …` (measure) and `ossedge bench report RESULTS… -o DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ossedge.benchmarks.harness import BACKENDS, RUNNERS, BenchError, run_bench, run_peer
from ossedge.benchmarks.peer import INSTALL_HINT, llama_cpp_available
from ossedge.benchmarks.report import write_report
from ossedge.cli.common import routing_options
from ossedge.runtime.atomic import write_json
from ossedge.runtime.errors import OutputExistsError
from ossedge.targets import DEFAULT_TARGET


class _DefaultRun(click.Group):
    """`ossedge bench MODEL …` means `ossedge bench run MODEL …`; `report` is the other verb."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultRun)
def bench() -> None:
    """Benchmark a model: `ossedge bench MODEL [options] -o RESULTS.json`, then
    `ossedge bench report RESULTS*.json -o DIR`."""


def _lengths(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter("give positive prompt lengths, e.g. 128,512,2048")
    return out


@bench.command(name="run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=DEFAULT_TARGET,
              show_default=True)
@click.option("--runner", type=click.Choice([r for rs in RUNNERS.values() for r in rs]),
              default=None, help="executorch: pybindings (default here) or native (the C++ "
              "runner; the only one on adb).")
@click.option("--device", default="local", show_default=True,
              help="local, adb (the one attached device) or adb:SERIAL.")
@click.option("--prompt-lengths", default=None, callback=_lengths,
              help="Comma-separated [default: 128,512,2048, those that fit the context].")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Runs before the measured ones, not reported.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="[default: every core]")
@click.option("--memory-limit", default=None,
              help="Run inside a memory cgroup of this size (e.g. 8G): an 8 GB device.")
@click.option("--runner-bin", type=click.Path(path_type=Path), default=None,
              help="Another native runner binary (e.g. built for Android with the NDK).")
@click.option("--weights", type=click.Choice(["mmap", "heap"]), default="mmap", show_default=True,
              help="Native runner: keep model.ptd as mapped file pages (reclaimable, as on a "
              "phone) or read it into anonymous memory with transparent huge pages (a desktop).")
@click.option("--expert-cache", default="auto", show_default=True,
              help="ExecuTorch: read experts through a cache of this many bytes of anonymous "
              "memory (e.g. 6G), off (the memory-mapped model.ptd), or auto: off where the "
              "artifact fits the memory limit, else the limit minus the resident rest.")
@routing_options
@click.option("--peer", type=click.Choice(["llama.cpp"]), default=None,
              help="Then run llama.cpp (llama-cpp-python, `pip install llama-cpp-python`) on the "
              "same weights as a GGUF, same prompts and threads → OUTPUT's name + .llama-cpp.json.")
@click.option("--peer-gguf", type=click.Path(path_type=Path), default=None,
              help="The GGUF for --peer: reused when it exists, else written there "
              "[default: beside OUTPUT, .gguf].")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def run(model, backend, runner, device, prompt_lengths, gen_tokens, runs, warmup, threads,
        memory_limit, runner_bin, weights, expert_cache, cache_aware_routing, routing_pool, peer,
        peer_gguf, out, force) -> None:  # fmt: skip
    """Measure MODEL: load time, time to first token, prefill and decode tok/s (median and
    spread over --runs), peak RSS (heap and file-backed), per prompt length → OUTPUT (JSON)."""
    peer_out = out.with_name(out.stem + ".llama-cpp.json")
    for path in [out] + ([peer_out] if peer else []):
        if path.exists() and not force:
            raise OutputExistsError(f"{path} already exists; pass --force to replace it")
    if peer:
        if not llama_cpp_available():
            raise BenchError(INSTALL_HINT)
    progress = sys.stderr.isatty()
    r = run_bench(model, backend=backend, runner=runner, device=device, runner_bin=runner_bin,
                  prompt_lengths=prompt_lengths, gen_tokens=gen_tokens, runs=runs,
                  warmup=warmup, threads=threads, memory_limit=memory_limit, weights=weights,
                  expert_cache=expert_cache, cache_aware_routing=cache_aware_routing,
                  routing_pool=routing_pool, progress=progress)
    _write(out, r)
    if peer:
        _write(peer_out, run_peer(r, gguf=peer_gguf or out.with_suffix(".gguf"),
                                  progress=progress))


def _write(out: Path, r: dict) -> None:
    write_json(out, r)
    for x in r["results"]:
        click.echo(
            f"{r['backend']}/{r['runner']} prompt {x['prompt_tokens']:>5}: load "
            f"{x['load_s']:.2f} s, TTFT {x['ttft_s']['median']:.3f} s, prefill "
            f"{x['prefill_tok_s']['median']:.1f} tok/s, decode {x['decode_tok_s']['median']:.2f} "
            f"tok/s, peak RSS {(x['peak_rss_bytes'] or 0) / 1e9:.2f} GB")
    click.echo(f"wrote {out}")


@bench.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def report(results, out, force) -> None:
    """Markdown report with tables and PNG plots from RESULTS.json files, into directory OUT."""
    path = write_report(list(results), out, force=force)
    click.echo(f"wrote {path}/report.md with decode_vs_context.png, ttft_vs_prompt.png, "
               "memory.png")
