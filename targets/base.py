"""What every target shares: the Target record and the ArtifactModel protocol, reading a
manifest, checking a call, quiet backend imports."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ossedge.runtime.atomic import sha256_file
from ossedge.runtime.errors import ArtifactError, OssedgeError


@dataclass
class ArtifactConfig:
    """What generation reads of an opened artifact's model config: its context and vocabulary."""

    max_position_embeddings: int
    vocab_size: int


class ArtifactModel(Protocol):
    """What generation, evaluation, verify and bench use of an opened artifact: the reference
    runtime's generation contract (`cache = model.new_cache()`, `model(ids [1, T], cache=cache)`
    → logits [1, 1, V] of the last token), its manifest, its context and prefill lengths, and the
    routing it chose (`trace_routing()` then `routing_trace()`)."""

    root: Path
    manifest: dict
    max_context: int
    max_prefill: int
    config: ArtifactConfig

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> Any: ...

    def __call__(self, input_ids, *, cache=None, last_only: bool = True): ...


@dataclass(frozen=True)
class Target:
    """One deployment target: its artifact contract and what the rest of ossedge calls it for.

    The heavy parts are named, not imported ("module:function"), so that the registry loads no
    backend: `check_options`, `prepare`, `write` and `summary` are its part of a conversion (see
    convert/pipeline.py; `convert_options` names the options it takes); `open(root, **options)`
    returns an ArtifactModel (`open_options` names what it takes beyond
    `checksums`); `footprint(cfg, recipe, context, **kw)` is the memory model's Footprint;
    `weights(cfg, recipe)` and `kv_bytes(cfg, context)` what a decoded token reads;
    `check_structure(model, source)` what verify reads from the artifact's files (a dict, or None
    where the contract has nothing to read). `tolerance(manifest, linears)` is verify's default
    rel_err bound; `expert_activations(manifest)` and `linear_activations(manifest, model)` say
    how its kernels round their inputs (the reference verify builds rounds the same)."""

    name: str
    title: str  # in messages: "ExecuTorch"
    format: str  # the manifest's "format"
    contract: int  # the contract version conversions write
    reads: tuple[int, ...]  # the contract versions this ossedge reads
    files: tuple[str, ...] | None  # the files every artifact has (None: those its manifest lists)
    platforms: tuple[str, ...]  # app platforms a bundle may carry it to
    # check_options, prepare, write, summary, open, footprint, weights (stored bytes by group),
    # kv_bytes (the KV cache at a context), check_structure → "module:function"
    hooks: dict[str, str]
    tolerance: Callable[[dict, str], float]
    expert_activations: Callable[[dict], str]
    linear_activations: Callable[[dict, Any], str]
    error: type[ArtifactError] = ArtifactError
    open_options: frozenset[str] = field(default_factory=frozenset)
    convert_options: frozenset[str] = field(default_factory=frozenset)
    device_plans: bool = True  # `convert --device` sizes its artifacts for a device profile
    streams: bool = False  # streams experts from storage when they do not fit (an expert cache)
    runners: tuple[str, ...] = ()  # what `ossedge bench --runner` runs it with (the first: default)
    predicts_on: str | None = None  # the only OS (platform.system()) that runs it, None: any

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The function registered as `name`, imported now (None when the target has none)."""
        where = self.hooks.get(name)
        if where is None:
            return None
        module, _, attr = where.partition(":")
        return getattr(importlib.import_module(module), attr)

    def open(self, root, **options) -> ArtifactModel:
        return self.hook("open")(root, **options)

    def footprint(self, cfg, recipe: str, context: int, **kw):
        return self.hook("footprint")(cfg, recipe, context, **kw)

    def check_structure(self, model, source) -> dict | None:
        check = self.hook("check_structure")
        return check(model, source) if check else None

    def read_manifest(self, root: str | Path, *, checksums: bool = False) -> dict:
        """The artifact's manifest, its format, contract and files checked (see read_manifest)."""
        return read_manifest(Path(root), fmt=self.format, what=self.title, contract=self.reads,
                             files=self.files, checksums=checksums, error=self.error)  # fmt: skip

    def is_artifact(self, path: str | Path) -> bool:
        """Whether `path` holds a manifest.json of this target's format (not yet checked)."""
        return manifest_format(path) == self.format


def by_linears(float_bound: float, quantized_bound: float) -> Callable[[dict, str], float]:
    """A `tolerance`: `float_bound` where the linear layers take float inputs, else
    `quantized_bound` (a rounding boundary moves a token now and then)."""
    return lambda manifest, linears: float_bound if linears == "float" else quantized_bound


def conversion_hooks(module: str) -> dict[str, str]:
    """The hooks of a conversion, all in `module`: check_options, prepare, write, summary."""
    return {name: f"{module}:{name}" for name in ("check_options", "prepare", "write", "summary")}


def manifest_format(path: str | Path) -> str | None:
    """The "format" of `path`/manifest.json, or None where there is none or it is unreadable."""
    p = Path(path) / "manifest.json"
    if not p.is_file():
        return None
    try:
        fmt = json.loads(p.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) else None


@contextlib.contextmanager
def stderr_to(path: Path | int) -> Iterator[None]:
    """Send the process's stderr (file descriptor 2, where native code logs) to `path`, or to the
    open file descriptor `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    if isinstance(path, int):
        os.dup2(path, 2)
    else:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def quiet_imports() -> None:
    """Silence import-time chatter of torchao and torch (GPU libraries this CPU build cannot
    load, deprecation notes) and export-time warnings that are not the user's business."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Mutation on a buffer", category=UserWarning)


def read_manifest(root: Path, *, fmt: str, what: str, contract: int | tuple[int, ...],
                  files: tuple[str, ...] | None = None, checksums: bool = False,
                  error: type[ArtifactError] = ArtifactError) -> dict:
    """An artifact's manifest.json, after checking its format (`fmt`, e.g. "ossedge-onnx"), its
    contract version, and that each of `files` (default: every file it lists) is there with the
    recorded size and, with `checksums`, sha256. `what` names the artifact kind in errors."""

    file = root / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise error(f"{root}: no manifest.json; not an ossedge {what} artifact") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{file}: unreadable ({e}); convert the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{file}: not an ossedge {what} artifact manifest")
    contracts = contract if isinstance(contract, tuple) else (contract,)
    if manifest.get("contract_version") not in contracts:
        raise error(
            f"{root}: artifact contract version {manifest.get('contract_version')}, this ossedge "
            f"reads {' and '.join(map(str, contracts))}; convert the model again with this version"
        )
    listed = manifest.get("files", {})
    for name in files if files is not None else tuple(listed):
        path, want = root / name, listed.get(name, {})
        if not path.is_file():
            raise error(f"{path}: missing; the artifact is incomplete, convert again")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise error(
                f"{path}: {size} bytes, the manifest records {want.get('bytes')}; the file is "
                "truncated or from another conversion"
            )
        if checksums and sha256_file(path) != want.get("sha256"):
            raise error(
                f"{path}: sha256 differs from the manifest; the file is corrupt or from another "
                "conversion"
            )
    return manifest


def check_call(input_ids, cache, kind: str) -> int:
    """Validate an artifact model's call: ids [1, T] that fit the cache's context. Returns T."""

    if cache is None:
        raise ValueError(f"{kind} artifact needs cache=model.new_cache()")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    t = input_ids.shape[1]
    if cache.position + t > cache.limit:
        raise OssedgeError(
            f"context full: {cache.position} + {t} tokens exceed the artifact's context of "
            f"{cache.limit}; convert with a larger --max-context or shorten the prompt"
        )
    return t
