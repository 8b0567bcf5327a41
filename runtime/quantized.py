"""ossedge quantized checkpoints: a gpt-oss checkpoint re-stored per a recipe.

A directory holding `config.json` (HF form), `model*.safetensors` (each logical weight stored as
`quantize.qtensor` describes: MXFP4 parts under HF's names, int formats as `{name}.q` and
`{name}.scale`, kept tensors under their own name), the source's tokenizer and generation files,
and `manifest.json`:

    format, format_version, ossedge_version, recipe {name, description, rules},
    source {path, layout, expert_format},
    tensors {logical name: {format, shape, source_dtype, bytes, parts {part: stored name}}},
    files {file name: {bytes, sha256}}, total_bytes, bytes_by_format

`quantize_checkpoint` writes one tensor at a time with plain reads (bounded RSS), hashing each
file as it is written, into a temporary directory renamed into place. `QuantizedCheckpoint` reads
one back through the same interface as `Checkpoint`, so the reference runtime runs it.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ossedge import __version__
from ossedge.quantize.qtensor import QTensor, encode, part_name, part_specs, stored_bytes
from ossedge.quantize.recipes import DEFAULT_RECIPE, Recipe, RecipeError, get_recipe
from ossedge.runtime.atomic import atomic_dir, sha256_file, write_json
from ossedge.runtime.checkpoint import (
    EXPERT_WEIGHT_RE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    Checkpoint,
    QuantizedCheckpoint,
    logical_tensors,
    open_checkpoint,
)
from ossedge.runtime.config import GptOssConfig
from ossedge.runtime.errors import CheckpointError, ConfigError
from ossedge.runtime.safetensors_stream import write_streaming

SHARD_BYTES = 4 << 30
# Files carried over from the source checkpoint (or its parent, for the original layout).
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


# -- sizes ------------------------------------------------------------------------------------


def tensor_bytes(fmt: str, shape: tuple[int, ...], source_dtype: torch.dtype) -> int:
    """Stored bytes of one logical weight in `fmt` ("keep" keeps the source dtype)."""
    if fmt == "keep":
        return math.prod(shape) * source_dtype.itemsize
    return stored_bytes(fmt, shape)


def recipe_bytes(cfg: GptOssConfig, recipe: Recipe | str) -> dict[str, int]:
    """Weight bytes of `cfg` quantized with `recipe`, by format and in total, computed from shapes
    (kept tensors counted in bf16, as released). Equals what `quantize_checkpoint` writes."""
    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    out: dict[str, int] = {}
    for name, shape in logical_tensors(cfg):
        fmt = rec.format_for(name, shape)
        out[fmt] = out.get(fmt, 0) + tensor_bytes(fmt, shape, torch.bfloat16)
    out["total"] = sum(out.values())
    return out


# -- writing ----------------------------------------------------------------------------------


def _plan(ckpt: Checkpoint, recipe: Recipe) -> dict[str, dict[str, Any]]:
    plan: dict[str, dict[str, Any]] = {}
    for name, shape in logical_tensors(ckpt.config):
        try:
            fmt = recipe.format_for(name, shape)
        except RecipeError as e:
            raise ConfigError(f"{e}; this checkpoint cannot use recipe {recipe.name}") from None
        if EXPERT_WEIGHT_RE.fullmatch(name):
            src = torch.bfloat16 if ckpt.expert_format == "mxfp4" else ckpt.entry(name).dtype
        else:
            src = ckpt.entry(name).dtype
        if fmt == "keep":
            parts = {"": (shape, src)}
        else:
            parts = part_specs(fmt, shape)
        plan[name] = {
            "format": fmt,
            "shape": list(shape),
            "source_dtype": str(src).removeprefix("torch."),
            "bytes": sum(math.prod(s) * d.itemsize for s, d in parts.values()),
            "parts": {p: (name if fmt == "keep" else part_name(name, fmt, p)) for p in parts},
            "_specs": parts,
        }
    return plan


def _quantize_one(ckpt: Checkpoint, name: str, fmt: str) -> dict[str, torch.Tensor]:
    """The stored parts of one logical weight (read with plain reads, not mapped)."""
    w = ckpt.weight(name, copy=True)
    if fmt == "keep":
        return {"": w.contiguous() if isinstance(w, torch.Tensor) else w.dequantize(torch.bfloat16)}
    if isinstance(w, QTensor) and w.fmt == fmt:
        return dict(w.parts)  # released MXFP4 bytes, untouched
    if len(w.shape) == 2:
        return encode(fmt, w.dequantize() if isinstance(w, QTensor) else w)
    # Experts [E, N, K]: one expert at a time, so only one is ever in full precision.
    specs = part_specs(fmt, tuple(w.shape))
    out = {p: torch.empty(shape, dtype=dtype) for p, (shape, dtype) in specs.items()}
    for e in range(w.shape[0]):
        dense = w[e].dequantize() if isinstance(w, QTensor) else w[e].to(torch.float32)
        for p, t in encode(fmt, dense).items():
            out[p][e] = t
    return out


def _shards(plan: dict[str, dict[str, Any]], limit: int) -> list[list[str]]:
    """Logical names per shard; a weight's parts always share a shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in plan.items():
        if shards[-1] and size + t["bytes"] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t["bytes"]
    return shards


