"""Checkpoint → Core ML artifact: multifunction `.mlpackage` chunks, an embedding file, manifest.

    OUT/
      manifest.json            files (bytes, sha256), functions (package, inputs, outputs,
                               states), call order, recipe, deployment target, config, verify
      tokenizer.json
      embedding.safetensors    the embedding table per the recipe, read row by row by the host
      chunk_00.mlpackage …     multifunction packages of at most --chunk-mb each:
                               attn_{l}, expert_{l}_{e} …, head

Per token the host calls, for each layer l: `attn_{l}` (state: that function's k/v caches), then
`expert_{l}_{e}` for each of the k experts it returned, adding their outputs times the returned
weights to h; finally `head`. Functions are converted one chunk at a time, so memory stays
bounded by a chunk's weights whatever the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from tqdm import tqdm

from ossedge.quantize.qtensor import QTensor
from ossedge.runtime.errors import OssedgeError
from ossedge.targets.coreml import builder as mil
from ossedge.targets.coreml.builder import EXACT_FP16_SCALES
from ossedge.targets.coreml.interpreter import MilPackage, quiet_coremltools
from ossedge.targets.embedding import EMBEDDING, write_embedding

MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
TARGETS = ("ios18", "ios26")
DEFAULT_TARGET = "ios26"
DEFAULT_RECIPE_FOR = {"ios26": "mobile", "ios18": "int4"}
DEFAULT_CHUNK_MB = 1024


class CoreMLExportError(OssedgeError):
    """The checkpoint cannot be converted to Core ML with these settings."""


def opset_for(target: str):
    import coremltools as ct

    return {"ios18": ct.target.iOS18, "ios26": ct.target.iOS26}[target]


@dataclass
class Function:
    name: str
    kind: str  # attention | expert | head
    layer: int | None = None
    expert: int | None = None
    bytes: int = 0


def _weight_bytes(w: torch.Tensor | QTensor) -> int:
    """Bytes the weight occupies in a package: codes as stored, scales as fp16 (MXFP4's one-byte
    exponents become fp16 powers of two), plain tensors as fp16."""
    if not isinstance(w, QTensor):
        return w.numel() * 2
    codes = w.parts["blocks"] if w.fmt == "mxfp4" else w.parts["q"]
    scales = w.parts["scales"] if w.fmt == "mxfp4" else w.parts["scale"]
    return codes.numel() * codes.element_size() + scales.numel() * 2


def plan_functions(source) -> list[Function]:
    """Every function of the artifact in call order, with its approximate stored bytes."""
    cfg = source.config
    out = []
    for layer in range(cfg.num_hidden_layers):
        attn = sum(
            _weight_bytes(source.weight(f"model.layers.{layer}.self_attn.{p}_proj.weight"))
            for p in "qkvo"
        )
        out.append(Function(f"attn_{layer}", "attention", layer, None, attn))
        gu = source.weight(f"model.layers.{layer}.mlp.experts.gate_up_proj")
        dn = source.weight(f"model.layers.{layer}.mlp.experts.down_proj")
        per_expert = (_weight_bytes(gu) + _weight_bytes(dn)) // cfg.num_local_experts
        for e in range(cfg.num_local_experts):
            out.append(Function(f"expert_{layer}_{e}", "expert", layer, e, per_expert))
    out.append(Function("head", "head", None, None, _weight_bytes(source.weight("lm_head.weight"))))
    return out


def chunk_functions(functions: list[Function], limit: int) -> list[list[Function]]:
    """Consecutive functions grouped into chunks of at most `limit` bytes (a larger function gets
    a chunk of its own)."""
    chunks: list[list[Function]] = [[]]
    size = 0
    for f in functions:
        if chunks[-1] and size + f.bytes > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(f)
        size += f.bytes
    return chunks


def _attention_weights(source, layer: int) -> dict[str, Any]:
    p = f"model.layers.{layer}."
    names = {
        "attn_norm": "input_layernorm.weight",
        "mlp_norm": "post_attention_layernorm.weight",
        "sinks": "self_attn.sinks",
        "router_w": "mlp.router.weight",
        "router_b": "mlp.router.bias",
        **{f"{x}_w": f"self_attn.{x}_proj.weight" for x in "qkvo"},
        **{f"{x}_b": f"self_attn.{x}_proj.bias" for x in "qkvo"},
    }
    out = {k: source.weight(p + v) for k, v in names.items()}
    for k in ("router_w", "router_b", "attn_norm", "mlp_norm", "sinks"):
        if isinstance(out[k], QTensor):
            out[k] = out[k].dequantize(torch.float32)
    return out


def build_function(source, f: Function, context: int, opset, cache: dict) -> Callable:
    cfg = source.config
    if f.kind == "attention":
        return mil.attention_function(cfg, f.layer, _attention_weights(source, f.layer), context,
                                      opset)
    if f.kind == "expert":
        key = f.layer
        if cache.get("layer") != key:  # the layer's stacked expert tensors, read once
            p = f"model.layers.{f.layer}.mlp.experts."
            cache.clear()
            cache["layer"] = key
            cache["w"] = [source.weight(p + n) for n in
                          ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")]
        gu, gub, dn, dnb = cache["w"]
        e = f.expert
        return mil.expert_function(cfg, gu[e], gub[e], dn[e], dnb[e], opset)
    norm = source.weight("model.norm.weight")
    return mil.head_function(cfg, norm, source.weight("lm_head.weight"), opset)


def write_package(functions: list, path: Path, opset) -> None:
    """Convert MIL functions [(name, fn)] into one multifunction .mlpackage at `path`."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Program
    from coremltools.converters.mil.mil.passes import pass_pipeline

    prog = Program()
    for name, fn in functions:
        prog.add_function(name, fn)
    prog.default_function_name = functions[0][0]
    prog.export_as_multifunction = True
    # coremltools draws a progress bar per pass pipeline; ours is per function
    with mock.patch.object(pass_pipeline, "tqdm", lambda it, **_: it):
        model = ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=opset,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )
    model.save(str(path))


