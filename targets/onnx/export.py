"""Checkpoint → ONNX artifact for ONNX Runtime (`model.onnx` + `model.onnx.data` + tokenizer +
`genai_config.json` + manifest).

The graph is written directly with the `onnx` package from the checkpoint's tensors, one tensor at
a time: every weight goes straight to the external data file (each at a 64 KiB-aligned offset, so
ONNX Runtime can map it) and only its reference stays in the graph. The gpt-oss pieces are
ONNX Runtime's contrib operators (domain com.microsoft):

- attention: `GroupQueryAttention` with the sinks as `head_sink`, `local_window_size` for sliding
  layers, rotary inside from precomputed YaRN cos/sin caches, the KV cache as past/present
  [1, KV, S, D] (a shared buffer when the runner binds past and present to the same memory);
- experts: `QMoE` with gpt-oss's interleaved clamped SwiGLU. Its CPU kernel has no MXFP4 (`fp4`)
  implementation in onnxruntime 1.31, so MXFP4 experts are written as int8 blocks of 32 — exact:
  E2M1 values doubled are integers up to 12 and the block scale is a power of two (halved) — at
  twice the bytes; recipe `int4` experts go in as they are stored (4-bit, block 32);
- linear layers: `MatMulNBits` for int4 g32 (the stored nibbles) and int8 per row (block 32 with
  the row's scale repeated), float `MatMul` for weights kept in float;
- embedding: `Gather` of the int8 rows and their scales, or of the float table.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ossedge.quantize.mxfp4 import FP4_VALUES
from ossedge.quantize.qtensor import QTensor
from ossedge.runtime.atomic import write_json
from ossedge.runtime.errors import OssedgeError
from ossedge.runtime.model import rope_tables

MODEL, DATA, TOKENIZER, MANIFEST, GENAI = (
    "model.onnx", "model.onnx.data", "tokenizer.json", "manifest.json", "genai_config.json"
)
TOKENIZER_CONFIG = "tokenizer_config.json"
ALIGN = 1 << 16
OPSET, MS_OPSET = 21, 1
SWIGLU_ALPHA = 1.702
# MatMulNBits: int8 activations per block once ONNX Runtime prepacks the weights (the artifact
# disables prepacking, and then it computes in float: verify matches it to ~1e-6)
ACCURACY_LEVEL = 4


class OnnxExportError(OssedgeError):
    """The checkpoint cannot be exported to ONNX with these settings."""


class _Writer:
    """Initializers streamed to the external data file; the graph keeps references only."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")
        self.inits: list = []
        self.bytes = 0

    def add(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper

        array = np.ascontiguousarray(array)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        if array.nbytes < 1024:  # scalars and small vectors stay inline
            t.raw_data = array.tobytes()
        else:
            pad = -self.f.tell() % ALIGN
            self.f.write(b"\0" * pad)
            offset = self.f.tell()
            self.f.write(memoryview(array).cast("B"))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA), ("offset", str(offset)), ("length", str(array.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.bytes += array.nbytes
        self.inits.append(t)
        return name

    def close(self) -> None:
        self.f.close()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return _np(t.float())


class _Graph:
    def __init__(self, writer: _Writer) -> None:
        self.w = writer
        self.nodes: list = []

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, name: str | None = None,
             domain: str = "", **attrs) -> Any:
        from onnx import helper

        base = name or f"{op.lower()}_{len(self.nodes)}"
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, array: np.ndarray) -> str:
        return self.w.add(name, array)

    def rms(self, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
        """RMSNorm in plain ops (ONNX Runtime fuses it to SimplifiedLayerNormalization)."""
        mean = self.node("ReduceMean", [self.node("Mul", [x, x]), self.const(f"{name}.axes",
                         np.array([-1], np.int64))], keepdims=1)
        eps_c = self.const(f"{name}.eps", np.array(eps, np.float32))
        norm = self.node("Div", [x, self.node("Sqrt", [self.node("Add", [mean, eps_c])])])
        return self.node("Mul", [norm, self.const(f"{name}.weight", _f32(weight))])

    def linear(self, x: str, w: torch.Tensor | QTensor, b: torch.Tensor | None, name: str) -> str:
        if isinstance(w, QTensor):
            n, k = w.shape
            if w.fmt == "int4-g32":
                data = _np(w.parts["q"]).reshape(n, k // 32, 16)
                scales = _f32(w.parts["scale"]).reshape(n, k // 32)
                bits = 4
            elif w.fmt == "int8-ch":
                data = (_np(w.parts["q"]).astype(np.int16) + 128).astype(np.uint8)
                data = data.reshape(n, k // 32, 32)
                scales = np.repeat(_f32(w.parts["scale"]).reshape(n, 1), k // 32, axis=1)
                bits = 8
            else:
                raise OnnxExportError(f"{name}: {w.fmt} linear weights have no ONNX mapping here")
            y = self.node("MatMulNBits", [x, self.const(f"{name}.qweight", data),
                          self.const(f"{name}.scales", scales)], domain="com.microsoft",
                          name=f"{name}.matmul", K=k, N=n, bits=bits, block_size=32,
                          accuracy_level=ACCURACY_LEVEL)
        else:
            y = self.node("MatMul", [x, self.const(f"{name}.weight_t", _f32(w).T.copy())],
                          name=f"{name}.matmul")
        if b is not None:
            y = self.node("Add", [y, self.const(f"{name}.bias", _f32(b))])
        return y


def _experts(g: _Graph, source, layer: int, name: str) -> tuple[str, str, int]:
    """(weights, scales, bits) initializers of one stacked expert weight for QMoE: [E, N, K·bits/8]
    uint8 (int8 stored +128, int4 as code+8 nibbles) and float32 scales [E, N, K/32]."""
    w = source.weight(f"model.layers.{layer}.mlp.experts.{name}")
    if not isinstance(w, QTensor) or w.fmt not in ("mxfp4", "int4-g32"):
        raise OnnxExportError(
            f"experts stored as {getattr(w, 'fmt', 'dense')}: the ONNX target takes MXFP4 or "
            "int4-g32 experts (recipe mobile, mobile-int8, native or int4)"
        )
    e, n, k = w.shape
    prefix = f"layers.{layer}.{name}"
    if w.fmt == "int4-g32":
        data = _np(w.parts["q"])
        scales = _f32(w.parts["scale"])
        return g.const(f"{prefix}.qweight", data), g.const(f"{prefix}.scales", scales), 4

    codes = _np(w.parts["blocks"])  # [E, N, K/32, 16]
    twice = (np.asarray(FP4_VALUES, dtype=np.float32) * 2).astype(np.int16) + 128  # exact ints
    table = twice.astype(np.uint8)
    data = np.empty((e, n, k // 32, 32), np.uint8)
    data[..., 0::2] = table[codes & 15]
    data[..., 1::2] = table[codes >> 4]
    exps = _np(w.parts["scales"]).astype(np.int32)  # E8M0: 2^(e - 127); halved for the doubling
    scales = np.ldexp(np.float32(1.0), exps - 128).astype(np.float32)
    return (g.const(f"{prefix}.qweight", data.reshape(e, n, k)),
            g.const(f"{prefix}.scales", scales), 8)


def build_graph(source, out: Path, max_context: int, progress: bool) -> dict[str, Any]:
    """Write model.onnx and model.onnx.data into `out`; returns facts for the manifest."""
    import onnx
    from onnx import TensorProto, helper

    cfg = source.config
    kv, d, hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    writer = _Writer(out / DATA)
    g = _Graph(writer)
    weight = source.weight
    try:
        emb = weight("model.embed_tokens.weight")
        if isinstance(emb, QTensor):
            if emb.fmt != "int8-ch":
                raise OnnxExportError(f"a {emb.fmt} embedding has no ONNX mapping here")
            rows = g.node("Gather", [g.const("embed.q", _np(emb.parts["q"])), "input_ids"], axis=0)
            scale = g.node("Gather", [g.const("embed.scale", _f32(emb.parts["scale"]).reshape(-1, 1)),
                                      "input_ids"], axis=0)
            h = g.node("Mul", [g.node("Cast", [rows], to=TensorProto.FLOAT), scale], name="embed")
        else:
            h = g.node("Gather", [g.const("embed.weight", _f32(emb)), "input_ids"], axis=0,
                       name="embed")
        # GQA's lengths: valid keys - 1 per row, and the total length (the mask's width)
        ones = g.node("ReduceSum", ["attention_mask", g.const("mask.axis", np.array([1], np.int64))],
                      keepdims=0)
        seqlens = g.node("Cast", [g.node("Sub", [ones, g.const("one", np.array(1, np.int64))])],
                         to=TensorProto.INT32, name="seqlens_k")
        total = g.node("Cast", [g.node("Gather", [g.node("Shape", ["attention_mask"]),
                                                  g.const("dim1", np.array(1, np.int64))], axis=0)],
                       to=TensorProto.INT32, name="total_sequence_length")
        cos, sin = rope_tables(cfg, torch.arange(max_context))
        g.const("cos_cache", _np(cos))
        g.const("sin_cache", _np(sin))
        expert_bits = None
        for n in tqdm(range(cfg.num_hidden_layers), desc="onnx layers", disable=not progress):
            p = f"model.layers.{n}."
            x = g.rms(h, weight(p + "input_layernorm.weight"), cfg.rms_norm_eps, f"layers.{n}.ln1")
            q, k, v = (g.linear(x, weight(p + f"self_attn.{c}_proj.weight"),
                                weight(p + f"self_attn.{c}_proj.bias"), f"layers.{n}.{c}_proj")
                       for c in "qkv")
            sinks = g.const(f"layers.{n}.sinks", _f32(weight(p + "self_attn.sinks")))
            att = g.node(
                "GroupQueryAttention",
                [q, k, v, f"past_key_values.{n}.key", f"past_key_values.{n}.value", seqlens, total,
                 "cos_cache", "sin_cache", "", "", sinks],
                3, name=f"layers.{n}.attn", domain="com.microsoft", num_heads=hq,
                kv_num_heads=kv, scale=1 / math.sqrt(d), do_rotary=1, rotary_interleaved=0,
                local_window_size=cfg.sliding_window if cfg.is_sliding(n) else -1,
            )
            # name the cache outputs as the contract says
            g.nodes[-1].output[1:] = [f"present.{n}.key", f"present.{n}.value"]
            o = g.linear(att[0], weight(p + "self_attn.o_proj.weight"),
                         weight(p + "self_attn.o_proj.bias"), f"layers.{n}.o_proj")
            h = g.node("Add", [h, o])
            x = g.rms(h, weight(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps,
                      f"layers.{n}.ln2")
            router = g.linear(x, weight(p + "mlp.router.weight"), weight(p + "mlp.router.bias"),
                              f"layers.{n}.router")
            router = g.node("Reshape", [router, g.const(f"layers.{n}.router.shape",
                            np.array([-1, cfg.num_local_experts], np.int64))])
            w1, s1, bits = _experts(g, source, n, "gate_up_proj")
            w2, s2, _ = _experts(g, source, n, "down_proj")
            expert_bits = bits
            b1 = g.const(f"layers.{n}.gate_up_proj.bias", _f32(weight(p + "mlp.experts.gate_up_proj_bias")))
            b2 = g.const(f"layers.{n}.down_proj.bias", _f32(weight(p + "mlp.experts.down_proj_bias")))
            moe = g.node(
                "QMoE", [x, router, w1, s1, b1, w2, s2, b2], name=f"layers.{n}.moe",
                domain="com.microsoft", k=cfg.num_experts_per_tok, activation_type="swiglu",
                swiglu_fusion=1, activation_alpha=SWIGLU_ALPHA, activation_beta=1.0,
                swiglu_limit=float(cfg.swiglu_limit), normalize_routing_weights=1,
                expert_weight_bits=bits, block_size=32,
            )
            h = g.node("Add", [h, moe])
        x = g.rms(h, weight("model.norm.weight"), cfg.rms_norm_eps, "norm")
        g.linear(x, weight("lm_head.weight"), None, "lm_head")
        g.nodes[-1].output[0] = "logits"
    finally:
        writer.close()
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            [1, "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f, [1, "sequence_length", cfg.vocab_size])]
    for n in range(cfg.num_hidden_layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{n}.{part}", f,
                                                        [1, kv, "past_sequence_length", d]))
            outputs.append(helper.make_tensor_value_info(f"present.{n}.{part}", f,
                                                         [1, kv, "present_sequence_length", d]))
    model = helper.make_model(
        helper.make_graph(g.nodes, "gpt_oss", inputs, outputs, initializer=writer.inits),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)],
        producer_name="ossedge",
    )
    model.ir_version = 10
    onnx.save(model, str(out / MODEL))
    return {"expert_bits": expert_bits, "weight_bytes": writer.bytes}


def genai_config(cfg, max_context: int) -> dict[str, Any]:
    """onnxruntime-genai's description of the model (its `gptoss` type)."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else []
    decoder = {
        # ONNX Runtime's default, prepacking on: the weights are repacked into its heap at load,
        # an order of magnitude faster than running them from the mapped file (OnnxModel's
        # default; see targets/onnx/runner.py)
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    return {
        "model": {
            "bos_token_id": getattr(cfg, "bos_token_id", None) or 0,
            "context_length": max_context,
            "decoder": decoder,
            "eos_token_id": eos if isinstance(eos, list) else [eos],
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            "type": "gptoss",
            "vocab_size": cfg.vocab_size,
        },
        "search": {"do_sample": False, "max_length": max_context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "diversity_penalty": 0.0,
                   "no_repeat_ngram_size": 0},
    }


def _tokenizer_config(ckpt: Path, dst: Path, max_context: int) -> None:
    """The checkpoint's tokenizer_config.json (onnxruntime-genai's tokenizer reads it), or a
    minimal one for the fast tokenizer in tokenizer.json."""
    src = ckpt / TOKENIZER_CONFIG
    if src.is_file():
        shutil.copyfile(src, dst)
        return
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_context,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    write_json(dst, config)


def check_options(options: dict[str, Any]) -> None:
    return None  # ONNX takes no options of its own


def prepare(job) -> int:
    return 1  # GroupQueryAttention takes any context


def write(job, tmp: Path) -> dict[str, Any]:
    """model.onnx, model.onnx.data, genai_config.json and tokenizer_config.json into `tmp`; the
    manifest's ONNX part."""
    cfg = job.config
    job.stage("graph")
    facts = build_graph(job.source, tmp, job.context, job.progress)
    write_json(tmp / GENAI, genai_config(cfg, job.context))
    _tokenizer_config(job.ckpt, tmp / TOKENIZER_CONFIG, job.context)
    bits = facts["expert_bits"]
    return {
        "experts": {"op": "com.microsoft::QMoE", "bits": bits, "activations": "float",
                    "stored_as": "int8 block 32 (MXFP4, exact)" if bits == 8
                    else "int4 block 32 (as stored)"},
        "linear_activations": f"MatMulNBits accuracy_level {ACCURACY_LEVEL} (int8 per block "
                              "when prepacked, else float)",
        "attention": {"op": "com.microsoft::GroupQueryAttention"},
        "max_prefill": cfg.sliding_window,
        "session_options": {"session.disable_prepacking": "1"},
    }  # fmt: skip


def summary(manifest: dict[str, Any]) -> str:
    """What `ossedge convert` says it wrote."""
    return f"onnx, {manifest['experts']['bits']}-bit QMoE experts"
