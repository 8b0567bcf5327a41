"""App bundles: one directory an Android or iOS app takes as it is — the artifacts under
`models/`, the platform glue (`android/`: ExecuTorch LLM runner wrapper, CMake for the ossedge
kernels and their sources; `ios/`: a Swift package with the Core ML driver; ONNX models load with
onnxruntime-genai's own packages), and a
`manifest.json` with the sha256 of every file, the contract version, generation defaults, the
harmony special token ids and the device plan. `verify_bundle` checks all of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from ossedge.runtime.atomic import atomic_dir, check_output, write_json
from ossedge.runtime.atomic import sha256_file as _sha256
from ossedge.runtime.config import config_from_hf_dict
from ossedge.runtime.errors import ArtifactError, OssedgeError
from ossedge.runtime.tokenizer import Tokenizer, generation_ids, special_ids
from ossedge.targets import TARGETS, target_of
from ossedge.targets.devices import get_device
from ossedge.targets.plan import evaluate

from ossedge import __version__

FORMAT = "ossedge-bundle"
CONTRACT_VERSION = 1
# platform → the targets a bundle for it may carry (the registry says where each target runs)
PLATFORMS = {p: tuple(t.name for t in TARGETS.values() if p in t.platforms) for p in ("android", "ios")}
MANIFEST = "manifest.json"


def is_bundle(path: str | Path) -> bool:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _place(src: Path, dst: Path) -> None:
    """Hard-link src at dst (no copy of gigabytes on one file system), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _artifact(path: Path) -> tuple[str, dict[str, Any]]:
    """(target, manifest) of an artifact directory, its files' presence and sizes checked."""
    target = target_of(path)
    if target is None:
        raise ArtifactError(
            f"{path}: not an ossedge artifact (no {', '.join(t.title for t in TARGETS.values())} "
            "manifest.json); make one with `ossedge convert`"
        )
    return target.name, target.read_manifest(path)


def _glue_files(platform: str) -> dict[str, bytes]:
    """Relative path → bytes of the platform glue (templates not yet filled in)."""
    out: dict[str, bytes] = {}
    glue = resources.files("ossedge.targets").joinpath("glue", platform)
    for f in glue.iterdir():
        if f.is_file():
            out[f"{platform}/{f.name}"] = f.read_bytes()
    if platform == "android":
        kernels = resources.files("ossedge.targets.executorch").joinpath("kernels")
        for f in kernels.iterdir():
            if f.is_file():
                out[f"android/ossedge_kernels/{f.name}"] = f.read_bytes()
    else:
        swift = resources.files("ossedge.targets.coreml").joinpath("swift")
        for f in swift.iterdir():
            if f.name.endswith(".swift"):
                out[f"ios/Sources/OssedgeCoreML/{f.name}"] = f.read_bytes()
    return out


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _generation(tokenizer_dir: Path, manifest: dict[str, Any]) -> tuple[dict, dict]:
    """(generation defaults, harmony special token ids) from the artifact's tokenizer."""

    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = generation_ids(tok)
    gen = {
        "bos_token_id": ids["bos_token_id"],
        "eos_token_ids": list(ids["eos_token_id"]),
        "pad_token_id": ids.get("pad_token_id"),
        "temperature": 1.0,
        "top_p": 1.0,
        "max_context": manifest["max_context"],
        "reasoning_effort": "medium",
    }
    return gen, special_ids(tok)


