"""One conversion pipeline for every target.

`convert(target, checkpoint, out, …)` does what every conversion does — refuse an existing output
without `force`, check the target's options, open the weights with the recipe applied (a
quantized checkpoint keeps its own), settle the context, build the artifact in a temporary
directory beside `out`, copy the tokenizer, record every file's size and sha256 in a manifest
with the common header, verify the artifact against the checkpoint into that manifest, and only
then rename the directory into place (on any error, nothing is left). A target supplies what
differs, as three functions its registry entry names:

- `check_options(options) -> default recipe or None`, before anything is read;
- `prepare(job) -> the smallest context it takes`, once the weights are open (it may fill
  `job.options` with its defaults and refuse what its format cannot hold);
- `write(job, tmp) -> the manifest's target part`, writing its files into `tmp`
  (`job.stage(name)` times its stages).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossedge import __version__
from ossedge.convert.verify import verify_into_manifest
from ossedge.runtime.atomic import atomic_dir, check_output, write_json
from ossedge.runtime.config import DEFAULT_CONTEXT, GptOssConfig
from ossedge.runtime.errors import OssedgeError
from ossedge.runtime.atomic import sha256_file
from ossedge.runtime.tokenizer import Tokenizer
from ossedge.targets import TARGETS, Target
from ossedge.targets.source import weight_source

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


class ConvertError(OssedgeError):
    """The checkpoint cannot be converted with these settings."""


@dataclass
class Job:
    """One conversion, as a target's `prepare` and `write` see it."""

    ckpt: Path
    source: Any  # .config and .weight(name), the recipe applied (ossedge.targets.source)
    recipe: str
    config: GptOssConfig
    context: int
    tokenizer: Tokenizer
    progress: bool
    options: dict[str, Any]
    stages_s: dict[str, float] = field(default_factory=dict)
    _last: list = field(default_factory=list)

    def stage(self, name: str | None) -> None:
        """Start timing stage `name` (None: end the current one); seconds land in `stages_s`."""
        now = time.perf_counter()
        if self._last:
            self.stages_s[self._last[1]] = round(now - self._last[0], 2)
        self._last[:] = [now, name] if name else []


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest)


def files_of(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under `root` but the manifest: relative path → bytes and sha256."""
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}  # fmt: skip


def convert(
    target: str | Target,
    ckpt_path: str | Path,
    out: str | Path,
    *,
    recipe: str | None = None,
    max_context: int | None = None,
    force: bool = False,
    progress: bool = False,
    verify_tokens: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Convert the checkpoint at `ckpt_path` into `target`'s artifact directory `out`
    (atomically), verified against the checkpoint unless `verify_tokens` is 0. `options` are the
    target's own (its registry entry's `convert_options`). Returns the manifest."""
    t = TARGETS[target] if isinstance(target, str) else target
    unknown = sorted(set(options) - t.convert_options)
    if unknown:
        raise TypeError(f"{t.name} conversions take no option {', '.join(unknown)}")
    out, ckpt = Path(out), Path(ckpt_path)
    check_output(out, force=force)
    t0 = time.perf_counter()
    default_recipe = t.hook("check_options")(options)
    source, recipe_name = weight_source(ckpt, recipe, default=default_recipe)
    cfg = source.config
    job = Job(ckpt=ckpt, source=source, recipe=recipe_name, config=cfg,
              context=max_context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings),
              tokenizer=Tokenizer.from_dir(ckpt), progress=progress,
              options=dict(options))  # fmt: skip
    smallest = t.hook("prepare")(job)
    if not smallest <= job.context <= cfg.max_position_embeddings:
        raise ConvertError(f"--max-context must be {smallest}..{cfg.max_position_embeddings} for "
                           f"this model, got {job.context}")  # fmt: skip
    with atomic_dir(out, force=force) as tmp:
        body = t.hook("write")(job, tmp)
        job.stage(None)
        shutil.copyfile(Path(job.tokenizer.source), tmp / TOKENIZER)
        files = files_of(tmp)
        manifest: dict[str, Any] = {
            "format": t.format,
            "contract_version": body.pop("contract_version", t.contract),
            "ossedge_version": __version__,
            "recipe": recipe_name,
            **body,
            "max_context": job.context,
            "config": cfg.to_hf_dict(),
            "source": str(ckpt.resolve()),
            "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values()),
            "convert": {"seconds": round(time.perf_counter() - t0, 1), "stages_s": job.stages_s},
        }
        write_manifest(tmp, manifest)
        if verify_tokens != 0:
            verify_into_manifest(tmp, ckpt, manifest, write_manifest, tokens=verify_tokens,
                                 progress=progress)  # fmt: skip
    return manifest


def summary(target: str | Target, manifest: dict[str, Any]) -> str:
    """What was written, in a phrase for `ossedge convert`'s report ("onnx, 4-bit QMoE experts")."""
    t = TARGETS[target] if isinstance(target, str) else target
    describe: Callable[[dict], str] | None = t.hook("summary")
    return describe(manifest) if describe else t.name
