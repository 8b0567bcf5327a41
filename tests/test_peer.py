"""The llama.cpp peer: a GGUF of the bundled tiny model holding ossedge's weights bit for bit
(MXFP4 experts, Q4_0 attention), llama.cpp's logits and tokenizer against the reference runtime,
and the child runner's JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ossedge.assets import default_model_dir
from ossedge.benchmarks.gguf_export import write_gguf
from ossedge.benchmarks.peer import llama_cpp_available, load_llama, run_llama_cpp_child
from ossedge.runtime.tokenizer import Tokenizer
from ossedge.targets.source import weight_source

gguf = pytest.importorskip("gguf")

RECIPE = "mobile"
TEXT = (
    "The quick brown fox jumps over the lazy dog. Tiny models learn small stories, and "
    "the fox said hello to the cat while the sun went down over the quiet hills."
)
# ggml's E2M1 table holds twice the MXFP4 values; its E8M0 scale is halved to match.
KVALUES_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)
SKIP_LLAMA = "llama-cpp-python not installed: pip install llama-cpp-python"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def exported(model_dir: Path, tmp_path_factory) -> dict:
    return write_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", recipe=RECIPE)


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from ossedge.runtime.checkpoint import open_checkpoint
    from ossedge.runtime.model import build_model
    from ossedge.runtime.quantized import QuantizedView

    return build_model(QuantizedView(open_checkpoint(model_dir), RECIPE)).eval()


def _tensor(path: str, name: str):
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return t, np.array(t.data)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGML's block nibbles [..., 16] → codes [..., 32]: element j low, element j+16 high."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _ggml_mxfp4(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    b = raw.reshape(*shape[:-1], shape[-1] // 32, 17)
    scale = np.ldexp(1.0, b[..., 0].astype(np.int64) - 128)  # GGML's halved E8M0
    values = KVALUES_FP4[_unpack_nibbles(b[..., 1:])] * scale[..., None]
    return torch.from_numpy(values.reshape(shape).astype(np.float32))


def _ggml_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    b = raw.reshape(*shape[:-1], shape[-1] // 32, 18)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    values = (_unpack_nibbles(b[..., 2:]).astype(np.float64) - 8) * d[..., None]
    return torch.from_numpy(values.reshape(shape).astype(np.float32))


def _ggml_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    b = raw.reshape(*shape[:-1], shape[-1] // 32, 34)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    values = b[..., 2:].copy().view(np.int8).astype(np.float64) * d[..., None]
    return torch.from_numpy(values.reshape(shape).astype(np.float32))


def test_gguf_holds_the_recipes_weights(exported: dict, model_dir: Path) -> None:
    path = exported["path"]
    assert exported["bytes"] == Path(path).stat().st_size > 0
    assert exported["tensor_types"]["MXFP4"] == 12 and exported["tensor_types"]["Q4_0"] == 17
    assert exported["lossy"] == ["token_embd"] and exported["lossless"] is False
    source, _ = weight_source(model_dir, RECIPE)
    cfg = source.config
    e, n, h = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size

    gate_up = source.weight("model.layers.1.mlp.experts.gate_up_proj").dequantize()
    for name, want in (("gate", gate_up[:, 0::2]), ("up", gate_up[:, 1::2])):
        t, raw = _tensor(path, f"blk.1.ffn_{name}_exps.weight")
        assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
        assert torch.equal(_ggml_mxfp4(raw, (e, n, h)), want), name
    down = source.weight("model.layers.1.mlp.experts.down_proj").dequantize()
    assert torch.equal(_ggml_mxfp4(_tensor(path, "blk.1.ffn_down_exps.weight")[1], (e, h, n)), down)
    bias = source.weight("model.layers.1.mlp.experts.gate_up_proj_bias").float()
    assert torch.equal(torch.from_numpy(_tensor(path, "blk.1.ffn_up_exps.bias")[1]), bias[:, 1::2])

    q = source.weight("model.layers.2.self_attn.q_proj.weight")
    t, raw = _tensor(path, "blk.2.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert torch.equal(_ggml_q4_0(raw, q.shape), q.dequantize())
    out = source.weight("lm_head.weight")
    assert torch.equal(_ggml_q4_0(_tensor(path, "output.weight")[1], out.shape), out.dequantize())

    # Q8_0 keeps the int8 codes; only the row scale is rounded to fp16 (2^-11 relative at most).
    emb = source.weight("model.embed_tokens.weight")
    got = _ggml_q8_0(_tensor(path, "token_embd.weight")[1], emb.shape)
    want = emb.dequantize()
    bound = 2.0**-11 * want.abs().amax(dim=1, keepdim=True)
    assert ((got - want).abs() <= bound).all()


@pytest.fixture(scope="module")
def llama_cpp():
    if not llama_cpp_available():
        pytest.skip(SKIP_LLAMA)
    import llama_cpp

    return llama_cpp


def test_llama_cpp_logits_and_tokens_match_the_reference(
    llama_cpp, exported: dict, model_dir: Path, reference
) -> None:
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(TEXT)
    assert len(ids) >= 40
    ids = ids[:48]
    llm = load_llama(exported["path"], len(ids) + 8, 4, logits_all=True)
    assert llm.n_vocab() == reference.config.vocab_size
    sample = "Hello world, it's 2024! a <|x|> naïve café\n\n  spaces\tand 1234567 TABS"
    assert llm.tokenize(sample.encode(), add_bos=False, special=False) == tok.encode(sample)
    # llama.cpp always parses <|start|>, <|channel|>, <|message|> and <|constrain|> as special
    # tokens (a gpt-oss rule in llama-vocab.cpp), even with special=False; ossedge keeps them text.
    harmony = "<|start|>user"
    print("llama.cpp tokenizes", repr(harmony), "as",
          llm.tokenize(harmony.encode(), add_bos=False, special=False), "ossedge as",
          tok.encode(harmony))
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok.encode(TEXT)

    llm.reset()
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = reference(torch.tensor([ids]))[0].float()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    print(f"llama.cpp vs reference ({RECIPE}, {len(ids)} tokens): top-1 agreement {top1:.3f}, "
          f"relative L2 error per position mean {rel.mean():.4f} median {rel.median():.4f} "
          f"max {rel.max():.4f} (at {int(rel.argmax())}), max |diff| "
          f"{(got - want).abs().max().item():.4f}")
    assert top1 >= 0.9
    # llama.cpp rounds activations to 8 bits for its Q4_0/Q8_0/MXFP4 matmuls: about 0.5% per
    # position here. A position where two experts' router logits nearly tie can pick the other
    # expert there; on this text one does (layer 2, gap 0.005) and reaches about 5%.
    assert rel.median() < 0.02 and rel.mean() < 0.02
    assert rel.max() < 0.15


def test_child_runner_json_and_greedy_tokens(
    llama_cpp, exported: dict, model_dir: Path, reference
) -> None:
    ids = Tokenizer.from_dir(model_dir).encode(TEXT)[:20]
    gen = 6
    out = run_llama_cpp_child(exported["path"], ids, gen, runs=2, warmup=1, threads=2)
    assert out["runner"] == "llama.cpp" and out["model"] == exported["path"]
    assert (out["prompt_tokens"], out["gen_tokens"], out["warmup_runs"]) == (20, gen, 1)
    assert out["threads"] == 2 and out["load_s"] > 0 and isinstance(out["major_faults"], int)
    assert set(out["rss"]) == {"VmHWM", "VmRSS", "RssAnon", "RssFile"}
    assert len(out["runs"]) == 2
    keys = {"ttft_s", "prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s", "tokens"}
    for r in out["runs"]:
        assert set(r) == keys and len(r["tokens"]) == gen
        assert r["prefill_s"] > 0 and r["decode_tok_s"] == pytest.approx((gen - 1) / r["decode_s"])
    assert out["runs"][0]["tokens"] == out["runs"][1]["tokens"]

    seq = list(ids)
    with torch.no_grad():
        for _ in range(gen):
            seq.append(int(reference(torch.tensor([seq]))[0, -1].argmax()))
    want = seq[len(ids):]
    got = out["runs"][0]["tokens"]
    print(f"greedy tokens: llama.cpp {got}, reference {want}")
    assert got == want


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    from ossedge.benchmarks import peer
    from ossedge.benchmarks.harness import BenchError

    monkeypatch.setattr(peer, "llama_cpp_available", lambda: False)
    with pytest.raises(BenchError, match="pip install llama-cpp-python"):
        peer.run_llama_cpp_child(tmp_path / "x.gguf", [1, 2], 2, runs=1, warmup=0, threads=1)
