"""What the `ossedge` commands share: loading a model or artifact, sampling and expert-cache
options, reading a text argument."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ossedge.assets import default_model_dir
from ossedge.runtime.expert_cache import CacheOptionError, parse_option
from ossedge.runtime.tokenizer import Tokenizer
from ossedge.targets import artifact_format, looks_like_artifact, open_artifact

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _progress() -> bool:
    return sys.stderr.isatty()


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _sampler(temperature: float, top_k: int | None, top_p: float | None, seed: int | None):
    from ossedge.runtime.sampling import Sampler

    try:
        return Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _model_path(ckpt: Path | None) -> Path:
    """CKPT, or the bundled trained tiny model when none is given."""
    if ckpt is not None:
        return ckpt

    return default_model_dir()


def _tokenizer_dir(ckpt: Path) -> Path:
    from ossedge.runtime.checkpoint import detect_layout

    if artifact_format(ckpt):
        return ckpt

    root, _ = detect_layout(ckpt)
    return root if (root / "tokenizer.json").exists() else root.parent


def _load(ckpt: Path, dtype: str, *, verify: bool = False, expert_cache: str = "auto",
          routing: tuple[int, int | None] = (0, None)):  # fmt: skip
    """(model, tokenizer) of a checkpoint, quantized checkpoint or artifact (ExecuTorch, ONNX,
    Core AI, or Core ML on macOS). `routing`: (--cache-aware-routing, --routing-pool), ExecuTorch
    only."""
    from ossedge.runtime.model import load_model

    keep, pool = routing
    if looks_like_artifact(ckpt):
        model = open_artifact(ckpt, checksums=verify, expert_cache=_cache_option(expert_cache),
                              cache_aware_routing=keep, routing_pool=pool)  # fmt: skip
        return model, Tokenizer.from_dir(ckpt)
    if keep or pool:
        raise CacheOptionError(f"--cache-aware-routing applies to ExecuTorch artifacts; {ckpt} "
                               "is a checkpoint")  # fmt: skip
    tokenizer = Tokenizer.from_dir(_tokenizer_dir(ckpt))
    return load_model(ckpt, dtype=_dtype(dtype), verify=verify), tokenizer


sampling_options = [
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True),
    click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy."),
    click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold in (0, 1]."),
    click.option("--top-k", type=click.IntRange(min=1), default=None),
    click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True),
]


EXPERT_CACHE_HELP = (
    "ExecuTorch artifacts: read experts through a cache of this many bytes of anonymous memory "
    "(e.g. 6G), off (the memory-mapped model.ptd), or auto: off where the artifact fits in this "
    "process's memory limit, else a cache of the limit minus the resident rest.")
expert_cache_option = click.option("--expert-cache", default="auto", show_default=True,
                                   help=EXPERT_CACHE_HELP)


ROUTING_HELP = (
    "Lossy, off by default (0): with --expert-cache, keep the router's top K experts of each "
    "decoded token and fill its other slots with cached experts from the router's top "
    "--routing-pool (default twice the experts per token), so fewer experts are read.")


def routing_options(f):
    """--cache-aware-routing K and --routing-pool M (ExecuTorch artifacts with the cache)."""
    f = click.option("--routing-pool", type=click.IntRange(min=1), default=None,
                     help="Candidates for --cache-aware-routing: the router's top M.")(f)
    return click.option("--cache-aware-routing", type=click.IntRange(min=0), default=0,
                        show_default=True, metavar="K", help=ROUTING_HELP)(f)  # fmt: skip


def _cache_option(value: str):
    try:
        return parse_option(value)
    except CacheOptionError as e:
        raise click.BadParameter(str(e).removeprefix("--expert-cache "),
                                 param_hint="--expert-cache") from None  # fmt: skip


def with_sampling(f):
    for option in reversed(sampling_options):
        f = option(f)
    return f


def read_text(text: Path | None) -> tuple[str, str]:
    """(body, label) of a --text file, or of the packaged held-out text when None."""
    from ossedge.runtime.evaluate import default_text

    if text is None:
        return default_text()
    try:
        return text.read_text("utf-8"), str(text)
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {text} as UTF-8 text ({e})",
                                 param_hint="--text") from None  # fmt: skip
