"""`ossedge plan` (what fits a device) and `ossedge bundle` (app-ready directories)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ossedge.quantize.recipes import RECIPES
from ossedge.runtime.errors import BudgetError
from ossedge.targets import TARGETS
from ossedge.targets.devices import device_names, get_device


def _device_help() -> str:
    return "A device profile: " + ", ".join(device_names()) + "; or a JSON file with one profile."


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def format_plan(device, label: str, cfg, options, streaming: dict | None,
                routing: str = "uniform routing") -> str:  # fmt: skip
    d = device
    context = options[0].footprint.context if options else "-"
    lines = [
        f"device   {d.display} [{d.name}]",
        f"budget   {d.app_budget_gb} GB ± {d.budget_uncertainty_gb} for one app, of {d.ram_gb} GB "
        f"RAM\n         ({d.budget_source})",
        f"memory   {d.bandwidth_gbs} GB/s ({d.bandwidth_source}); flash {d.storage_read_gbs} GB/s",
        f"model    {label}: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"(top-{cfg.num_experts_per_tok}), context {context}",
        "",
        f"{'target':<18}{'recipe':<13}{'heap GB':>8}{'mapped GB':>10}{'total GB':>9}  "
        f"{'fits':<10}{'max context':>12}{'streaming':>10}{'decode ≤':>12}",
    ]
    for o in options:
        f = o.footprint
        target = o.target + (f" {o.deployment_target}" if o.deployment_target else "")
        lines.append(
            f"{target:<18}{o.recipe:<13}{_gb(f.anon):>8}{_gb(f.mapped):>10}{_gb(f.resident):>9}  "
            f"{o.fits:<10}{o.max_context_resident or '-':>12}{o.max_context_streaming or '-':>10}"
            f"{o.decode_tok_s_ceiling:>8.1f} t/s"
        )
    lines += [
        "",
        "heap: packed linear weights, KV cache, activations, runtime (must stay in RAM); mapped:",
        "weights memory-mapped from the artifact (paged from flash when RAM is short). fits:",
        "resident = everything stays in RAM; streaming = the experts are paged from flash;",
        "max context: the largest that fits resident, and streaming; decode ≤: the speed ceiling",
        "from memory bandwidth (and, when streaming, the expert cache's reads from flash).",
        "",
    ]
    for o in options:
        if o.streaming:
            st = o.streaming
            lines.append(
                f"streaming {o.target} {o.recipe}: an expert cache of {st['cache_bytes'] / 1e9:.2f}"
                f" GB ({st['slots']} experts) serves {st['hit_rate']:.0%} of selections "
                f"({routing}); {st['misses_per_token']:.1f} experts read per token")
    if any(o.fits == "streaming" for o in options) and streaming:
        from ossedge.targets.plan import predicted_rows

        lines.append("")
        lines.append(f"streaming measured ({streaming['machine']}, {streaming['date']}, "
                     f"{streaming['artifact']}; unconstrained "
                     f"{streaming['unconstrained_decode_tok_s']:.2f} tok/s), beside the model:")
        for r in predicted_rows(streaming):
            lines.append(
                f"  memory limit {r['limit_gib']:>2} GiB: decode measured {r['measured_tok_s']:.2f}"
                f" tok/s, predicted {r['predicted_tok_s']:.2f}; hit rate measured "
                f"{r['measured_hit_rate']:.0%}, predicted {r['predicted_hit_rate']:.0%} "
                f"(disk {r['disk_read_gbps']:.2f} GB/s)")
    return "\n".join(lines)


@click.command()
@click.option("--device", "device_name", required=True, help=_device_help())
@click.option("--target", type=click.Choice(list(TARGETS)), default=None, help="[default: all]")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None, help="[default: all]")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="KV cache length in tokens [default: 4096].")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Checkpoint, artifact (then its target, recipe and context) or config.json "
              "[default: gpt-oss-20b].")
@click.option("--expert-profile", type=click.Path(path_type=Path), default=None,
              help="A routing profile (`ossedge profile-experts`) for the expert cache's hit rate "
              "[default: an artifact's own, else uniform routing].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(device_name, target, recipe, context, model, expert_profile, as_json) -> None:
    """What fits DEVICE: every target and recipe it runs, with predicted memory, the largest
    context that fits, and the decode speed ceiling. Exit 4 when nothing fits."""
    from ossedge.targets.plan import artifact_settings, measured_streaming, model_config
    from ossedge.targets.plan import plan as make_plan

    device = get_device(device_name)
    cfg, label = model_config(model)
    built = artifact_settings(model)  # an artifact: as it was built, unless told otherwise
    target, recipe = target or built.get("target"), recipe or built.get("recipe")
    context = context or built.get("context")
    if context is not None and context > cfg.max_position_embeddings:
        raise click.BadParameter(f"{context} is more than the model's "
                                 f"{cfg.max_position_embeddings} positions", param_hint="--context")
    frequencies, routing = None, "uniform routing"
    if expert_profile is not None:
        from ossedge.runtime.profile import read_profile

        frequencies = read_profile(expert_profile, layers=cfg.num_hidden_layers,
                                   experts=cfg.num_local_experts)["frequencies"]  # fmt: skip
        routing = f"profile {expert_profile}"
    elif built.get("frequencies"):
        frequencies, routing = built["frequencies"], "the artifact's routing profile"
    options = make_plan(device, cfg, targets=(target,) if target else tuple(TARGETS),
                        recipes=(recipe,) if recipe else None, context=context,
                        frequencies=frequencies)  # fmt: skip
    if not options:
        raise BudgetError(f"{device.name} runs none of the requested targets ({target}); "
                          f"it runs: {', '.join(t for t in TARGETS if device.runs(t))}")
    streaming = measured_streaming()
    if as_json:
        click.echo(json.dumps({"device": device.to_dict(), "model": label,
                               "options": [o.to_dict() for o in options],
                               "streaming_measured": streaming}, indent=2))
    else:
        click.echo(format_plan(device, label, cfg, options, streaming, routing))
    if all(o.fits == "no" for o in options):
        raise BudgetError(f"nothing fits {device.name}'s app budget of {device.app_budget_gb} GB "
                          "at this context; try a smaller --context")


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--platform", type=click.Choice(["android", "ios"]), required=True)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--device", "device_name", default=None,
              help="Record the plan of each artifact on this device in the manifest.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def bundle(artifacts, platform, out, device_name, force) -> None:
    """Pack ARTIFACTS (outputs of `ossedge convert`) into an app-ready directory OUT.

    OUT holds models/ (the artifacts, hard-linked where possible), the platform glue (android:
    an LlmModule wrapper, CMake for the ossedge kernels and their sources; ios: a Swift package
    with the Core ML driver) and manifest.json (sha256 of every file, contract version,
    generation defaults, harmony token ids, device plan). `ossedge verify OUT` checks it."""
    from ossedge.targets.bundle import make_bundle

    m = make_bundle(list(artifacts), out, platform=platform, device=device_name, force=force)
    models = ", ".join(f"{x['dir']} ({x['target']}, {x['recipe']})" for x in m["models"])
    click.echo(f"wrote {out} ({platform}): {models}; {len(m['files'])} files, "
               f"{_gb(m['total_bytes'])} GB")
