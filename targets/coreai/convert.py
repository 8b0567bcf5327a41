"""Checkpoint → Core AI artifact: `.aimodel` assets of layer chunks and the head, an embedding
file, manifest.

    OUT/
      manifest.json            files (bytes, sha256), chunks (layers, functions, inputs,
                               outputs, states), where each expert tensor's bytes lie, recipe
      tokenizer.json
      embedding.safetensors    the embedding table per the recipe, read row by row by the host
      layers_NN.aimodel/       layers [a, b) of at most --chunk-mb: functions `decode` (one token)
                               and `prefill` (2 … max_prefill tokens), sharing their constants;
                               KV caches as states k_l, v_l
      head.aimodel/            function `head`: final norm and unembedding

Per call the host feeds the tokens' embedding rows through the chunks in order (`prefill` for
several tokens, `decode` for one; each chunk's states are its layers' caches), then `head` on the
last hidden state. A chunk is built, exported and written before the next is read, so memory is
bounded by a chunk's weights whatever the model.
"""

from __future__ import annotations

import gc
import mmap
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ossedge.quantize.qtensor import QTensor, stored_bytes
from ossedge.quantize.recipes import get_recipe
from ossedge.runtime.errors import OssedgeError
from ossedge.targets.base import quiet_imports
from ossedge.targets.coreai import OS_VERSION, PIECE_ELEMENTS
from ossedge.targets.coreai.backend import coreai, coreai_torch, quiet
from ossedge.targets.coreai.model import EXPERT_FORMATS, Head, LayerGroup
from ossedge.targets.embedding import EMBEDDING, write_embedding
from ossedge.targets.memory import grouped

DEFAULT_CHUNK_MB = 1024
PROGRAM = "main.mlirb"  # an asset's program: the IR bytecode, constants stored raw
EXPERT_PARTS = {"mxfp4": ("blocks", "scales"), "int4-g32": ("q", "scale")}
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


class CoreAIExportError(OssedgeError):
    """The checkpoint cannot be converted to Core AI with these settings."""


def check_options(options: dict[str, Any]) -> None:
    """The chunk size; coreai-core and coreai-torch must be importable (before anything is read)."""
    coreai_torch()
    quiet_imports()
    options.setdefault("chunk_mb", DEFAULT_CHUNK_MB)
    if options["chunk_mb"] < 1:
        raise CoreAIExportError(f"--chunk-mb must be at least 1, got {options['chunk_mb']}")


def prepare(job) -> int:
    """Refuse experts the programs cannot decode; the smallest context is the sliding window."""
    w = job.source.weight("model.layers.0.mlp.experts.down_proj")
    fmt = w.fmt if isinstance(w, QTensor) else "dense"
    if fmt not in EXPERT_FORMATS:
        raise CoreAIExportError(
            f"recipe {job.recipe} stores the experts as {fmt}; the Core AI target keeps MXFP4 or "
            "int4-g32 experts: use --recipe mobile, mobile-int8, native or int4"
        )
    job.options["expert_fmt"] = fmt
    return job.config.sliding_window


