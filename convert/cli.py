"""The `ossedge` command line. Results go to stdout, logs and progress bars to stderr.

Exit codes: 0 ok, 1 error, 2 usage, 3 parity failed, 4 does not fit the device, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ossedge import __version__

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _progress() -> bool:
    return sys.stderr.isatty()


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="ossedge")
def cli(debug: bool) -> None:
    """Quantize, export, size and benchmark gpt-oss-20b for 16 GB phones, tablets and laptops."""


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "20b"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layout", type=click.Choice(["hf", "original"]), default="hf", show_default=True)
@click.option(
    "--experts",
    type=click.Choice(["mxfp4", "dense"]),
    default="mxfp4",
    show_default=True,
    help="Experts as released (MXFP4) or dequantized to bf16 (HF 'dequantize' layout).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out: Path, preset: str, seed: int, layout: str, experts: str, force: bool) -> None:
    """Write a random-weight gpt-oss checkpoint in the exact released format to OUT."""
    from ossedge.runtime.synth import synthesize

    path = synthesize(
        out,
        preset_name=preset,
        seed=seed,
        layout=layout,
        expert_format=experts,
        force=force,
        progress=_progress(),
    )
    click.echo(f"wrote {preset} checkpoint ({layout} layout, {experts} experts) to {path}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, as_json: bool) -> None:
    """Layout, config, parameter counts, bytes by dtype, MXFP4 census and validation of PATH."""
    from ossedge.runtime.summary import format_summary, summarize

    s = summarize(path)
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))


def _sampler(temperature: float, top_k: int | None, top_p: float | None, seed: int | None):
    from ossedge.runtime.sampling import Sampler

    try:
        return Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _load(ckpt: Path, dtype: str):
    from ossedge.runtime import load_model
    from ossedge.runtime.checkpoint import detect_layout
    from ossedge.runtime.tokenizer import Tokenizer

    root, _ = detect_layout(ckpt)
    tokenizer = Tokenizer.from_dir(root if (root / "tokenizer.json").exists() else root.parent)
    return load_model(ckpt, dtype=_dtype(dtype)), tokenizer


sampling_options = [
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True),
    click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy."),
    click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold in (0, 1]."),
    click.option("--top-k", type=click.IntRange(min=1), default=None),
    click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True),
]


def with_sampling(f):
    for option in reversed(sampling_options):
        f = option(f)
    return f


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@with_sampling
def generate(ckpt, prompt, max_new_tokens, temperature, top_p, top_k, seed, dtype) -> None:
    """Continue PROMPT with the reference runtime, streaming the text to stdout."""
    from ossedge.runtime.generate import generate as run, stop_ids_for

    sampler = _sampler(temperature, top_k, top_p, seed)
    model, tok = _load(ckpt, dtype)
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    stop_ids = stop_ids_for(ckpt, tok)  # before any output: a bad config fails cleanly
    click.echo(prompt, nl=False)
    result = run(
        model,
        tok,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        stop_ids=stop_ids,
        on_text=lambda piece: click.echo(piece, nl=False),
    )
    click.echo()
    click.echo(
        f"[{len(result.ids)} tokens, stop: {result.stop_reason}, prefill "
        f"{result.prefill_tok_s:.1f} tok/s, decode {result.decode_tok_s:.1f} tok/s]",
        err=True,
    )


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option(
    "--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium",
    show_default=True,
)
@click.option("--show-reasoning", is_flag=True, help="Also print the analysis channel (dimmed).")
@click.option("--system", "instructions", default=None, help="Developer instructions.")
@with_sampling
def chat(
    ckpt, reasoning_effort, show_reasoning, instructions, max_new_tokens, temperature, top_p,
    top_k, seed, dtype,
) -> None:
    """Chat in the harmony format. One user message per line; Ctrl-D or /exit ends."""
    from ossedge.runtime.generate import chat_turn
    from ossedge.runtime.harmony import Message

    sampler = _sampler(temperature, top_k, top_p, seed)
    model, tok = _load(ckpt, dtype)
    interactive = sys.stdin.isatty()
    messages: list[Message] = []
    if instructions:
        messages.append(Message(role="developer", content=instructions))
    while True:
        if interactive:
            click.echo(click.style("you> ", bold=True), nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append(Message(role="user", content=line.rstrip("\n")))
        reply = chat_turn(
            model,
            tok,
            messages,
            reasoning_effort=reasoning_effort,
            sampler=sampler,
            max_new_tokens=max_new_tokens,
            show_reasoning=show_reasoning,
            on_text=lambda piece: click.echo(piece, nl=False),
            on_reasoning=lambda piece: click.echo(click.style(piece, dim=True), nl=False, err=True),
        )
        click.echo()
        if not reply.final:
            hint = "" if show_reasoning else "; --show-reasoning shows the analysis channel"
            click.echo(
                f"[no final answer: {reply.meta.get('new_tokens', 0)} tokens, stop: "
                f"{reply.stop_reason}{hint}]",
                err=True,
            )
        messages.extend(reply.messages)


def main() -> None:
    """Console entry point: typed errors become one line and an exit code (tracebacks: --debug)."""
    from ossedge.runtime.errors import OssedgeError

    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False, prog_name="ossedge")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OssedgeError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug or an unforeseen input: still one line unless --debug
        if debug:
            raise
        click.echo(f"error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", err=True)
        sys.exit(1)
