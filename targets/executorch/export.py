"""Checkpoint → ExecuTorch artifact (`model.pte` + `model.ptd` + `tokenizer.json` + manifest).

Stages: build the exportable model (weights per the recipe; expert bytes as zero placeholders) →
torch.export → lower the linear layers to XNNPACK (torchao int4/int8 weights, int8 dynamic
activations) → to_executorch with every constant external → save the program and a placeholder
data file → rewrite the data file with the real expert bytes streamed from the checkpoint. The
12 GB of 20b experts therefore never pass through the exporter (which copies each constant into
Python bytes): the placeholders are identical zeros, deduplicated to one copy per shape.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ossedge.quantize.qtensor import INT4_GROUP, QTensor
from ossedge.runtime.errors import OssedgeError
from ossedge.runtime.profile import ProfileError, check_profile
from ossedge.runtime.tokenizer import generation_ids
from ossedge.targets.base import quiet_imports
from ossedge.targets.executorch import CONTRACT_VERSION, ptd
from ossedge.targets.executorch.model import (PACKED_BUFFER, ExportableGptOss, expert_constants,
                                              packed_layer)
from ossedge.targets.memory import kv_cache_bytes

# 2: one packed uint8 tensor per layer holding each expert as one extent (pack.py), read by
# ossedge::moe_*_packed; version-1 artifacts (four stacked tensors per layer) still run.
PTE, PTD = "model.pte", "model.ptd"
DATA_TAG = "model"  # the data file every external constant goes to (model.ptd)


class ExportError(OssedgeError):
    """The checkpoint cannot be exported with these settings."""


def xnnpack_linear(w: torch.Tensor | QTensor, b: torch.Tensor | None) -> nn.Module:
    """nn.Linear for XNNPACK: int4-g32 / int8-ch weights become torchao `IntxUnpackedToInt8Tensor`s
    built from the stored codes (no re-quantization) with int8 dynamic per-token activations —
    the pattern XNNPACK lowers to QB4W / QC8W kernels. Float weights stay float32."""
    quiet_imports()
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
                                                                                            IntxUnpackedToInt8Tensor)
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
                                                                                            IntxUnpackedToInt8TensorActivationQuantization as ActQuant)

    if not isinstance(w, QTensor):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight = nn.Parameter(w.float(), requires_grad=False)
    else:
        n, k = w.shape
        if w.fmt == "int8-ch":
            q = w.parts["q"]
            scale = w.parts["scale"].float().reshape(n, 1)
            target, block = torch.int8, (1, k)
        elif w.fmt == "int4-g32":
            packed = w.parts["q"]
            low = (packed & 15).to(torch.int8) - 8
            high = (packed >> 4).to(torch.int8) - 8
            q = torch.stack([low, high], dim=-1).reshape(n, k)
            scale = w.parts["scale"].float()
            target, block = torch.int4, (1, INT4_GROUP)
        else:
            raise ExportError(f"linear weights stored as {w.fmt} are not supported by XNNPACK")
        weight = IntxUnpackedToInt8Tensor(
            q,
            scale,
            torch.zeros(scale.shape, dtype=torch.int8),
            target,
            block,
            torch.float32,
            ActQuant.INT8_ASYM_PER_TOKEN,
        )
        lin = nn.Linear(k, n, bias=b is not None, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.float(), requires_grad=False)
    return lin


def metadata(model: ExportableGptOss, tokenizer) -> dict[str, Any]:
    """Constant methods ExecuTorch's LLM runners read (names as they expect them)."""

    ids = generation_ids(tokenizer)
    return {
        "get_max_seq_len": model.max_prefill,
        "get_max_context_len": model.max_context,
        "get_vocab_size": model.config.vocab_size,
        "get_bos_id": ids["bos_token_id"],
        "get_eos_ids": list(ids["eos_token_id"]),
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
    }