def check_expert_scales(source) -> int:
    """Blocks of MXFP4 experts whose values fp16 cannot hold exactly (0 for gpt-oss)."""

    cfg = source.config
    lo, hi = EXACT_FP16_SCALES
    bad = 0
    for layer in range(cfg.num_hidden_layers):
        for n in ("gate_up_proj", "down_proj"):
            w = source.weight(f"model.layers.{layer}.mlp.experts.{n}")
            if isinstance(w, QTensor) and w.fmt == "mxfp4":
                s = w.parts["scales"]
                bad += int(((s < lo) | (s > hi)).sum())
    return bad


def package_files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p


def check_options(options: dict[str, Any]) -> str:
    """The deployment target (default ios26) and chunk size; returns its default recipe (ios18
    cannot store MXFP4 experts compactly: int4)."""

    quiet_coremltools()
    dt = options["deployment_target"] = options.get("deployment_target") or DEFAULT_TARGET
    if dt not in TARGETS:
        raise CoreMLExportError(f"unknown deployment target {dt!r}; choose one of {list(TARGETS)}")
    options.setdefault("chunk_mb", DEFAULT_CHUNK_MB)
    if options["chunk_mb"] < 1:
        raise CoreMLExportError(f"--chunk-mb must be at least 1, got {options['chunk_mb']}")
    return DEFAULT_RECIPE_FOR[dt]


def prepare(job) -> int:
    """Refuse MXFP4 experts for ios18; the smallest context is the sliding window (the ring)."""
    w = job.source.weight("model.layers.0.mlp.experts.down_proj")
    job.options["expert_fmt"] = fmt = w.fmt if isinstance(w, QTensor) else "fp16"
    if job.options["deployment_target"] == "ios18" and fmt == "mxfp4":
        raise CoreMLExportError(
            f"recipe {job.recipe} keeps MXFP4 experts, which Core ML stores compactly only for "
            "iOS26/macOS26; use --deployment-target ios26, or --recipe int4 for ios18"
        )
    return job.config.sliding_window


def write(job, tmp: Path) -> dict[str, Any]:
    """The chunked .mlpackages and embedding.safetensors into `tmp` (stages packages, embedding);
    the manifest's Core ML part (functions, call order)."""
    source, cfg, o = job.source, job.config, job.options
    inexact = check_expert_scales(source)
    opset = opset_for(o["deployment_target"])
    functions = plan_functions(source)
    chunks = chunk_functions(functions, o["chunk_mb"] << 20)
    described: dict[str, Any] = {}
    packages: dict[str, Any] = {}
    job.stage("packages")
    bar = tqdm(total=len(functions), desc="convert", unit="fn", disable=not job.progress)
    cache: dict = {}
    for i, chunk in enumerate(chunks):
        name = f"chunk_{i:02d}.mlpackage"
        built = []
        for f in chunk:
            built.append((f.name, build_function(source, f, job.context, opset, cache)))
            bar.update(1)
        bar.set_postfix_str(f"writing {name}")
        write_package(built, tmp / name, opset)
        del built
        written = MilPackage(tmp / name)
        for f in chunk:
            described[f.name] = {
                "package": name, "kind": f.kind, "layer": f.layer, "expert": f.expert,
                "weight_bytes": f.bytes,
                **written.signature(f.name),
            }
        packages[name] = {
            "functions": [f.name for f in chunk],
            "bytes": sum(p.stat().st_size for p in package_files(tmp / name)),
        }
    bar.close()
    job.stage("embedding")
    embedding = write_embedding(source, tmp / EMBEDDING)
    return {
        "deployment_target": o["deployment_target"],
        "experts": {"format": o["expert_fmt"], "fp16_inexact_blocks": inexact},
        "embedding": embedding,
        "packages": packages,
        "functions": described,
        "call_order": [
            "per token: x = embedding row (fp32) of the token; for l in layers: "
            "h, m, ids, w = attn_{l}(x, pos) [state: its k_cache, v_cache]; "
            "x = h + sum_j w[j] * expert_{l}_{ids[j]}(m); then logits = head(x)",
        ],
        "predictions_per_token": cfg.num_hidden_layers * (1 + cfg.num_experts_per_tok) + 1,
    }


def summary(manifest: dict[str, Any]) -> str:
    """What `ossedge convert` says it wrote."""
    return f"coreml {manifest['deployment_target']}, {len(manifest['packages'])} packages"
