"""The `ossedge` command line. Results go to stdout, logs and progress bars to stderr.

Exit codes: 0 ok, 1 error, 2 usage, 3 parity failed, 4 does not fit the device, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from ossedge import __version__
from ossedge.cli.common import (DTYPES, _load, _progress, _tokenizer_dir, expert_cache_option,
                                read_text, routing_options)
from ossedge.cli.run import chat, generate, profile_experts
from ossedge.quantize.recipes import DEFAULT_RECIPE, RECIPES
from ossedge.runtime import config
from ossedge.targets import DEFAULT_TARGET, TARGETS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--strict-config", is_flag=True,
              help="Refuse config.json keys that gpt-oss does not use (default: ignore them with "
              "one warning).")  # fmt: skip
@click.version_option(__version__, prog_name="ossedge")
def cli(debug: bool, strict_config: bool) -> None:
    """Quantize, export, size and benchmark gpt-oss-20b for 16 GB phones, tablets and laptops."""
    config.strict(strict_config)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "20b"]), default="tiny", show_default=True,
              help="tiny: 4 layers, hidden 64, a small tokenizer; 20b: gpt-oss-20b's shapes and "
              "its released tokenizer (needs the tokenizer extra).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layout", type=click.Choice(["hf", "original"]), default="hf", show_default=True)
@click.option(
    "--experts",
    type=click.Choice(["mxfp4", "dense"]),
    default="mxfp4",
    show_default=True,
    help="Experts as released (MXFP4) or dequantized to bf16 (HF 'dequantize' layout).",
)
@click.option(
    "--router-skew", is_flag=True,
    help="Offset router biases so each layer's expert usage is skewed as in gpt-oss-20b's "
    "published profiles (its top quarter of experts takes 43-79% of selections) instead of the "
    "near-uniform routing of random weights.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out: Path, preset: str, seed: int, layout: str, experts: str, router_skew: bool,
          force: bool) -> None:  # fmt: skip
    """Write a random-weight gpt-oss checkpoint in the exact released format to OUT."""
    from ossedge.runtime.synth import synthesize

    path = synthesize(
        out,
        preset_name=preset,
        seed=seed,
        layout=layout,
        expert_format=experts,
        router_skew=router_skew,
        force=force,
        progress=_progress(),
    )
    skew = ", skewed routing" if router_skew else ""
    click.echo(f"wrote {preset} checkpoint ({layout} layout, {experts} experts{skew}) to {path}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, as_json: bool) -> None:
    """Layout, config, parameter counts, bytes by dtype, MXFP4 census and validation of PATH."""
    from ossedge.runtime.summary import format_summary, summarize

    s = summarize(path)
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))






@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=DEFAULT_RECIPE,
    show_default=True,
    help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def quantize(ckpt: Path, out: Path, recipe: str, force: bool) -> None:
    """Write CKPT quantized with a recipe to OUT (safetensors + manifest.json), streaming."""
    from ossedge.runtime.checkpoint import read_manifest
    from ossedge.runtime.quantized import quantize_checkpoint

    start = time.perf_counter()
    path = quantize_checkpoint(ckpt, out, recipe=recipe, force=force, progress=_progress())
    m = read_manifest(path)
    by_format = ", ".join(f"{f} {_gb(n)}" for f, n in sorted(m["bytes_by_format"].items()))
    click.echo(
        f"wrote {path} (recipe {recipe}): {_gb(m['total_bytes'])} in {len(m['files'])} files "
        f"[{by_format}] in {time.perf_counter() - start:.1f} s"
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@cli.command(name="eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--reference", type=click.Path(path_type=Path), required=True,
    help="The checkpoint MODEL is compared with (usually the one it was quantized from).",
)
@click.option(
    "--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="UTF-8 text to evaluate on [default: the packaged held-out Python text].",
)
@click.option("--window", type=click.IntRange(min=2), default=256, show_default=True)
@click.option(
    "--max-tokens", type=click.IntRange(min=2), default=None,
    help="Evaluate only the first N tokens of the text.",
)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@expert_cache_option
@routing_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_(model, reference, text, window, max_tokens, dtype, expert_cache, cache_aware_routing,
          routing_pool, as_json) -> None:  # fmt: skip
    """Perplexity, KL divergence and top-1 agreement of MODEL against the reference CKPT.

    MODEL is a checkpoint, quantized checkpoint or artifact; an artifact is scored in one-token
    (decode) calls."""
    from ossedge.runtime.evaluate import describe, evaluate

    body, label = read_text(text)
    tok_dirs = [_tokenizer_dir(p) for p in (model, reference)]
    files = [d / "tokenizer.json" for d in tok_dirs]
    if all(f.is_file() for f in files) and sha256_file(files[0]) != sha256_file(files[1]):
        raise TokenizerError(
            f"{files[0]} and {files[1]} differ: MODEL and --reference must share a tokenizer"
        )
    ref, tok = _load(reference, dtype, verify=True)
    mdl, _ = _load(model, dtype, verify=True, expert_cache=expert_cache,
                   routing=(cache_aware_routing, routing_pool))
    if mdl.config.vocab_size != ref.config.vocab_size:
        raise ConfigError(
            f"{model} has vocab_size {mdl.config.vocab_size}, {reference} has "
            f"{ref.config.vocab_size}: they are not the same model family"
        )
    ids = tok.encode(body)[:max_tokens]
    if len(ids) < 2:
        raise click.BadParameter(f"{label} has fewer than 2 tokens", param_hint="--text")
    context = mdl.config.max_position_embeddings
    if min(window, len(ids)) > context:
        raise click.BadParameter(f"{window} tokens do not fit {model}'s context of {context}; "
                                 f"give --window {context} or less", param_hint="--window")  # fmt: skip
    r = evaluate(mdl, ref, ids, window=window, progress=_progress())
    result = {"model": describe(model, artifact_format(model)),
              "reference": describe(reference, artifact_format(reference)), "text": label, **r}
    stats = getattr(mdl, "expert_cache_stats", lambda: None)()
    if stats:
        looked = stats["hits"] + stats["misses"]
        result["expert_cache"] = {
            "budget_bytes": mdl.expert_cache_bytes, "slots": stats["slots"],
            "hit_rate": stats["hits"] / looked if looked else None,
            "cache_aware_routing": mdl.cache_aware_routing, "routing_pool": mdl.routing_pool,
            "rerouted_share": stats["rerouted"] / looked if looked else None,
        }  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    m = result["model"]
    recipe = f", recipe {m['recipe']}" if "recipe" in m else ""
    rel = r["perplexity_model"] / r["perplexity_reference"] - 1
    click.echo(f"model       {model} ({m['layout']}{recipe})")
    click.echo(f"reference   {reference} ({result['reference']['layout']})")
    click.echo(f"text        {label}: {r['tokens_scored']} tokens scored in {r['windows']} "
               f"windows of {window}")
    click.echo(f"perplexity  model {r['perplexity_model']:.3f}  reference "
               f"{r['perplexity_reference']:.3f}  ({rel:+.2%})")
    click.echo(f"KL(ref||model)  mean {r['kl_mean']:.5f}  median {r['kl_median']:.5f}  "
               f"p99 {r['kl_p99']:.5f}  max {r['kl_max']:.5f}")
    click.echo(f"top-1 agreement {r['top1_agreement']:.2%}   [{r['seconds']:.1f} s]")
    if result.get("expert_cache", {}).get("hit_rate") is not None:
        c = result["expert_cache"]
        routing = (f", cache-aware routing keeps {c['cache_aware_routing']} of the top "
                   f"{c['routing_pool']} and changed {c['rerouted_share']:.1%} of the choices"
                   if c["cache_aware_routing"] else "")  # fmt: skip
        click.echo(f"expert cache {c['slots']} slots, hit rate {c['hit_rate']:.1%}{routing}")


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--target", type=click.Choice(list(TARGETS)), default=DEFAULT_TARGET,
    show_default=True,
    help="executorch: model.pte + model.ptd for ExecuTorch (Android, iOS, desktop CPUs); "
    "coreml: .mlpackage functions for Core ML (iPhone, iPad, Mac); onnx: model.onnx + "
    "external data for ONNX Runtime (and onnxruntime-genai).",
)
@click.option(
    "--recipe", type=click.Choice(list(RECIPES)), default=None,
    help=f"Quantization recipe [default: {DEFAULT_RECIPE} (coreml ios18: int4), or the recipe of "
    "a quantized CKPT].",
)
@click.option(
    "--deployment-target", type=click.Choice(["ios26", "ios18"]), default=None,
    help="coreml only: ios26 (iOS/macOS 26) stores MXFP4 experts exactly; ios18 (iOS 18 / "
    "macOS 15) needs int4 experts [default: ios26, or the --device's].",
)
@click.option(
    "--chunk-mb", type=click.IntRange(min=1), default=None,
    help="coreml, coreai: largest .mlpackage or layer chunk, in MB [default: 1024].",
)
@click.option(
    "--max-context", type=click.IntRange(min=1), default=None,
    help="KV cache length in tokens [default: 4096, at most the model's].",
)
@click.option(
    "--max-prefill", type=click.IntRange(min=1), default=None,
    help="Most tokens per forward call [default: the sliding window].",
)
@click.option(
    "--verify-tokens", type=click.IntRange(min=0), default=None,
    help="Tokens of the parity check after converting [default: 2 windows + 16]; 0 skips it.",
)
@click.option(
    "--device", "device_name", default=None,
    help="Size the artifact for a device profile (see `ossedge plan`): pick the recipe and "
    "context that fit it, refuse (exit 4) what cannot fit.",
)
@click.option(
    "--expert-profile", type=click.Path(path_type=Path), default=None,
    help="executorch only: a routing profile (`ossedge profile-experts`) to embed; the expert "
    "cache pins the experts it selects most.",
)
@click.option(
    "--lookahead/--no-lookahead", default=None,
    help="executorch: each layer's MoE also applies the next layer's router to its hidden state, "
    "and the expert cache starts reading those experts early (same results) [default: on].",
)
@click.option("--force", is_flag=True,
              help="Replace OUT if it exists; with --device, build even what does not fit.")
def convert(ckpt, out, target, recipe, deployment_target, chunk_mb, max_context, max_prefill,
            verify_tokens, device_name, expert_profile, lookahead, force) -> None:
    """Convert CKPT into a deployable artifact directory OUT, then verify it against CKPT.

    executorch: model.pte (program; forward(tokens[1,T], input_pos[1]) -> logits of the last
    token, KV cache inside) + model.ptd (all weights, memory-mappable) + tokenizer.json +
    manifest.json. Needs the ossedge kernel library (built by `make install`) to run.

    coreml: chunk_NN.mlpackage (multifunction: attn_L with KV-cache states, expert_L_E, head) +
    embedding.safetensors + tokenizer.json + manifest.json (functions, call order). Verified
    here with ossedge's MIL interpreter; runs with Core ML on Apple devices.

    onnx: model.onnx (GroupQueryAttention, QMoE, MatMulNBits) + model.onnx.data (all weights) +
    genai_config.json (onnxruntime-genai) + tokenizer.json + manifest.json.

    coreai: layers_NN.aimodel (decode and prefill functions, KV caches as states, experts MXFP4
    as stored) + head.aimodel + embedding.safetensors + tokenizer.json + manifest.json. Needs
    `pip install 'ossedge[coreai]'`; verified and run here by coreai-core's runtime."""
    from ossedge.convert import pipeline

    t = TARGETS[target]
    flags = {"max_prefill": ("--max-prefill", max_prefill),
             "profile": ("--expert-profile", expert_profile),
             "lookahead": ("--lookahead", lookahead),
             "deployment_target": ("--deployment-target", deployment_target),
             "chunk_mb": ("--chunk-mb", chunk_mb)}  # fmt: skip
    for key, (flag, value) in flags.items():
        if value is not None and key not in t.convert_options:
            owners = [n for n, other in TARGETS.items() if key in other.convert_options]
            raise click.UsageError(f"{flag} applies to --target {' or '.join(owners)} only")
    if device_name is not None and not t.device_plans:
        planned = [n for n, other in TARGETS.items() if other.device_plans]
        raise click.UsageError(f"--device plans the {' and '.join(planned)} targets; drop it for "
                               f"{target}")  # fmt: skip
    option = None
    if device_name is not None:
        option = _device_choice(ckpt, device_name, target, recipe, max_context, max_prefill, force)
        recipe, max_context = option.recipe, option.footprint.context
        deployment_target = deployment_target or option.deployment_target
    profile = None
    if expert_profile is not None:
        from ossedge.runtime.checkpoint import open_checkpoint
        from ossedge.runtime.profile import read_profile

        cfg = open_checkpoint(ckpt).config
        profile = read_profile(expert_profile, layers=cfg.num_hidden_layers,
                               experts=cfg.num_local_experts)  # fmt: skip
    given = {"max_prefill": max_prefill, "profile": profile, "lookahead": lookahead,
             "deployment_target": deployment_target, "chunk_mb": chunk_mb}  # fmt: skip
    options = {k: v for k, v in given.items() if v is not None and k in t.convert_options}
    m = pipeline.convert(t, ckpt, out, recipe=recipe, max_context=max_context, force=force,
                         progress=_progress(), verify_tokens=verify_tokens, **options)
    where = pipeline.summary(t, m)
    if option is not None:
        _record_plan(out, m, option, device_name)
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(
        f"wrote {out} ({where}, recipe {m['recipe']}, context {m['max_context']}): "
        f"{_gb(size)} in {m['convert']['seconds']:.1f} s"
    )
    v = m.get("verify")
    if v:
        click.echo(
            f"verified over {v['tokens']} tokens: rel_err {v['rel_err']:.2e}, 90% of steps "
            f"within {v['rel_err_p90']:.2e} (tolerance {v['tolerance']:g}) with the same experts, "
            f"{v['routing']['flips']} router flips, top-1 vs same recipe {v['top1_same']:.1%}, "
            f"KL vs unquantized {v['kl_mean']:.4f}"
        )