def _companions(ckpt: Checkpoint) -> list[Path]:
    found = []
    for fname in COMPANION_FILES:
        for where in (ckpt.root, ckpt.root.parent):
            if (where / fname).is_file():
                found.append(where / fname)
                break
    return found


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    recipe: str = DEFAULT_RECIPE,
    force: bool = False,
    progress: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write `src` quantized with `recipe` to `out` (atomically); return `out`."""
    rec = get_recipe(recipe)
    ckpt = open_checkpoint(src)
    if isinstance(ckpt, QuantizedCheckpoint):
        raise CheckpointError(
            f"{src} is already quantized (recipe {ckpt.recipe}); quantize the original checkpoint"
        )
    plan = _plan(ckpt, rec)
    shards = _shards(plan, shard_bytes)
    files: dict[str, dict[str, Any]] = {}
    bar = tqdm(
        total=sum(t["bytes"] for t in plan.values()),
        unit="B",
        unit_scale=True,
        desc="quantize",
        disable=not progress,
    )
    current: dict[str, Any] = {"name": None, "parts": None}

    def chunks(stored: str) -> Iterator[torch.Tensor]:
        logical, part = owner[stored]
        if current["name"] != logical:
            current["parts"] = None  # free the previous weight before making the next
            current["parts"] = _quantize_one(ckpt, logical, plan[logical]["format"])
            current["name"] = logical
        t = current["parts"][part]
        bar.update(t.numel() * t.element_size())
        yield t

    owner: dict[str, tuple[str, str]] = {}
    with atomic_dir(out, force=force) as tmp:
        weight_map: dict[str, str] = {}
        for k, names in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else (f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
            )
            items = []
            for name in names:
                for part, stored in plan[name]["parts"].items():
                    shape, dtype = plan[name]["_specs"][part]
                    items.append((stored, tuple(shape), dtype))
                    owner[stored] = (name, part)
                    weight_map[stored] = fname
            digest = hashlib.sha256()
            write_streaming(
                tmp / fname,
                items,
                chunks,
                digest=digest,
                metadata={"format": "pt", "ossedge_recipe": rec.name},
            )
            files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": digest.hexdigest()}
        current["parts"] = None
        bar.close()
        if len(shards) > 1:
            total = sum(t["bytes"] for t in plan.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(tmp / INDEX_FILE, index, files)
        _write_json(
            tmp / "config.json", ckpt.config.replace(quantization_config=None).to_hf_dict(), files
        )
        for path in _companions(ckpt):
            shutil.copyfile(path, tmp / path.name)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        by_format: dict[str, int] = {}
        for t in plan.values():
            by_format[t["format"]] = by_format.get(t["format"], 0) + t["bytes"]
            del t["_specs"]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ossedge_version": __version__,
            "recipe": rec.to_manifest(),
            "source": {
                "path": str(Path(src).resolve()),
                "layout": ckpt.layout,
                "expert_format": ckpt.expert_format,
            },
            "tensors": plan,
            "files": dict(sorted(files.items())),
            "total_bytes": sum(f["bytes"] for f in files.values()),
            "bytes_by_format": by_format,
        }
        write_json(tmp / MANIFEST, manifest)
    return Path(out)


def _write_json(path: Path, obj: Any, files: dict[str, dict[str, Any]]) -> None:
    """Write `obj` and list the file in `files` with its size and sha256."""
    write_json(path, obj)
    files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# -- reading ----------------------------------------------------------------------------------


class QuantizedView:
    """A checkpoint with a recipe applied in memory, weight by weight: exactly the weights
    `quantize_checkpoint` would write, for evaluating a recipe without writing it."""

    def __init__(self, ckpt: Checkpoint, recipe: Recipe | str) -> None:
        self.ckpt = ckpt
        self.config = ckpt.config
        self.recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        self.formats = {n: t["format"] for n, t in _plan(ckpt, self.recipe).items()}
        self.shapes = dict(logical_tensors(ckpt.config))

    def weight(self, name: str, *, copy: bool = False) -> torch.Tensor | QTensor:
        fmt = self.formats[name]
        parts = _quantize_one(self.ckpt, name, fmt)
        return parts[""] if fmt == "keep" else QTensor(fmt, self.shapes[name], parts)