def layer_chunks(cfg, recipe: str, limit: int) -> list[range]:
    """Consecutive layers in chunks of at most `limit` stored bytes (at least one layer each)."""
    rec = get_recipe(recipe)

    def size(fmt, name, shape):
        return stored_bytes(fmt, shape) if fmt != "keep" else 2 * int(torch.Size(shape).numel())

    w = grouped(cfg, recipe, size)
    head = size(rec.format_for("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)),
                "lm_head.weight", (cfg.vocab_size, cfg.hidden_size))  # fmt: skip
    per_layer = (w["experts"] + w["expert_biases"] + w["linears"] - head + w["small"])
    per_layer //= cfg.num_hidden_layers
    step = max(1, limit // max(1, per_layer))
    n = cfg.num_hidden_layers
    return [range(a, min(a + step, n)) for a in range(0, n, step)]


def _export(module: torch.nn.Module, args: tuple, dynamic=None):
    ct = coreai_torch()
    ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    return ep.run_decompositions(ct.get_decomp_table())


def _state_order(ep, names: dict[str, str]) -> list[str]:
    """The state names in the order the program takes its mutated buffers."""
    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    return [names[s.target] for s in sig.input_specs
            if s.kind.name == "BUFFER" and s.target in mutated]  # fmt: skip


def _signature(asset, function: str) -> dict[str, Any]:
    s = asset.summary(include_statistics=False)
    return {kind: dict(getattr(s, f"function_{kind}")(function))
            for kind in ("inputs", "outputs", "states")}  # fmt: skip


def write_chunk(group: LayerGroup, path: Path, max_prefill: int) -> dict[str, Any]:
    """The chunk's decode and prefill functions as one .aimodel at `path` (constants shared)."""
    ct = coreai_torch()
    h = group.config.hidden_size
    pos = torch.zeros(1, dtype=torch.int32)
    conv = ct.TorchConverter()
    names = {"input_names": ["x", "pos"], "output_names": group.output_names()}
    group.set_prefill(False)
    ep = _export(group, (torch.zeros(1, h), pos))
    conv.add_exported_program(ep, **names, state_names=_state_order(ep, group.state_names()),
                              entrypoint_name="decode")  # fmt: skip
    functions = ["decode"]
    if max_prefill >= 2:
        group.set_prefill(True)
        t = torch.export.Dim("T", min=2, max=max_prefill)
        ep = _export(group, (torch.zeros(2, h), pos), {"x": {0: t}, "pos": None})
        conv.add_exported_program(ep, **names, state_names=_state_order(ep, group.state_names()),
                                  entrypoint_name="prefill")  # fmt: skip
        functions.append("prefill")
    del ep
    with quiet():
        asset = conv.to_coreai().save_asset(path)
    return {f: _signature(asset, f) for f in functions}


def write_head(source, path: Path) -> dict[str, Any]:
    ct = coreai_torch()
    head = Head(source).eval()
    conv = ct.TorchConverter()
    conv.add_exported_program(_export(head, (torch.zeros(1, source.config.hidden_size),)),
                              input_names=["x"], output_names=["logits"], entrypoint_name="head")  # fmt: skip
    with quiet():
        asset = conv.to_coreai().save_asset(path)
    return {"head": _signature(asset, "head")}


def expert_tensors(source, layer: int):
    """(name, part, uint8 tensor) of each stored expert tensor of `layer` (codes and scales of
    gate_up and down; int4 scales are fp16, compared as their bytes)."""
    for n in EXPERT_TENSORS:
        w = source.weight(f"model.layers.{layer}.mlp.experts.{n}")
        for part in EXPERT_PARTS[w.fmt]:
            t = w.parts[part].contiguous()
            yield n, part, t.view(torch.uint8) if t.dtype != torch.uint8 else t


def locate(program: Path, data: bytes, start: int = 0) -> int:
    """The offset of `data` in the file `program` (its first occurrence at or after `start`), or
    -1."""
    with open(program, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        probe = data[:4096]
        i = m.find(probe, start)
        while i >= 0 and m[i : i + len(data)] != data:
            i = m.find(probe, i + 1)
        return i


def expert_layout(source, layers: range, chunk: str, program: Path) -> dict[str, Any]:
    """Where each expert tensor of `layers` lies in the chunk's program, byte for byte as stored:
    the structure check reads them back from there (CoreAIExportError where one is not stored
    as is, e.g. decoded by the compiler)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for n, part, t in expert_tensors(source, layer):
            data = t.numpy().tobytes()
            at = locate(program, data)
            if at < 0:
                raise CoreAIExportError(
                    f"layer {layer} {n}.{part}: its bytes are not stored as is in {chunk}; the "
                    "Core AI compiler rewrote them"
                )
            out.setdefault(str(layer), {})[f"{n}.{part}"] = {"file": f"{chunk}/{PROGRAM}",
                                                             "offset": at, "bytes": len(data)}  # fmt: skip
    return out


def write(job, tmp: Path) -> dict[str, Any]:
    """The chunk assets, the head asset and embedding.safetensors into `tmp` (stages chunks, head,
    embedding); the manifest's Core AI part."""
    coreai()
    source, cfg = job.source, job.config
    max_prefill = min(cfg.sliding_window, job.context)
    chunks: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    job.stage("chunks")
    plan = layer_chunks(cfg, job.recipe, job.options["chunk_mb"] << 20)
    bar = tqdm(total=cfg.num_hidden_layers, desc="convert", unit="layer", disable=not job.progress)
    for i, layers in enumerate(plan):
        name = f"layers_{i:02d}.aimodel"
        bar.set_postfix_str(f"writing {name}")
        group = LayerGroup(source, layers, max_context=job.context).eval()
        functions = write_chunk(group, tmp / name, max_prefill)
        del group
        gc.collect()
        layout.update(expert_layout(source, layers, name, tmp / name / PROGRAM))
        chunks[name] = {"layers": [layers.start, layers.stop], "functions": functions}
        bar.update(len(layers))
    bar.close()
    job.stage("head")
    chunks["head.aimodel"] = {"layers": None, "functions": write_head(source, tmp / "head.aimodel")}
    gc.collect()
    job.stage("embedding")
    embedding = write_embedding(source, tmp / EMBEDDING)
    return {
        "os_version": OS_VERSION,
        "compute": "float32",
        "max_prefill": max_prefill,
        "experts": {"format": job.options["expert_fmt"], "stored_as": "uint8 codes and scales, "
                    "gathered by expert then decoded by table", "layout": layout},  # fmt: skip
        "linear_piece_elements": PIECE_ELEMENTS,
        "embedding": embedding,
        "chunks": chunks,
        "call_order": [
            "per call of T tokens at position p: x = the tokens' embedding rows (fp32 [T, H]); for "
            "each layers_NN chunk: x, ids_l, w_l … = prefill (T ≥ 2) or decode (T = 1) of (x, pos "
            "= [p]) [states: its layers' k_l, v_l]; logits = head(x of the last token)",
        ],
    }


def summary(manifest: dict[str, Any]) -> str:
    """What `ossedge convert` says it wrote."""
    n = sum(1 for c in manifest["chunks"].values() if c["layers"] is not None)
    return f"coreai, {n} layer chunks + head, experts {manifest['experts']['format']}"