def _device_choice(ckpt, device_name, target, recipe, max_context, max_prefill, force):
    """The plan's choice of recipe and context for `convert --device` (BudgetError: exit 4)."""
    from ossedge.runtime.checkpoint import detect_layout
    from ossedge.targets.plan import choose, model_config

    device = get_device(device_name)
    cfg, _ = model_config(ckpt)
    root, layout = detect_layout(ckpt)
    if layout == "quantized" and recipe is None:
        from ossedge.runtime.checkpoint import read_manifest

        recipe = read_manifest(root)["recipe"]["name"]
    o = choose(device, cfg, target, recipe=recipe, context=max_context, max_prefill=max_prefill,
               force=force)
    f = o.footprint
    how = {"resident": "fits in RAM", "streaming": "fits with experts paged from flash",
           "no": "does NOT fit (--force)"}[o.fits]
    click.echo(f"{device.name}: {target} recipe {o.recipe}, context {f.context}: {how} "
               f"({f.resident / 1e9:.2f} GB, {f.anon / 1e9:.2f} GB heap; app budget "
               f"{device.app_budget_gb} GB)", err=True)
    return o


def _record_plan(out: Path, manifest: dict, option, device_name: str) -> None:
    """Add the device plan to the artifact's manifest (written atomically)."""
    manifest["device_plan"] = {"device": device_name, **option.to_dict()}
    write_json(out / "manifest.json", manifest)




