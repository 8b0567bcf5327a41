"""`ossedge generate`, `ossedge chat` and `ossedge profile-experts`: running a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ossedge.cli.common import (DTYPES, _load, _model_path, _progress, _sampler,
                                expert_cache_option, read_text, routing_options, with_sampling)
from ossedge.runtime.atomic import write_json
from ossedge.runtime.errors import OutputExistsError
from ossedge.runtime.harmony import Message


def _open_for_run(ckpt, dtype, sampling, expert_cache, routing):
    """(path, sampler, model, tokenizer) for generate and chat: CKPT or the bundled model, the
    sampler checked before the (slow) load."""
    ckpt = _model_path(ckpt)
    sampler = _sampler(*sampling)
    model, tok = _load(ckpt, dtype, expert_cache=expert_cache, routing=routing)
    return ckpt, sampler, model, tok


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", required=True, help="Text to continue.")
@with_sampling
@expert_cache_option
@routing_options
def generate(ckpt, prompt, max_new_tokens, temperature, top_p, top_k, seed, dtype,
             expert_cache, cache_aware_routing, routing_pool) -> None:
    """Continue PROMPT, streaming the text to stdout.

    CKPT is a checkpoint, quantized checkpoint or artifact directory (ExecuTorch, ONNX, Core AI;
    Core ML on macOS), run by its own runtime; without it, the bundled tiny trained model."""
    from ossedge.runtime.generate import generate as run
    from ossedge.runtime.generate import stop_ids_for

    ckpt, sampler, model, tok = _open_for_run(ckpt, dtype, (temperature, top_k, top_p, seed),
                                              expert_cache, (cache_aware_routing, routing_pool))
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


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path), required=False)
@click.option(
    "--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium",
    show_default=True,
)
@click.option("--show-reasoning", is_flag=True, help="Also print the analysis channel (dimmed).")
@click.option("--system", "instructions", default=None, help="Developer instructions.")
@with_sampling
@expert_cache_option
@routing_options
def chat(
    ckpt, reasoning_effort, show_reasoning, instructions, max_new_tokens, temperature, top_p,
    top_k, seed, dtype, expert_cache, cache_aware_routing, routing_pool,
) -> None:
    """Chat in the harmony format. One user message per line; Ctrl-D or /exit ends.

    CKPT is a checkpoint, quantized checkpoint or artifact directory (ExecuTorch, ONNX, Core AI;
    Core ML on macOS), run by its own runtime; without it, the bundled tiny trained model."""
    from ossedge.runtime.generate import chat_turn

    ckpt, sampler, model, tok = _open_for_run(ckpt, dtype, (temperature, top_k, top_p, seed),
                                              expert_cache, (cache_aware_routing, routing_pool))
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
        if reply.issues:  # malformed messages were dropped unseen: say so
            more = f" (and {len(reply.issues) - 1} more)" if len(reply.issues) > 1 else ""
            click.echo(f"[malformed reply: {reply.issues[0]}{more}]", err=True)
        messages.extend(reply.messages)


@click.command(name="profile-experts")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to route [default: the packaged held-out evaluation text].")
@click.option("--max-tokens", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--window", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens per forward pass (each window from its own start).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def profile_experts(model, text, max_tokens, window, dtype, out, force) -> None:
    """Count how often each layer's router selects each expert over a text, with the reference
    runtime, into PROFILE.json (for `convert --expert-profile` and `ossedge plan`).

    MODEL is a checkpoint or quantized checkpoint; without it, the bundled tiny trained model."""
    from ossedge.runtime.profile import make_profile
    from ossedge.runtime.profile import profile_experts as run

    model = _model_path(model)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    body, label = read_text(text)
    from ossedge.runtime.model import GptOssModel

    mdl, tok = _load(model, dtype)
    if not isinstance(mdl, GptOssModel):
        raise click.BadParameter(f"{model} is an artifact; profile the checkpoint it was made from",
                                 param_hint="MODEL")  # fmt: skip
    ids = tok.encode(body)[:max_tokens]
    if not ids:
        raise click.BadParameter(f"{label} has no tokens", param_hint="--text")
    counts = run(mdl, ids, window=window, progress=_progress())
    p = make_profile(counts, top_k=mdl.config.num_experts_per_tok, tokens=len(ids), text=label)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, p)
    share = p["top_quarter_share"]
    click.echo(f"wrote {out}: {len(ids)} tokens of {label}, {p['layers']} layers × "
               f"{p['experts']} experts; a layer's most selected quarter of experts takes "
               f"{min(share):.0%}–{max(share):.0%} of its selections (median "
               f"{sorted(share)[len(share) // 2]:.0%}; uniform routing 25%)")
