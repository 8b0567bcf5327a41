"""`ossedge bench report`: RESULTS.json files → a Markdown report with tables and PNG plots
(decode tok/s vs context length, time to first token vs prompt length, peak memory per run),
plus `plots.json` holding every plotted series (what the pictures show, as data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ossedge.benchmarks.harness import BenchError, validate
from ossedge.runtime.atomic import atomic_dir

GB = 1e9


def label(d: dict[str, Any]) -> str:
    """One line naming a result set: device, backend/runner, recipe, memory limit."""
    dev = d["device"]
    where = dev.get("model") or dev.get("transport", "?")
    limit = d["settings"].get("memory_limit")
    weights = d["settings"].get("weights", "mmap")
    name = f"{where} · {d['backend']}/{d['runner']} · {d['artifact'].get('recipe', '?')}"
    return name + (f" · weights {weights}" if weights != "mmap" else "") + (
        f" · limit {limit}" if limit else "")


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    out = []
    for p in map(Path, paths):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"{p}: not readable as JSON ({e})") from None
        out.append(validate(d, str(p)))
    return out


def _roofline_cell(d: dict[str, Any], decode_tok_s: float) -> str:
    """"85% of 20.1": the decode speed as a share of what the bandwidth read around the runs
    allows for this artifact's bytes per token ("—" where either is unknown)."""
    top = (d.get("roofline") or {}).get("roofline_tok_s")
    return f"{100 * decode_tok_s / top:.0f}% of {top:.1f}" if top else "—"


def _roofline_note(d: dict[str, Any]) -> str:
    r = d.get("roofline") or {}
    if not r.get("bytes_per_token") or not r.get("bandwidth_gbs"):
        return ""
    readings = " → ".join(f"{b:.1f}" for b in r["bandwidth_gbs"])
    n = r["bytes_per_token"]
    size = f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"
    return f"; {size} of weights read per decoded token, read bandwidth {readings} GB/s"


def _table(sets: list[dict[str, Any]]) -> list[str]:
    rows = ["| run | prompt | load s | TTFT s | prefill tok/s | decode tok/s (min–max) | "
            "decode vs roofline tok/s | peak RSS GB (heap + mapped) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in sets:
        for r in d["results"]:
            rss = r.get("peak_rss_bytes")
            mem = (f"{rss / GB:.2f} ({(r.get('rss_anon_bytes') or 0) / GB:.2f} + "
                   f"{(r.get('rss_file_bytes') or 0) / GB:.2f})") if rss else "—"
            dec = r["decode_tok_s"]
            rows.append(
                f"| {label(d)} | {r['prompt_tokens']} | {r['load_s']:.2f} | "
                f"{r['ttft_s']['median']:.3f} | {r['prefill_tok_s']['median']:.2f} | "
                f"{dec['median']:.2f} ({dec['min']:.2f}–{dec['max']:.2f}) | "
                f"{_roofline_cell(d, dec['median'])} | {mem} |"
            )
    return rows


def _plot(series: dict[str, dict[str, list[float]]], path: Path, *, title: str, xlabel: str,
          ylabel: str, logx: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, s in series.items():
        lo = [m - a for m, a in zip(s["y"], s["lo"])]
        hi = [b - m for m, b in zip(s["y"], s["hi"])]
        ax.errorbar(s["x"], s["y"], yerr=[lo, hi], marker="o", capsize=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _memory_plot(bars: dict[str, tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bars)
    anon = [bars[n][0] for n in names]
    mapped = [bars[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(names)), dpi=100)
    ax.barh(names, anon, label="heap (anonymous)")
    ax.barh(names, mapped, left=anon, label="mapped weights (file-backed)")
    ax.set(title="Peak memory", xlabel="GB")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _series(sets, key: str) -> dict[str, dict[str, list[float]]]:
    out = {}
    for d in sets:
        rs = sorted(d["results"], key=lambda r: r["prompt_tokens"])
        out[label(d)] = {"x": [r["prompt_tokens"] for r in rs],
                         "y": [r[key]["median"] for r in rs],
                         "lo": [r[key]["min"] for r in rs], "hi": [r[key]["max"] for r in rs]}
    return out


def write_report(paths: list[str | Path], out: str | Path, *, force: bool = False) -> Path:
    """Write DIR/report.md, the three PNGs and plots.json (atomically); return DIR."""
    sets = load_results(paths)
    out = Path(out)
    decode, ttft = _series(sets, "decode_tok_s"), _series(sets, "ttft_s")
    memory = {}
    for d in sets:
        peak = max(d["results"], key=lambda r: r.get("peak_rss_bytes") or 0)
        memory[label(d)] = ((peak.get("rss_anon_bytes") or 0) / GB,
                            (peak.get("rss_file_bytes") or 0) / GB)
    with atomic_dir(out, force=force) as tmp:
        _plot(decode, tmp / "decode_vs_context.png", title="Decode speed vs context length",
              xlabel="tokens in the context (prompt length)", ylabel="decode tok/s")
        _plot(ttft, tmp / "ttft_vs_prompt.png", title="Time to first token vs prompt length",
              xlabel="prompt tokens", ylabel="seconds")
        _memory_plot(memory, tmp / "memory.png")
        (tmp / "plots.json").write_text(json.dumps(
            {"decode_vs_context": decode, "ttft_vs_prompt": ttft, "memory_gb": memory},
            indent=2) + "\n")
        lines = ["# ossedge benchmark report", ""]
        for d in sets:
            dev, art = d["device"], d["artifact"]
            lines.append(
                f"- **{label(d)}**: {dev.get('os', '')} {dev.get('machine', '')}, "
                f"{dev.get('cpu') or dev.get('soc') or ''}; {art['format']} `{art['path']}` "
                f"(context {art.get('max_context')}, manifest sha256 "
                f"{(art.get('manifest_sha256') or '—')[:12]}); {d['settings']['runs']} runs "
                f"after {d['settings']['warmup']} warm-up, {d['settings']['gen_tokens']} "
                f"generated tokens; {d['created']}{_roofline_note(d)}"
            )
        lines += ["", *_table(sets), "",
                  "Roofline: the decode speed the read bandwidth allows for the weight bytes one "
                  "token reads, at the best of the bandwidth readings taken just before and just "
                  "after each set's runs. Decode cannot beat the bandwidth it runs at; a share "
                  "over 100% says the machine's bandwidth rose above both readings during the "
                  "runs (a shared machine's moves).", "",
                  "![decode tok/s vs context](decode_vs_context.png)", "",
                  "![time to first token vs prompt length](ttft_vs_prompt.png)", "",
                  "![peak memory](memory.png)", ""]
        (tmp / "report.md").write_text("\n".join(lines))
    return out
