"""What every artifact target shares: opening one by its manifest, and checking a call."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ossedge.runtime.errors import ArtifactError


def artifact_format(path: str | Path) -> str | None:
    """"executorch", "coreml" or "onnx" for an ossedge artifact directory, else None."""
    p = Path(path) / "manifest.json"
    if not p.is_file():
        return None
    try:
        fmt = json.loads(p.read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        return None
    return {"ossedge-executorch": "executorch", "ossedge-coreml": "coreml",
            "ossedge-onnx": "onnx"}.get(fmt)


def read_manifest(root: Path, *, fmt: str, what: str, contract: int | tuple[int, ...],
                  files: tuple[str, ...] | None = None, checksums: bool = False,
                  error: type[ArtifactError] = ArtifactError) -> dict:
    """An artifact's manifest.json, after checking its format (`fmt`, e.g. "ossedge-onnx"), its
    contract version, and that each of `files` (default: every file it lists) is there with the
    recorded size and, with `checksums`, sha256. `what` names the artifact kind in errors."""
    from ossedge.runtime.quantized import sha256_file

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


def open_artifact(root: str | Path, *, checksums: bool = False, engine: str = "auto",
                  expert_cache: str | int = "auto", cache_aware_routing: int = 0,
                  routing_pool: int | None = None):  # fmt: skip
    """The artifact's model (ExecuTorchModel, CoreMLModel or OnnxModel; `engine` applies to Core
    ML, `expert_cache` (auto, off or bytes; see ossedge.runtime.expert_cache) and cache-aware
    routing to ExecuTorch)."""
    kind = artifact_format(root)
    if kind != "executorch" and (cache_aware_routing or routing_pool):
        from ossedge.runtime.expert_cache import CacheOptionError

        raise CacheOptionError(f"--cache-aware-routing applies to ExecuTorch artifacts; {root} "
                               f"is {kind or 'not an artifact'}")  # fmt: skip
    if kind == "onnx":
        from ossedge.runtime.onnx import OnnxModel

        return OnnxModel(root, checksums=checksums)
    if kind == "coreml":
        from ossedge.runtime.coreml import CoreMLModel

        return CoreMLModel(root, engine=engine, checksums=checksums)
    from ossedge.runtime.executorch import ExecuTorchModel

    return ExecuTorchModel(root, checksums=checksums, expert_cache=expert_cache,
                           cache_aware_routing=cache_aware_routing, routing_pool=routing_pool)


def check_call(input_ids: torch.Tensor, cache, kind: str) -> int:
    """Validate an artifact model's call: ids [1, T] that fit the cache's context. Returns T."""
    from ossedge.runtime.errors import OssedgeError

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