def export_program(
    model: ExportableGptOss, methods: dict[str, Any], stage: Callable[[str], None] = lambda s: None
):
    """torch.export → XNNPACK lowering → ExecutorchProgramManager (every constant external)."""
    quiet_imports()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import (EdgeCompileConfig, ExecutorchBackendConfig,
                                 to_edge_transform_and_lower)
    from executorch.exir.passes.external_constants_pass import (
                                                                delegate_external_constants_pass_unlifted)
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    tokens = torch.zeros(1, min(2, model.max_prefill), dtype=torch.long)
    args = (tokens, torch.tensor([0], dtype=torch.long))
    t = torch.export.Dim("T", min=1, max=model.max_prefill)
    dynamic = {"tokens": {1: t}, "input_pos": None}
    stage("export")
    with torch.no_grad():
        ep = torch.export.export(model, args, dynamic_shapes=dynamic, strict=False)
        # XNNPACK's packed weights go to the data file too (the tag names the file).
        module = ep.module()
        delegate_external_constants_pass_unlifted(module, lambda node: DATA_TAG)
        ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    stage("lower")
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=methods,
    )
    stage("emit")
    return edge.to_executorch(
        ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])],
            external_constants=lambda node: DATA_TAG,
            # cache writes (index_put on a mutable buffer) in place, not copy-then-write-back
            run_reinplace_pass=True,
        )
    )


