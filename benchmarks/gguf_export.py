"""A gpt-oss GGUF for llama.cpp holding the same weights as ossedge's artifacts for a recipe.

    write_gguf(ckpt, out, recipe="mobile") -> {"path", "bytes", "tensor_types", "lossless", "lossy"}

Weights come through `targets.source.weight_source`, one logical tensor at a time, and are written
as GGML blocks without going through floats:

  ossedge format   GGML type   exact?
  mxfp4            MXFP4       yes: the same E8M0 scale byte and E2M1 codes, nibbles reordered
  int4-g32         Q4_0        yes: the same codes and fp16 scale per 32 inputs, nibbles reordered
  int8-ch          Q8_0        no: the fp32 row scale becomes an fp16 scale per block of 32
  keep             F32 (BF16/F16 for large 2-D weights stored so)   yes

GGML packs a block of 32 as qs[j] = element j (low nibble) | element j+16 (high nibble); ossedge
and OpenAI pack byte k = element 2k (low) | element 2k+1 (high). The interleaved gate_up expert
weight (gate = rows 0::2, up = rows 1::2) is split into llama.cpp's ffn_gate_exps / ffn_up_exps,
and its bias likewise.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ossedge.runtime.tokenizer import Tokenizer

ARCH = "gpt-oss"
# llama.cpp recognizes the o200k pre-tokenizer regex as "gpt-4o" (llama-vocab.cpp).
PRE_TOKENIZER = "gpt-4o"
# ggml's swiglu_oai uses these constants for every gpt-oss model (llama-graph.cpp).
GGML_SWIGLU_LIMIT = 7.0
_BIG_2D = re.compile(
    r"model\.embed_tokens\.weight|lm_head\.weight|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"
)


@dataclass(frozen=True)
class _Entry:
    gguf: str  # GGUF tensor name
    src: str  # canonical logical name read from the source
    shape: tuple[int, ...]  # logical shape, outermost first (GGUF stores it reversed)
    ggml: object  # gguf.GGMLQuantizationType
    rows: str | None = None  # "even" / "odd": half of the interleaved gate_up rows


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


def _ggml_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., 32] (one block) → GGML's 16 bytes: element j low, element j+16 high."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def _unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Bytes holding element 2k low / 2k+1 high → codes, one per element (last dim doubles)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks u8 [..., G, 16] + scales u8 [..., G] → GGML block_mxfp4 bytes [..., G, 17]
    ({e, qs[16]}); both use a code table times 2^(e-127), so values are unchanged."""
    codes = _unpack_pairs(blocks)
    return torch.cat((scales.unsqueeze(-1), _ggml_nibbles(codes)), dim=-1)


