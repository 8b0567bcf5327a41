"""ossedge.targets: the deployment targets, one folder each, behind the registry `TARGETS`.

A target folder holds its exporter, its runner, its checks and its contract (format, versions,
files, tolerances) and registers one `Target` (see targets/base.py). Verify, plan, bundle and
bench look a target up here; nothing outside its folder switches on its name."""

from __future__ import annotations

from pathlib import Path

from ossedge.runtime.expert_cache import CacheOptionError
from ossedge.targets.base import ArtifactModel, Target, manifest_format
from ossedge.targets.coreai import TARGET as _COREAI
from ossedge.targets.coreml import TARGET as _COREML
from ossedge.targets.executorch import TARGET as _EXECUTORCH
from ossedge.targets.onnx import TARGET as _ONNX

TARGETS: dict[str, Target] = {t.name: t for t in (_EXECUTORCH, _COREML, _ONNX, _COREAI)}
DEFAULT_TARGET = "executorch"
__all__ = ["TARGETS", "ArtifactModel", "Target", "artifact_format", "looks_like_artifact",
           "open_artifact", "target_for_format", "target_of"]


def target_for_format(fmt: str | None) -> Target | None:
    """The target whose manifests say `"format": fmt`, else None."""
    return next((t for t in TARGETS.values() if t.format == fmt), None)


def target_of(path: str | Path) -> Target | None:
    """The target whose artifact `path` holds (by its manifest's format), else None."""
    return target_for_format(manifest_format(path))


def artifact_format(path: str | Path) -> str | None:
    """The target name ("executorch", "coreml", "onnx", "coreai") of an artifact directory, else None."""
    t = target_of(path)
    return t.name if t else None


def looks_like_artifact(path: str | Path) -> bool:
    """An artifact directory, or what is left of one: a manifest.json (maybe unreadable) beside a
    target's first file (model.pte, model.onnx), so that opening it says what is wrong."""
    p = Path(path)
    return target_of(p) is not None or (p / "manifest.json").is_file() and any(
        (p / t.files[0]).exists() for t in TARGETS.values() if t.files)


def open_artifact(root: str | Path, *, checksums: bool = False, **options) -> ArtifactModel:
    """The artifact's model. `options` go to the targets that take them (`engine`: Core ML;
    `expert_cache` (auto, off or bytes; see ossedge.runtime.expert_cache), `cache_aware_routing`
    and `routing_pool`: ExecuTorch); a directory that is no artifact gets the default target's
    error (no manifest.json, …)."""
    target = target_of(root)
    given = {k: v for k, v in options.items() if v not in (None, 0)}
    for lossy in ("cache_aware_routing", "routing_pool"):
        if lossy in given and (target is None or lossy not in target.open_options):
            raise CacheOptionError(
                f"--cache-aware-routing applies to "
                f"{' and '.join(t.title for t in TARGETS.values() if lossy in t.open_options)} "
                f"artifacts; {root} is {target.name if target else 'not an artifact'}")  # fmt: skip
    target = target or TARGETS[DEFAULT_TARGET]
    return target.open(root, checksums=checksums,
                       **{k: v for k, v in options.items() if k in target.open_options})
