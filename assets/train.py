"""Train the small gpt-oss that ossedge ships as its default model (`assets/tiny-gpt-oss/`).

    python -m ossedge.benchmarks.train_tiny -o assets/tiny-gpt-oss [--steps 600] [--seed 0]

The real gpt-oss architecture scaled down (4 layers alternating sliding/full attention, hidden
256, 8 experts top-2, sliding window 32, YaRN and the SwiGLU clamp as in the 20b), trained on CPU
on the Python standard library sources of the running interpreter (PSF license, on every machine
offline), with files whose path hashes to 0 mod 50 held out. About 12% of training sequences are
harmony chat turns built from the training files ("Write a Python function named `f`: <docstring>"
→ the function in the `final` channel), so `ossedge chat` gets well-formed replies. The last
quarter of the steps trains the experts through the MXFP4 round trip (straight-through), so the
MXFP4 checkpoint written by our encoder is the model that was trained.

Fully seeded; the corpus depends on the interpreter's version (recorded in `training.json`). The
script ends by reloading the written checkpoint with the reference runtime, checking its logits
against the training module, and measuring held-out perplexity against a unigram baseline.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import random
import sys
import sysconfig
import textwrap
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from ossedge.quantize import mxfp4
from ossedge.runtime import load_model
from ossedge.runtime.atomic import atomic_dir, write_json
from ossedge.runtime.checkpoint import ATTENTION_WEIGHTS, MLP_WEIGHTS, NORM_WEIGHTS
from ossedge.runtime.config import (
    FULL,
    MXFP4_QUANTIZATION_CONFIG,
    SLIDING,
    GptOssConfig,
    preset,
)
from ossedge.runtime.harmony import Message, render_completion_ids, render_ids
from ossedge.runtime.model import SWIGLU_ALPHA, apply_rope, rms_norm, rope_tables
from ossedge.runtime.synth import generation_config
from ossedge.runtime.tokenizer import (
    SMALL_SPECIAL_COUNT,
    Tokenizer,
    special_ids,
    train_bpe_tokenizer,
)
from torch import nn

# The tensors saved as they are (bf16); the experts' weights go through the MXFP4 encoder.
_SAVED = {**NORM_WEIGHTS, **ATTENTION_WEIGHTS,
          **{k: v for k, v in MLP_WEIGHTS.items() if k not in ("gate_up", "down")}}

VOCAB = 4096
SEQ = 256
HELDOUT_MOD = 50
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}
MAX_FILE_BYTES = 200_000
EVAL_TEXT_BYTES = 80_000
CHAT_FRACTION = 0.12


def tiny_config() -> GptOssConfig:
    big = preset("20b")
    return big.replace(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=(SLIDING, FULL, SLIDING, FULL),
    )


# -- corpus -----------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel: str) -> bool:
    """The evaluation split: files whose relative path hashes to 0 mod 50 (~2% of the files)."""
    return zlib.crc32(rel.encode()) % HELDOUT_MOD == 0


def corpus_files() -> list[tuple[str, str]]:
    """(relative path, text) of every usable stdlib source file, sorted."""
    root = stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS or p.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            out.append((rel.as_posix(), p.read_text("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def as_document(rel: str, text: str) -> str:
    return f"# file: {rel}\n{text}"


def eval_text(files: list[tuple[str, str]]) -> str:
    """The held-out evaluation text shipped as `runtime/data/eval.txt`."""
    parts, size = [], 0
    for rel, text in files:
        if is_heldout(rel) and size < EVAL_TEXT_BYTES:
            doc = as_document(rel, text)
            parts.append(doc)
            size += len(doc.encode())
    return "\n".join(parts)


def chat_pairs(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(user request, function source) for short documented top-level functions."""
    pairs = []
    for rel, text in files:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            src = ast.get_source_segment(text, node)
            if not doc or not src or len(src) > 700:
                continue
            first = doc.strip().splitlines()[0].strip()
            pairs.append((f"Write a Python function named `{node.name}`: {first}", src))
    return pairs


# -- the differentiable model -----------------------------------------------------------------


def mxfp4_ste(w: torch.Tensor) -> torch.Tensor:
    """w through the MXFP4 round trip in the forward pass, identity in the backward pass."""
    q = mxfp4.dequantize(*mxfp4.quantize(w.detach()))
    return w + (q - w).detach()