@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--reference", type=click.Path(path_type=Path), default=None,
    help="The checkpoint ARTIFACT was converted from (not needed for a bundle).",
)
@click.option(
    "--tokens", type=click.IntRange(min=2), default=None,
    help="Tokens to decode teacher-forced [default: 2 sliding windows + 16].",
)
@click.option("--tolerance", type=float, default=None,
              help="Largest relative logits error of 90% of the steps (and of the router "
                   "logits of 90% of tokens × layers).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(artifact, reference, tokens, tolerance, as_json) -> None:
    """Check ARTIFACT against the reference runtime: exit 3 when it does not match.

    Decodes the packaged evaluation text teacher-forced through the artifact and compares every
    step's logits with the reference runtime applying the same recipe and routed to the experts
    the artifact chose (must match within the tolerance, and so must the router logits), and
    with the unquantized reference (KL, top-1 reported).

    For a bundle (`ossedge bundle`): checks its contract version and every file's size and
    sha256; exit 1 naming the first file that is missing, truncated or altered."""
    from ossedge.convert.verify import failure, verify_artifact
    from ossedge.targets.bundle import is_bundle, verify_bundle

    if is_bundle(artifact):
        r = verify_bundle(artifact)
        if as_json:
            click.echo(json.dumps(r, indent=2))
        else:
            click.echo(f"bundle  {artifact} ({r['platform']}, contract {r['contract_version']}): "
                       f"{r['files_checked']} files, {_gb(r['bytes_checked'])}, sha256 all match")
            click.echo(f"models  {'; '.join(r['models'])}")
            click.echo("PASSED")
        return
    if reference is None:
        raise click.UsageError("--reference CKPT is required to verify an artifact")

    r = verify_artifact(
        artifact, reference, tokens=tokens, tolerance=tolerance, progress=_progress()
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(f"artifact   {artifact} (recipe {r['recipe']})")
        click.echo(f"reference  {reference}: {r['tokens']} tokens, prefill {r['prefill_tokens']} "
                   f"then one per call")
        click.echo(f"same recipe    max_abs_err {r['max_abs_err']:.3e}  rel_err "
                   f"{r['rel_err']:.3e}, p90 {r['rel_err_p90']:.3e} (tolerance "
                   f"{r['tolerance']:g})  top-1 {r['top1_same']:.2%}")
        g = r["routing"]
        what = "router logits" if g["router_logits"] else "routing weights"
        click.echo(f"routing    {g['decisions']} choices (tokens × layers) imposed on the "
                   f"reference; {g['flips']} differ from its own top-k ({g['flip_rate']:.1%}); "
                   f"{what} p90 {g['router_err_p90']:.3e}")
        what = "unquantized" if r["unquantized_reference"] else "reference"
        click.echo(f"vs {what}  KL mean {r['kl_mean']:.5f}  top-1 {r['top1']:.2%}")
        s = r.get("structure")
        if s:
            click.echo("structure  "
                       + (f"{s['functions']} functions, " if "functions" in s else "rotary "
                          "tables, norms and sinks checked, ")
                       + f"expert weights exact {s['expert_weights_exact']}/"
                       f"{s['expert_weights_checked']}"
                       + (f", {s['expert_bits_per_weight'] or 0:.2f} bits/weight"
                          if "expert_bits_per_weight" in s else "")
                       + "".join(f"\n  problem: {p}" for p in s["problems"]))  # fmt: skip
        click.echo(f"{'PASSED' if r['passed'] else 'FAILED'}  [{r['seconds']:.1f} s]")
    if not r["passed"]:
        raise ParityError(f"{artifact}: {failure(r)}")


import time

from ossedge.cli.bench import bench  # noqa: E402  (commands in their own modules)
from ossedge.cli.devices import bundle, plan  # noqa: E402
from ossedge.cli.tokenizer import tokenizer  # noqa: E402
from ossedge.runtime.atomic import sha256_file, write_json
from ossedge.runtime.errors import ConfigError, OssedgeError, ParityError, TokenizerError
from ossedge.targets import artifact_format
from ossedge.targets.devices import get_device

cli.add_command(generate)
cli.add_command(chat)
cli.add_command(profile_experts)
cli.add_command(plan)
cli.add_command(bundle)
cli.add_command(bench)
cli.add_command(tokenizer)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr: `warning: …`."""
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: typed errors become one line and an exit code (tracebacks: --debug).
    `argv`: the arguments (default: the process's)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _one_line_warning
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="ossedge")
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
