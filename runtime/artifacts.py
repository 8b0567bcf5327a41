"""What every artifact target shares: opening one by its manifest, and `ossedge verify`."""

from __future__ import annotations

import json
import math
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


def verify_into_manifest(root: Path, ckpt_path, manifest: dict, write, *, tokens, progress):
    """Run `verify_artifact` on a freshly converted artifact, record the result in its manifest
    (`write(root, manifest)`), and raise ParityError when it failed (so nothing is kept)."""
    from ossedge.runtime.errors import ParityError

    result = verify_artifact(root, ckpt_path, tokens=tokens, progress=progress)
    manifest["verify"] = result
    write(root, manifest)
    if not result["passed"]:
        why = (f"rel_err_p90 {result['rel_err_p90']:.4g} > tolerance {result['tolerance']}"
               if result["rel_err_p90"] > result["tolerance"]
               else result["structure"]["problems"][0])
        raise ParityError(f"the converted artifact does not match the reference: {why}; "
                          "nothing written")


def default_tolerance(manifest: dict) -> float:
    """rel_err allowed against the reference with the same recipe: fp32 float linears are exact to
    rounding; XNNPACK's and MatMulNBits' int8 activations and Core ML's fp16 compute are not."""
    from ossedge.runtime.coreml import TOLERANCE_FP16
    from ossedge.runtime.executorch import TOLERANCE_FLOAT, TOLERANCE_QUANTIZED

    if manifest["format"] == "ossedge-coreml":
        return TOLERANCE_FP16
    return TOLERANCE_QUANTIZED if manifest["recipe"] != "native" else TOLERANCE_FLOAT


def expert_activations(manifest: dict) -> str:
    """How the artifact's expert kernels take their inputs: ExecuTorch's ossedge::moe_* round
    them to int8 per block of 32 ("int8-b32"); Core ML keeps them in its compute precision."""
    experts = manifest.get("experts")
    if isinstance(experts, dict) and "activations" in experts:
        return experts["activations"]
    return "int8-b32" if manifest.get("format") == "ossedge-executorch" else "float"


def verify_artifact(
    root: str | Path,
    reference: str | Path,
    *,
    tokens: int | None = None,
    tolerance: float | None = None,
    progress: bool = False,
) -> dict:
    """Teacher-forced decode of `tokens` tokens of the packaged evaluation text through the
    artifact (a prefill chunk, then one token per call, past the sliding window and the ring's
    wrap), compared at every step with the reference runtime applying the same recipe
    (max_abs_err, rel_err = max over steps of |Δlogits|₂/|logits|₂, rel_err_p90 its 90th
    percentile, top1_same; pass when rel_err_p90 ≤ tolerance) and with the unquantized reference
    (kl_mean, top1)."""
    import time

    from tqdm import tqdm

    from ossedge.runtime.checkpoint import open_checkpoint
    from ossedge.runtime.evaluate import default_text, token_metrics
    from ossedge.runtime.model import build_model
    from ossedge.runtime.quantized import QuantizedCheckpoint, QuantizedView
    from ossedge.runtime.tokenizer import Tokenizer

    t0 = time.perf_counter()
    model = open_artifact(root, checksums=True, engine="interpreter")
    manifest = model.manifest
    recipe = manifest["recipe"]
    ckpt = open_checkpoint(reference)
    tok_art = Tokenizer.from_dir(root)
    tok_ref = Tokenizer.from_dir(reference)
    if tok_art.vocab_size != tok_ref.vocab_size or tok_art.encode("def f(x):\n") != tok_ref.encode(
        "def f(x):\n"
    ):
        raise ArtifactError(f"{root} and {reference} use different tokenizers; not comparable")
    if ckpt.config.to_hf_dict() != manifest["config"]:
        raise ArtifactError(f"{root} was not converted from a model with {reference}'s config")
    cfg = ckpt.config
    n = tokens or min(2 * cfg.sliding_window + 16, model.max_context)
    if not 2 <= n <= model.max_context:
        raise ValueError(f"--tokens must be 2..{model.max_context} (the artifact's context)")
    text, _ = default_text()
    ids = tok_ref.encode(text)[:n]
    if len(ids) < n:
        raise ValueError(f"the evaluation text has only {len(ids)} tokens; use --tokens ≤ that")
    if isinstance(ckpt, QuantizedCheckpoint):
        if ckpt.recipe != recipe:
            raise ArtifactError(
                f"{reference} is quantized with recipe {ckpt.recipe}, the artifact with {recipe}; "
                "give the original checkpoint as --reference"
            )
        same_source = ckpt
        same, plain = build_model(ckpt, expert_activations=expert_activations(manifest)), None
    else:
        same_source = QuantizedView(ckpt, recipe)
        same = build_model(same_source, expert_activations=expert_activations(manifest))
        plain = build_model(ckpt)
    x = torch.tensor([ids], dtype=torch.long)
    ref_same = same(x)[0].float()
    del same
    ref_plain = plain(x)[0].float() if plain is not None else None
    del plain
    prefill = min(model.max_prefill, max(1, n // 4))
    got = [None] * n
    cache = model.new_cache()
    got[prefill - 1] = model(x[:, :prefill], cache=cache)[0, 0]
    for i in tqdm(range(prefill, n), desc="verify", unit="tok", disable=not progress):
        got[i] = model(x[:, i : i + 1], cache=cache)[0, 0]
    steps = list(range(prefill - 1, n))
    art = torch.stack([got[i] for i in steps])
    ref = ref_same[steps]
    diff = art - ref
    rels = (diff.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).sort().values
    rel = rels[-1].item()
    # the pass mark: 90% of the steps within tolerance. A wrong export is off at every step;
    # quantization noise (int8 activations) is far off only where a router flips an expert.
    rel_p90 = rels[max(0, math.ceil(0.9 * len(rels)) - 1)].item()
    tol = tolerance if tolerance is not None else default_tolerance(manifest)
    targets = torch.tensor(ids[prefill:] + [ids[-1]])  # next tokens (last one a dummy)
    vs = ref_plain[steps] if ref_plain is not None else ref
    m = token_metrics(art, vs, targets)
    result = {
        "tokens": n,
        "prefill_tokens": prefill,
        "steps_compared": len(steps),
        "max_abs_err": diff.abs().max().item(),
        "rel_err": rel,
        "rel_err_p90": rel_p90,
        "top1_same": (art.argmax(-1) == ref.argmax(-1)).double().mean().item(),
        "kl_mean": m["kl"].mean().item(),
        "top1": m["agree"].mean().item(),
        "unquantized_reference": ref_plain is not None,
        "tolerance": tol,
        "passed": rel_p90 <= tol,
        "recipe": recipe,
        "target": manifest["format"].removeprefix("ossedge-"),
    }
    if manifest["format"] == "ossedge-coreml":
        from ossedge.runtime.coreml import check_structure

        structure = check_structure(model, same_source)
        result["structure"] = structure
        result["passed"] = result["passed"] and structure["ok"]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