class TrainModel(nn.Module):
    """The reference model's math (runtime/model.py), batched and differentiable."""

    def __init__(self, cfg: GptOssConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        h, e, i = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        std, deep = 0.02, 0.02 / math.sqrt(2 * cfg.num_hidden_layers)

        def p(*shape: int, s: float = std, fill: float | None = None) -> nn.Parameter:
            if fill is not None:
                return nn.Parameter(torch.full(shape, fill))
            return nn.Parameter(torch.randn(*shape, generator=g) * s)

        self.embed = p(cfg.vocab_size, h, s=1.0)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_hidden_layers):
            m = nn.Module()
            m.attn_norm, m.mlp_norm = p(h, fill=1.0), p(h, fill=1.0)
            m.q_w, m.q_b = p(cfg.q_size, h), p(cfg.q_size, fill=0.0)
            m.k_w, m.k_b = p(cfg.kv_size, h), p(cfg.kv_size, fill=0.0)
            m.v_w, m.v_b = p(cfg.kv_size, h), p(cfg.kv_size, fill=0.0)
            m.o_w, m.o_b = p(h, cfg.q_size, s=deep), p(h, fill=0.0)
            m.sinks = p(cfg.num_attention_heads, fill=0.0)
            m.router_w, m.router_b = p(e, h), p(e, fill=0.0)
            m.gate_up, m.gate_up_b = p(e, 2 * i, h), p(e, 2 * i, fill=0.0)
            m.down, m.down_b = p(e, h, i, s=deep), p(e, h, fill=0.0)
            self.layers.append(m)
        self.norm = p(h, fill=1.0)
        self.lm_head = p(cfg.vocab_size, h)

    def attention(self, m, x, rope, layer: int) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        kv, d = cfg.num_key_value_heads, cfg.head_dim
        g = cfg.num_attention_heads // kv
        q = F.linear(x, m.q_w, m.q_b).view(b, t, kv * g, d)
        k = F.linear(x, m.k_w, m.k_b).view(b, t, kv, d)
        v = F.linear(x, m.v_w, m.v_b).view(b, t, kv, d).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope).transpose(1, 2)
        q = q.view(b, t, kv, g, d).permute(0, 2, 3, 1, 4)
        scores = torch.einsum("bkgtd,bksd->bkgts", q, k) / math.sqrt(d)
        pos = torch.arange(t)
        visible = pos[None, :] <= pos[:, None]
        if cfg.is_sliding(layer):
            visible = visible & (pos[:, None] - pos[None, :] < cfg.sliding_window)
        scores = scores.masked_fill(~visible, float("-inf"))
        sinks = m.sinks.view(kv, g)[None, :, :, None, None].expand(b, kv, g, t, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        out = torch.einsum("bkgts,bksd->bkgtd", probs, v).permute(0, 3, 1, 2, 4)
        return F.linear(out.reshape(b, t, kv * g * d), m.o_w, m.o_b)

    def experts(self, m, x, qat: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.linear(x, m.router_w, m.router_b)
        top_v, top_i = torch.topk(logits, cfg.num_experts_per_tok, dim=-1)
        weights = torch.softmax(top_v, dim=-1)
        w1 = mxfp4_ste(m.gate_up) if qat else m.gate_up
        w2 = mxfp4_ste(m.down) if qat else m.down
        out = torch.zeros_like(x)
        limit = cfg.swiglu_limit
        for e in range(cfg.num_local_experts):
            rows, slot = torch.nonzero(top_i == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            gate_up = F.linear(x[rows], w1[e], m.gate_up_b[e])
            gate = gate_up[:, 0::2].clamp(max=limit)
            up = gate_up[:, 1::2].clamp(min=-limit, max=limit)
            hid = (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)
            y = F.linear(hid, w2[e], m.down_b[e])
            out = out.index_add(0, rows, y * weights[rows, slot, None])
        # Switch-style balance: fraction routed to each expert times its mean router probability.
        frac = torch.bincount(top_i.reshape(-1), minlength=cfg.num_local_experts).float()
        frac = frac / top_i.numel()
        prob = torch.softmax(logits, dim=-1).mean(0)
        aux = cfg.num_local_experts * (frac * prob).sum()
        return out.view(shape), aux

    def forward(self, ids: torch.Tensor, *, qat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rope = rope_tables(cfg, torch.arange(ids.shape[1]))
        x = F.embedding(ids, self.embed)
        aux = x.new_zeros(())
        for n, m in enumerate(self.layers):
            x = x + self.attention(m, rms_norm(x, m.attn_norm, cfg.rms_norm_eps), rope, n)
            y, a = self.experts(m, rms_norm(x, m.mlp_norm, cfg.rms_norm_eps), qat)
            x, aux = x + y, aux + a
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head), aux / cfg.num_hidden_layers

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The weights in the released HF layout: bf16, experts MXFP4 (our encoder)."""
        bf = torch.bfloat16
        out = {"model.embed_tokens.weight": self.embed.detach().to(bf)}
        for n, m in enumerate(self.layers):
            p = f"model.layers.{n}."
            named = {name: getattr(m, short) for short, name in _SAVED.items()}
            out.update({p + k: v.detach().to(bf).contiguous() for k, v in named.items()})
            for name, w in (("gate_up_proj", m.gate_up), ("down_proj", m.down)):
                blocks, scales = mxfp4.quantize(w.detach())
                out[p + f"mlp.experts.{name}_blocks"] = blocks
                out[p + f"mlp.experts.{name}_scales"] = scales
        out["model.norm.weight"] = self.norm.detach().to(bf)
        out["lm_head.weight"] = self.lm_head.detach().to(bf)
        return out

    def load_exported(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the weights to exactly what the checkpoint holds (bf16 rounding, MXFP4 decode)."""
        with torch.no_grad():
            self.embed.copy_(tensors["model.embed_tokens.weight"].float())
            self.norm.copy_(tensors["model.norm.weight"].float())
            self.lm_head.copy_(tensors["lm_head.weight"].float())
            for n, m in enumerate(self.layers):
                p = f"model.layers.{n}."
                for attr, name in _SAVED.items():
                    getattr(m, attr).copy_(tensors[p + name].float())
                for attr, name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                    x = p + f"mlp.experts.{name}"
                    w = mxfp4.dequantize(tensors[x + "_blocks"], tensors[x + "_scales"])
                    getattr(m, attr).copy_(w)


# -- training ---------------------------------------------------------------------------------


def build_data(tok, files, seed: int) -> tuple[torch.Tensor, int]:
    """One token stream of training documents and chat turns (shuffled, separated by
    <|endoftext|>), and the number of chat turns in it."""

    train = [(rel, text) for rel, text in files if not is_heldout(rel)]
    docs = tok.encode_batch([as_document(rel, text) for rel, text in train])
    code_tokens = sum(len(d) for d in docs)
    rng = random.Random(seed)
    pairs = chat_pairs(train)
    rng.shuffle(pairs)
    chats, chat_tokens = [], 0
    for request, source in pairs:
        if chat_tokens >= CHAT_FRACTION / (1 - CHAT_FRACTION) * code_tokens:
            break
        ids = render_ids(tok, [Message(role="user", content=request)])
        ids += render_completion_ids(
            tok, [Message(role="assistant", content=textwrap.dedent(source), channel="final")]
        )
        chats.append(ids)
        chat_tokens += len(ids)
    everything = docs + chats
    rng.shuffle(everything)
    eot = tok.special("<|endoftext|>")
    stream = [t for d in everything for t in (*d, eot)]
    return torch.tensor(stream, dtype=torch.long), len(chats)


def train(cfg, stream: torch.Tensor, *, steps: int, batch: int, seed: int, lr: float) -> tuple:
    torch.manual_seed(seed)
    model = TrainModel(cfg, seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )  # fmt: skip
    warmup, qat_from = max(1, steps // 20), int(steps * 0.75)
    g = torch.Generator().manual_seed(seed)
    start, log = time.perf_counter(), []
    for step in range(steps):
        frac = step / steps
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(stream) - SEQ - 1, (batch,), generator=g)
        window = torch.stack([stream[s : s + SEQ + 1] for s in starts.tolist()])
        logits, aux = model(window[:, :-1], qat=step >= qat_from)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + 0.01 * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * batch * SEQ / elapsed
            print(
                f"step {step:5d}/{steps}  loss {sum(log[-25:]) / len(log[-25:]):.3f}  aux "
                f"{float(aux.detach()):.3f}  {tok_s:.0f} tok/s  {elapsed / 60:.1f} min"
                + ("  (MXFP4 QAT)" if step >= qat_from else ""),
                file=sys.stderr,
                flush=True,
            )
    return model, log, time.perf_counter() - start


def heldout_perplexity(model_dir: Path, ids: list[int]) -> float:
    m = load_model(model_dir)
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, SEQ):
        x = torch.tensor(ids[a : a + SEQ + 1])
        if len(x) < 2:
            break
        logits = m(x[None, :-1])[0]
        nll += float(F.cross_entropy(logits, x[1:], reduction="sum"))
        n += len(x) - 1
    return math.exp(nll / n)


def unigram_perplexity(train_ids: torch.Tensor, ids: list[int], vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[torch.tensor(ids)].mean()))


def main() -> None:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="assets/tiny-gpt-oss")
    p.add_argument("--eval-text", default="runtime/data/eval.txt")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    files = corpus_files()
    train_texts = [as_document(rel, text) for rel, text in files if not is_heldout(rel)]
    backend = train_bpe_tokenizer(train_texts, VOCAB, special_count=SMALL_SPECIAL_COUNT)
    tok = Tokenizer(backend)
    ids = special_ids(tok)
    cfg = tiny_config().replace(
        eos_token_id=ids["<|return|>"],
        pad_token_id=ids["<|endoftext|>"],
        quantization_config=MXFP4_QUANTIZATION_CONFIG,
    )
    stream, n_chats = build_data(tok, files, a.seed)
    held = eval_text(files)
    print(
        f"corpus: {len(files)} files, {len(train_texts)} for training, {len(stream)} training "
        f"tokens incl. {n_chats} chat turns; tokenizer + data {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    model, log, train_s = train(cfg, stream, steps=a.steps, batch=a.batch, seed=a.seed, lr=a.lr)

    tensors = model.checkpoint_tensors()
    Path(a.eval_text).write_text(held, encoding="utf-8")
    eval_ids = tok.encode(held)
    with atomic_dir(a.output, force=a.force) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", cfg.to_hf_dict())
        tok.backend.save(str(tmp / "tokenizer.json"))
        gen = generation_config(
            [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
            ids["<|endoftext|>"],
            ids["<|startoftext|>"],
        )
        write_json(tmp / "generation_config.json", gen)

        # The written checkpoint, run by the reference runtime, is the trained module.

        model.load_exported(tensors)
        x = torch.tensor(eval_ids[:SEQ])[None]
        with torch.no_grad():
            want = model(x)[0]
        got = load_model(tmp)(x)
        parity = float((got - want).abs().max())
        ppl = heldout_perplexity(tmp, eval_ids)
        uni = unigram_perplexity(stream, eval_ids, VOCAB)
        info = {
            "python": platform.python_version(),
            "corpus": "Python standard library sources (PSF license), path crc32 % 50 == 0 "
            "held out",
            "files": len(files),
            "training_tokens": len(stream),
            "chat_turns": n_chats,
            "steps": a.steps,
            "batch": a.batch,
            "sequence": SEQ,
            "seed": a.seed,
            "train_seconds": round(train_s, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "final_train_loss": round(sum(log[-50:]) / len(log[-50:]), 4),
            "heldout_tokens": len(eval_ids),
            "heldout_perplexity": round(ppl, 3),
            "unigram_perplexity": round(uni, 3),
            "runtime_parity_max_abs": parity,
            "command": "python -m ossedge.benchmarks.train_tiny " + " ".join(sys.argv[1:]),
        }
        write_json(tmp / "training.json", info)
        (tmp / "README.md").write_text(_readme(cfg, info))
    print(json.dumps(info, indent=2))


def _readme(cfg: GptOssConfig, info: dict) -> str:
    return f"""# tiny-gpt-oss

The default model of ossedge: the gpt-oss architecture scaled down and trained on CPU, so demos
and quality measurements mean something without downloading weights.

- Architecture: {cfg.num_hidden_layers} layers (sliding window {cfg.sliding_window} and full
  attention alternating), hidden {cfg.hidden_size}, {cfg.num_attention_heads} query / \
{cfg.num_key_value_heads} key-value heads of {cfg.head_dim}, {cfg.num_local_experts} experts \
top-{cfg.num_experts_per_tok} (intermediate {cfg.intermediate_size}), vocabulary {cfg.vocab_size}
  (byte-level BPE with the harmony special tokens), YaRN and the SwiGLU clamp as gpt-oss-20b.
  Trained on sequences of {info['sequence']} tokens only: longer contexts are untested.
- Format: the released HF layout, experts MXFP4 (written by ossedge's encoder; the last quarter of
  training was quantization-aware), everything else bf16.
- Data: {info['corpus']} (Python {info['python']}, {info['files']} files,
  {info['training_tokens']} training tokens including {info['chat_turns']} harmony chat turns).
- Training: {info['steps']} steps × {info['batch']} × {info['sequence']} tokens, AdamW, seed
  {info['seed']}, {info['train_seconds'] / 60:.1f} min on 2 CPU cores; final train loss
  {info['final_train_loss']}.
- Held-out perplexity (ossedge's reference runtime, fp32, windows of {info['sequence']}):
  **{info['heldout_perplexity']}** vs **{info['unigram_perplexity']}** for a unigram model of the
  training tokens ({info['heldout_tokens']} tokens of `runtime/data/eval.txt`).

Reproduce: `{info['command']}`.
"""


if __name__ == "__main__":
    main()