def write_program(
    program, model: ExportableGptOss, source, out: Path, progress: bool,
    profile: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """model.pte and model.ptd into `out`; the .ptd gets the real expert bytes (packed, with the
    routing profile's frequencies in the extents' headers)."""
    with open(out / PTE, "wb") as f:
        program.write_to_file(f)
    staging = out / ".placeholder"
    staging.mkdir()
    program.write_tensor_data_to_file(str(staging))
    placeholder = staging / PTD
    if not placeholder.is_file():
        raise ExportError("the exporter wrote no data file; constants were not made external")
    replace = {}
    freqs = profile["frequencies"] if profile else None
    for fqn, (layer, buf) in expert_constants(model).items():
        if buf == PACKED_BUFFER:
            replace[fqn] = _packed(source, layer, freqs[layer] if freqs else None)
        else:
            replace[fqn] = _expert_part(source, layer, buf)
    ptd.rewrite(placeholder, out / PTD, replace, progress=progress)
    shutil.rmtree(staging)


_PART = {"gate_up_data": (0, 0), "gate_up_scale": (0, 1), "down_data": (1, 0), "down_scale": (1, 1)}


def _packed(source, layer: int, freqs: list[float] | None) -> Callable[[int], torch.Tensor]:
    def read(offset: int) -> torch.Tensor:
        return packed_layer(source, layer, file_offset=offset, frequencies=freqs)

    return read


def _expert_part(source, layer: int, buf: str) -> Callable[[int], torch.Tensor]:
    """A thunk returning the stored bytes of one expert part (read when it is written)."""
    which, part = _PART[buf]
    name = ("gate_up_proj", "down_proj")[which]

    def read(offset: int) -> torch.Tensor:
        w = source.weight(f"model.layers.{layer}.mlp.experts.{name}")
        return list(w.parts.values())[part]

    return read


def _store(model: ExportableGptOss, ptd_path: Path) -> dict[str, Any]:
    """Where the packed experts are in model.ptd: one [E, stride] tensor per layer; and the KV
    cache's bytes, which a host sizing the cache finds resident already after loading."""

    cfg = model.config
    entries = ptd.read_index(ptd_path).entries()
    stride = model.blocks[0].mlp.experts.shape[1]
    return {
        "file": PTD, "layout": "packed-extent-v1", "layers": cfg.num_hidden_layers,
        "experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok, "stride": stride,
        "offsets": [entries[f"blocks.{n}.mlp.{PACKED_BUFFER}"][0]
                    for n in range(cfg.num_hidden_layers)],
        "kv_cache_bytes": kv_cache_bytes(cfg, model.max_context, dtype_bytes=4),
    }  # fmt: skip


def _profile_summary(profile: dict[str, Any] | None) -> dict[str, Any] | None:
    if profile is None:
        return None
    keep = ("tokens", "text", "top_k", "top_quarter_share", "frequencies")
    return {k: profile[k] for k in keep if k in profile}


def check_options(options: dict[str, Any]) -> None:
    """The conversion options before anything is read (see convert/pipeline.py): `contract` 1
    writes the older layout (stacked expert tensors, no cache), for apps built against it, and
    takes neither a routing profile nor lookahead."""
    contract = options.get("contract", CONTRACT_VERSION)
    if contract not in (1, CONTRACT_VERSION):
        raise ExportError(f"contract version {contract}: this ossedge writes 1 or {CONTRACT_VERSION}")
    if contract == 1 and options.get("profile") is not None:
        raise ExportError("a routing profile needs contract version 2 (packed experts)")
    if contract == 1 and options.get("lookahead"):
        raise ExportError("lookahead needs contract version 2 (packed experts)")
    return None


def prepare(job) -> int:
    """Fill in the defaults (`max_prefill`: the sliding window; `lookahead`: on for contract 2)
    and check them and the routing profile against the model; the smallest context is one
    prefill."""

    o, cfg = job.options, job.config
    o.setdefault("contract", CONTRACT_VERSION)
    o.setdefault("profile", None)
    if o.get("lookahead") is None:
        o["lookahead"] = o["contract"] >= 2
    o["max_prefill"] = o.get("max_prefill") or cfg.sliding_window
    if not 1 <= o["max_prefill"] <= cfg.sliding_window:
        raise ExportError(
            f"--max-prefill must be 1..{cfg.sliding_window} (the sliding window), got {o['max_prefill']}"
        )
    if o["profile"] is not None:
        try:
            check_profile(o["profile"], layers=cfg.num_hidden_layers,
                          experts=cfg.num_local_experts, where="--expert-profile")  # fmt: skip
        except ProfileError as e:
            raise ExportError(str(e)) from None
    return o["max_prefill"]


def write(job, tmp: Path) -> dict[str, Any]:
    """model.pte and model.ptd into `tmp` (stages build, export, lower, emit, write); the
    manifest's ExecuTorch part. `job.options["profile"]` (ossedge.runtime.profile) is embedded in
    the manifest and in the packed experts' headers, for the expert cache's pinning;
    `lookahead` runs the MoE ops that hand the expert cache the next layer's likely experts."""
    o = job.options
    contract, profile, lookahead = o["contract"], o["profile"], o["lookahead"]
    bar = tqdm(total=5, desc="convert", unit="stage", disable=not job.progress)

    def stage(name: str) -> None:
        job.stage(name)
        bar.set_postfix_str(name)
        bar.update(1)

    job.stage("build")
    bar.set_postfix_str("build")
    model = ExportableGptOss(
        job.source,
        max_context=job.context,
        max_prefill=o["max_prefill"],
        make_linear=xnnpack_linear,
        placeholders=True,
        packed=contract >= 2,
        lookahead=lookahead,
    ).eval()
    methods = metadata(model, job.tokenizer)
    program = export_program(model, methods, stage)
    stage("write")
    write_program(program, model, job.source, tmp, job.progress, profile)
    del program
    job.stage(None)
    bar.update(1)
    bar.close()
    return {
        "contract_version": contract,
        "linear_activations": "int8 dynamic per token (XNNPACK) for int4/int8 weights",
        "experts": {"format": model.blocks[0].mlp.fmt, "op": model.blocks[-1].mlp.op_name,
                    "lookahead_op": model.blocks[0].mlp.op_name if lookahead else None,
                    "activations": "int8-b32", "kernel_library": "libossedge_kernels.so",
                    "store": _store(model, tmp / PTD) if contract >= 2 else None},
        "expert_profile": _profile_summary(profile),
        "attention": {"op": "ossedge::attend"},
        "max_prefill": o["max_prefill"],
        "methods": methods,
    }  # fmt: skip


def summary(manifest: dict[str, Any]) -> str:
    """What `ossedge convert` says it wrote."""
    return ("executorch" + (", with a routing profile" if manifest.get("expert_profile") else "")
            + (", lookahead" if manifest["experts"].get("lookahead_op") else ""))  # fmt: skip