def int4_to_q4_0(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q u8 [..., K/2] (codes offset by 8) + scale f16 [..., K/32] → block_q4_0 bytes
    [..., K/32, 18] ({d, qs[16]}); value = (code - 8) * d in both."""
    codes = _unpack_pairs(q).reshape(*scale.shape, 32)
    d = scale.to(torch.float16).contiguous().view(torch.uint8).reshape(*scale.shape, 2)
    return torch.cat((d, _ggml_nibbles(codes)), dim=-1)


def int8_to_q8_0(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q i8 [..., K] + scale f32 [...] → block_q8_0 bytes [..., K/32, 34] ({d, qs[32]}). Lossy:
    Q8_0's scale is fp16, so each value moves by at most 2^-11 relative (its row scale rounded)."""
    d16 = scale.to(torch.float16)
    if not torch.isfinite(d16).all() or bool(((d16 == 0) & (scale != 0)).any()):
        raise ValueError("an int8 row scale does not fit fp16; Q8_0 cannot hold this weight")
    g = q.shape[-1] // 32
    d = d16.contiguous().view(torch.uint8).reshape(*scale.shape, 1, 2).expand(*scale.shape, g, 2)
    return torch.cat((d, q.view(torch.uint8).reshape(*scale.shape, g, 32)), dim=-1)


def _select_rows(w, which: str | None, dim: int):
    """Every other index (0::2 "even", 1::2 "odd") of dimension `dim` of a tensor or of every part
    of a QTensor (its parts share the logical shape's leading dimensions)."""
    if which is None:
        return w
    from ossedge.quantize.qtensor import QTensor

    index = (slice(None),) * dim + (slice(0 if which == "even" else 1, None, 2),)
    if isinstance(w, QTensor):
        shape = list(w.shape)
        shape[dim] //= 2
        return QTensor(w.fmt, tuple(shape), {p: t[index].contiguous() for p, t in w.parts.items()})
    return w[index].contiguous()


def _encode(w, ggml_type) -> np.ndarray:
    """The GGML bytes of one source weight in `ggml_type`."""
    import gguf

    from ossedge.quantize.qtensor import QTensor

    T = gguf.GGMLQuantizationType
    if isinstance(w, QTensor):
        p = w.parts
        if w.fmt == "mxfp4" and ggml_type == T.MXFP4:
            return _bytes(mxfp4_to_ggml(p["blocks"], p["scales"]))
        if w.fmt == "int4-g32" and ggml_type == T.Q4_0:
            return _bytes(int4_to_q4_0(p["q"], p["scale"]))
        if w.fmt == "int8-ch" and ggml_type == T.Q8_0:
            return _bytes(int8_to_q8_0(p["q"], p["scale"]))
        raise ValueError(f"no GGML encoding of {w.fmt} as {ggml_type.name}")
    dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[ggml_type]
    return _bytes(w.to(dtype))


def _kept_type(source, name: str):
    """GGML type of a tensor the recipe keeps: F32, except large 2-D weights stored in 16 bits."""
    import gguf

    T = gguf.GGMLQuantizationType
    if not _BIG_2D.fullmatch(name):
        return T.F32
    ckpt = getattr(source, "ckpt", source)
    dtype = ckpt.entry(name).dtype
    return {torch.bfloat16: T.BF16, torch.float16: T.F16}.get(dtype, T.F32)


def _row_dim(src: str, shape) -> int:
    """The dimension holding gate_up's interleaved outputs: the last of a bias [E, 2I], the
    output rows of a weight [E, 2I, H]."""
    return len(shape) - 1 if src.endswith("_bias") else len(shape) - 2


def _plan(source) -> list[_Entry]:
    import gguf

    T = gguf.GGMLQuantizationType
    quant = {"mxfp4": T.MXFP4, "int4-g32": T.Q4_0, "int8-ch": T.Q8_0}
    cfg = source.config
    shapes = dict(source.shapes)

    def typ(name: str):
        fmt = source.formats[name]
        return _kept_type(source, name) if fmt == "keep" else quant[fmt]

    def entry(gname: str, src: str, rows: str | None = None) -> _Entry:
        shape = list(shapes[src])
        if rows is not None:
            shape[_row_dim(src, shape)] //= 2
        return _Entry(gname, src, tuple(shape), typ(src), rows)

    out = [entry("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        a, m, b = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"blk.{i}"
        out += [
            entry(f"{b}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight"),
            entry(f"{b}.post_attention_norm.weight",
                  f"model.layers.{i}.post_attention_layernorm.weight"),
            entry(f"{b}.attn_sinks.weight", f"{a}.sinks"),
            entry(f"{b}.ffn_gate_inp.weight", f"{m}.router.weight"),
            entry(f"{b}.ffn_gate_inp.bias", f"{m}.router.bias"),
        ]
        pairs = (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"))
        for ours, theirs in pairs:
            out += [entry(f"{b}.{theirs}.weight", f"{a}.{ours}_proj.weight"),
                    entry(f"{b}.{theirs}.bias", f"{a}.{ours}_proj.bias")]
        gu = f"{m}.experts.gate_up_proj"
        out += [
            entry(f"{b}.ffn_gate_exps.weight", gu, "even"),
            entry(f"{b}.ffn_up_exps.weight", gu, "odd"),
            entry(f"{b}.ffn_gate_exps.bias", f"{gu}_bias", "even"),
            entry(f"{b}.ffn_up_exps.bias", f"{gu}_bias", "odd"),
            entry(f"{b}.ffn_down_exps.weight", f"{m}.experts.down_proj"),
            entry(f"{b}.ffn_down_exps.bias", f"{m}.experts.down_proj_bias"),
        ]
    out += [entry("output_norm.weight", "model.norm.weight"),
            entry("output.weight", "lm_head.weight")]
    return out


def _nbytes(e: _Entry) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[e.ggml]
    n = int(np.prod(e.shape))
    if n % block:
        raise ValueError(f"{e.gguf} {list(e.shape)} is not whole {e.ggml.name} blocks of {block}")
    return n // block * size


def _find_file(root: Path, name: str) -> Path | None:
    for where in (root, root.parent):
        if (where / name).is_file():
            return where / name
    return None


def _add_tokenizer(w, root: Path, vocab_size: int) -> None:
    import gguf

    path = _find_file(root, "tokenizer.json")
    if path is None:
        raise FileNotFoundError(f"{root}: tokenizer.json not found beside the checkpoint")
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: a {model.get('type')} tokenizer; llama.cpp's gpt2 model is BPE")
    tok = Tokenizer.from_dir(path)
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL)
                                         for t, i in model["vocab"].items()}
    for t in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
        by_id[t["id"]] = (t["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(f"{path}: token id {max(by_id)} is outside the model's {vocab_size}")
    # The embedding has rows past the tokenizer's last id (gpt-oss pads 201088); name them unused.
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list([t for t, _ in tokens])
    w.add_token_types([int(k) for _, k in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.special("<|startoftext|>"))
    w.add_eos_token_id(tok.special("<|return|>"))
    w.add_pad_token_id(tok.special("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    template = _find_file(root, "chat_template.jinja")
    if template is not None:
        w.add_chat_template(template.read_text())


def _add_hparams(w, cfg, name: str, expert_type) -> None:
    import gguf

    if cfg.swiglu_limit != GGML_SWIGLU_LIMIT:
        raise ValueError(f"swiglu_limit {cfg.swiglu_limit}: llama.cpp fixes it at 7.0")
    w.add_name(name)
    ftype = {gguf.GGMLQuantizationType.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
             gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}.get(expert_type)
    if ftype is not None:
        w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    y = cfg.rope_scaling
    if y is not None:
        # llama.cpp always floors/ceils the YaRN correction range (truncate: true); gpt-oss's
        # truncate: false blends over a slightly narrower range, a small difference in RoPE.
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])


def write_gguf(ckpt_path, out_path, *, recipe: str = "mobile", progress: bool = False) -> dict:
    """Write checkpoint `ckpt_path` with `recipe` applied as a llama.cpp gpt-oss GGUF, streaming
    one tensor at a time (memory stays about one source tensor); `out_path` appears only once
    complete."""
    import gguf

    from ossedge.targets.source import weight_source

    source, recipe = weight_source(ckpt_path, recipe)
    cfg = source.config
    root = Path(ckpt_path)
    out_path = Path(out_path)
    plan = _plan(source)
    lossy = sorted({re.sub(r"^blk\.\d+\.", "blk.*.", e.gguf.removesuffix(".weight"))
                    for e in plan if e.ggml == gguf.GGMLQuantizationType.Q8_0})

    tmp = out_path.with_name(out_path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    experts = next(e.ggml for e in plan if e.gguf.endswith("ffn_down_exps.weight"))
    _add_hparams(w, cfg, root.resolve().name, experts)
    w.add_string("ossedge.recipe", recipe)
    _add_tokenizer(w, root, cfg.vocab_size)
    for e in plan:
        w.add_tensor_info(e.gguf, e.shape, np.dtype(np.float32), _nbytes(e), raw_dtype=e.ggml)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    cached: tuple[str | None, object] = (None, None)
    try:
        for e in tqdm(plan, desc="gguf", disable=not progress):
            if cached[0] != e.src:
                cached = (None, None)  # drop the previous weight before reading the next
                cached = (e.src, source.weight(e.src, copy=True))
            part = _select_rows(cached[1], e.rows, _row_dim(e.src, e.shape))
            w.write_tensor_data(_encode(part, e.ggml))
        w.close()
        os.replace(tmp, out_path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    types = Counter(e.ggml.name for e in plan)
    return {
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "tensor_types": dict(sorted(types.items())),
        "lossless": not lossy,
        "lossy": lossy,
    }