def make_bundle(
    artifacts: list[str | Path],
    out: str | Path,
    *,
    platform: str,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the bundle `out` (atomically) for `platform` from artifact directories; return its
    manifest. Every artifact file's sha256 is checked against its own manifest on the way."""

    if platform not in PLATFORMS:
        raise OssedgeError(f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
    out = Path(out)
    check_output(out, force=force)
    if not artifacts:
        raise OssedgeError("no artifact given; pass one or more `ossedge convert` outputs")
    opened, names = [], set()
    for a in map(Path, artifacts):
        target, manifest = _artifact(a)
        if target not in PLATFORMS[platform]:
            raise ArtifactError(
                f"{a}: a {target} artifact does not run on {platform}; {platform} takes "
                f"{' or '.join(PLATFORMS[platform])} artifacts"
            )
        name = a.resolve().name
        if name in names:
            raise OssedgeError(f"two artifacts are named {name!r}; rename one directory")
        names.add(name)
        opened.append((a, name, target, manifest))
    plan = _device_plan(device, opened) if device else None
    with atomic_dir(out, force=force) as tmp:
        files: dict[str, dict[str, Any]] = {}
        models = []
        for src, name, target, manifest in opened:
            for rel, want in sorted(manifest["files"].items()):
                _place(src / rel, tmp / "models" / name / rel)
                digest = _sha256(tmp / "models" / name / rel)
                if digest != want["sha256"]:
                    raise ArtifactError(
                        f"{src / rel}: sha256 differs from its artifact's manifest; the artifact "
                        "is corrupt, convert it again"
                    )
                files[f"models/{name}/{rel}"] = {"bytes": want["bytes"], "sha256": digest}
            shutil.copyfile(src / MANIFEST, tmp / "models" / name / MANIFEST)
            models.append({
                "dir": f"models/{name}",
                "target": target,
                "recipe": manifest["recipe"],
                "contract_version": manifest["contract_version"],
                "max_context": manifest["max_context"],
                **({"deployment_target": manifest["deployment_target"]}
                   if "deployment_target" in manifest else {}),
                "device_plan": manifest.get("device_plan"),
            })
        first = opened[0]
        generation, harmony = _generation(first[0], first[3])
        by_target = {m["target"]: m["dir"].removeprefix("models/") for m in models}
        values = {
            "NAME": first[3]["config"].get("model_type", "gpt-oss").replace("_", "-"),
            "MODELS": "\n".join(f"- `../{m['dir']}/`: {m['target']}, recipe {m['recipe']}, "
                                f"context {m['max_context']}" for m in models),
            # where each target's model is, for the glue's examples ({{EXECUTORCH_DIR}}, …)
            **{f"{t.upper()}_DIR": by_target.get(t, f"<{t} model dir>") for t in TARGETS},
            "TEMPERATURE": str(generation["temperature"]),
            "MAX_CONTEXT": str(generation["max_context"]),
        }
        for rel, data in _glue_files(platform).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith((".md", ".kt")):
                data = _fill(data.decode(), values).encode()
            path.write_bytes(data)
            files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name in names:  # the artifacts' own manifests are part of what is checked
            rel = f"models/{name}/{MANIFEST}"
            files[rel] = {"bytes": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
        bundle = {
            "format": FORMAT,
            "contract_version": CONTRACT_VERSION,
            "ossedge_version": __version__,
            "platform": platform,
            "models": models,
            "generation": generation,
            "harmony_tokens": harmony,
            "device_plan": plan,
            "files": dict(sorted(files.items())),
            "total_bytes": sum(f["bytes"] for f in files.values()),
        }
        write_json(tmp / MANIFEST, bundle)
    return bundle


def _device_plan(device_name: str, opened) -> dict[str, Any]:
    """The plan of each artifact (as built: its recipe and context) on the device."""

    device = get_device(device_name)
    out = {"device": device.to_dict(), "models": {}}
    for _, name, target, manifest in opened:
        if not device.runs(target):
            raise ArtifactError(f"{device.name} does not run {target} artifacts ({name})")
        cfg = config_from_hf_dict(manifest["config"], f"{name}/manifest.json")
        o = evaluate(device, cfg, target, manifest["recipe"], manifest["max_context"],
                     deployment_target=manifest.get("deployment_target"),
                     max_prefill=manifest.get("max_prefill"))
        out["models"][name] = o.to_dict()
    return out


def verify_bundle(root: str | Path) -> dict[str, Any]:
    """Check a bundle: format and contract version, then every file's size and sha256.
    ArtifactError (exit 1) names the first file that is missing, truncated or altered."""
    root = Path(root)
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable ({e}); make the bundle again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an ossedge bundle manifest")
    if m.get("contract_version") != CONTRACT_VERSION:
        raise ArtifactError(
            f"{root}: bundle contract version {m.get('contract_version')}, this ossedge reads "
            f"{CONTRACT_VERSION}; make the bundle again with this version"
        )
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: lists no files; make the bundle again")
    for rel, want in files.items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: missing from the bundle; copy it again or rebuild")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise ArtifactError(
                f"{f}: {size} bytes, the bundle manifest records {want['bytes']}; the file is "
                "truncated or altered"
            )
        if _sha256(f) != want["sha256"]:
            raise ArtifactError(f"{f}: sha256 differs from the bundle manifest; the file is "
                                "corrupt or altered")
    return {
        "bundle": str(root),
        "platform": m["platform"],
        "contract_version": m["contract_version"],
        "files_checked": len(files),
        "bytes_checked": sum(f["bytes"] for f in files.values()),
        "models": [f"{x['dir']} ({x['target']}, {x['recipe']})" for x in m["models"]],
        "passed": True,
    }
