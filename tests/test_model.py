"""The reference model against itself: cached decode equals the full forward past the ring
buffer's wrap, both layouts and both expert formats give identical logits, bf16 stays close to
fp32, YaRN follows the published formula, and synthetic weights exercise the clamp and sinks."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ossedge.runtime.config import SLIDING, preset
from ossedge.runtime.errors import OssedgeError
from ossedge.runtime.model import apply_rope, load_model, rope_allowance, rope_tables, yarn_inv_freq

MAX_ABS_ERR_CACHED_FP32 = 1e-4  # cached vs full forward; logits are O(1–10)
# bf16 compute vs fp32, per position: mean |Δlogits| / std(logits). Typically ~0.02 (HF
# transformers in bf16 is no closer); a position where bf16 flips an expert choice reaches ~0.5.
MEDIAN_REL_ERR_BF16 = 0.05
MEAN_REL_ERR_BF16 = 0.1
MAX_REL_ERR_BF16 = 1.0
MIN_TOP1_AGREEMENT_BF16 = 0.8
CLAMP_FRACTION = (0.005, 0.5)  # share of expert pre-activations beyond ±swiglu_limit
SINK_SHARE = (0.01, 0.5)  # mean attention mass absorbed by the sink column


def tokens(batch: int, length: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt: Path):
    return load_model(tiny_ckpt)


def decode_in_chunks(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    assert sum(chunks) == ids.shape[1]
    cache = model.new_cache(batch_size=ids.shape[0])
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert cache.position == ids.shape[1]
    return torch.cat(out, dim=1)


# -- cached decode ------------------------------------------------------------------------------

SCHEDULES = {  # tiny preset: sliding window 8, 40 tokens = 5 windows
    "prefill5-then-tokens": [5] + [1] * 35,
    "token-by-token": [1] * 40,
    "chunks-of-11": [11, 11, 11, 7],
    "chunks-of-window": [8] * 5,
    "mixed": [3, 9, 1, 1, 17, 2, 7],
    "prefill-longer-than-window": [20] + [1] * 20,
}


@pytest.mark.parametrize("chunks", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_cached_decode_equals_full_forward(tiny_model, chunks: list[int]) -> None:
    ids = tokens(2, 40, seed=1)
    full = tiny_model(ids)
    cached = decode_in_chunks(tiny_model, ids, chunks)
    err = (cached - full).abs().max().item()
    assert err <= MAX_ABS_ERR_CACHED_FP32, err


def test_ring_buffer_wrapped(tiny_model) -> None:
    """After 21 tokens the window-8 ring holds positions 13..20, each in slot pos % 8."""
    cache = tiny_model.new_cache(batch_size=1)
    tiny_model(tokens(1, 21), cache=cache)
    ring = cache.layers[0]
    assert tiny_model.config.is_sliding(0)
    assert sorted(ring.slot_pos.tolist()) == list(range(13, 21))
    assert all(int(p) % 8 == slot for slot, p in enumerate(ring.slot_pos))


def test_cached_decode_beyond_full_cache_capacity(tiny_model) -> None:
    """Full-attention caches start at 256 slots and grow; decode across the growth."""
    ids = tokens(1, 300, seed=2)
    full = tiny_model(ids)
    cached = decode_in_chunks(tiny_model, ids, [250, 1, 1, 40, 1, 7])
    assert (cached - full).abs().max().item() <= MAX_ABS_ERR_CACHED_FP32


def test_last_only(tiny_model) -> None:
    ids = tokens(2, 12)
    last = tiny_model(ids, last_only=True)
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, tiny_model(ids)[:, -1:], rtol=0, atol=1e-5)


def test_context_limit_from_cache(tiny_model) -> None:
    ids = tokens(1, 13)
    full = tiny_model(ids)
    cache = tiny_model.new_cache(max_context=12)
    tiny_model(ids[:, :10], cache=cache)
    with pytest.raises(OssedgeError, match="context limit of 12"):
        tiny_model(ids[:, 10:13], cache=cache)
    assert cache.position == 10  # the refused call consumed nothing
    last = tiny_model(ids[:, 10:12], cache=cache)  # exactly fills the context
    assert (last - full[:, 10:12]).abs().max().item() <= MAX_ABS_ERR_CACHED_FP32
    with pytest.raises(OssedgeError, match="context full"):
        tiny_model(ids[:, 12:13], cache=cache)


def test_context_limit_from_config(synth, tiny_config) -> None:
    model = load_model(synth(config=tiny_config(max_position_embeddings=16)))
    assert model.new_cache(max_context=100).max_context == 16
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(tokens(1, 17))
    cache = model.new_cache()
    model(tokens(1, 16), cache=cache)
    with pytest.raises(OssedgeError, match="context limit of 16"):
        model(tokens(1, 1), cache=cache)


def test_bad_inputs_raise(tiny_model, tiny_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tiny_model(tokens(1, 4)[0])
    with pytest.raises(ValueError, match="compute dtype"):
        load_model(tiny_ckpt, dtype=torch.float16)


# -- same weights, different files --------------------------------------------------------------


def test_hf_and_original_layouts_identical(tiny_model, tiny_original_ckpt: Path) -> None:
    ids = tokens(2, 24, seed=3)
    assert torch.equal(load_model(tiny_original_ckpt)(ids), tiny_model(ids))


def test_dense_and_mxfp4_experts_identical(tiny_model, tiny_dense_ckpt: Path) -> None:
    ids = tokens(2, 24, seed=4)
    assert torch.equal(load_model(tiny_dense_ckpt)(ids), tiny_model(ids))


def test_seed_changes_weights(tiny_model, synth) -> None:
    """Guards the two tests above: other weights give other logits."""
    ids = tokens(1, 8)
    assert (load_model(synth(seed=1))(ids) - tiny_model(ids)).abs().max().item() > 0.1


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_dense_ckpt"], ids=["mxfp4", "dense"])
def test_bf16_close_to_fp32(tiny_model, request, ckpt: str) -> None:
    path = request.getfixturevalue(ckpt)
    ids = tokens(2, 32, seed=5)
    ref = tiny_model(ids)
    low = load_model(path, dtype=torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).abs().mean(dim=-1).flatten() / ref.std()  # [B·T]
    assert rel.median().item() <= MEDIAN_REL_ERR_BF16, rel
    assert rel.mean().item() <= MEAN_REL_ERR_BF16, rel
    assert rel.max().item() <= MAX_REL_ERR_BF16, rel
    agree = (low.float().argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= MIN_TOP1_AGREEMENT_BF16, agree
    assert rel.min().item() > 0  # it really ran in bf16


def test_bf16_cached_decode(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    ids = tokens(1, 24, seed=6)
    full = model(ids).float()
    cached = decode_in_chunks(model, ids, [4] + [1] * 20).float()
    rel = (cached - full).abs().mean(dim=-1).flatten() / full.std()
    assert rel.median().item() <= MEDIAN_REL_ERR_BF16 and rel.max().item() <= MAX_REL_ERR_BF16


# -- sliding window semantics -------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2], ids=["1-sliding-layer", "2-sliding-layers"])
def test_sliding_window_receptive_field(synth, tiny_config, layers: int) -> None:
    """With only sliding layers of window W (the current token counts), token 0 reaches
    positions 0 .. layers·(W−1) and nothing beyond. (Beyond, logits move by rounding only: a
    changed routing elsewhere changes the row count of an expert's matmul.)"""
    w = 4
    cfg = tiny_config(window=w, num_layers=layers).replace(layer_types=(SLIDING,) * layers)
    model = load_model(synth(config=cfg))
    ids = tokens(1, 16, seed=7)
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 512
    changed = (model(ids) - model(other)).abs().amax(dim=-1)[0]  # [T]
    reach = layers * (w - 1)
    assert torch.all(changed[: reach + 1] > 1e-2), changed
    assert torch.all(changed[reach + 1 :] < 1e-5), changed


# -- YaRN ---------------------------------------------------------------------------------------


def correction_range_by_formula(head_dim: int, theta: float, ctx: int, beta: float) -> float:
    """DESIGN.md §3: d·ln(L/(β·2π)) / (2 ln θ)."""
    return head_dim * math.log(ctx / (beta * 2 * math.pi)) / (2 * math.log(theta))


def recovered_ramp(cfg) -> torch.Tensor:
    """The blend weight of the interpolated frequency per dimension pair, read off inv_freq."""
    d, theta, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.factor
    extra = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    inter = extra / factor
    return (extra - yarn_inv_freq(cfg).double()) / (extra - inter)


def test_yarn_correction_range_20b_untruncated() -> None:
    cfg = preset("20b")
    low = correction_range_by_formula(64, 150000.0, 4096, 32.0)
    high = correction_range_by_formula(64, 150000.0, 4096, 1.0)
    assert low == pytest.approx(8.09, abs=0.005) and high == pytest.approx(17.40, abs=0.005)
    ramp = recovered_ramp(cfg)
    # Dimensions ≤ 8 extrapolated, ≥ 18 interpolated, linear in between.
    assert torch.allclose(ramp[:9], torch.zeros(9, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(ramp[18:], torch.ones(14, dtype=torch.float64), atol=1e-6)
    i = torch.arange(9, 18, dtype=torch.float64)
    assert torch.allclose(ramp[9:18], (i - low) / (high - low), atol=1e-5)


def test_yarn_truncated_range_is_floored_and_ceiled() -> None:
    big = preset("20b")
    cfg = big.replace(rope_scaling=dataclasses.replace(big.rope_scaling, truncate=True))
    ramp = recovered_ramp(cfg)
    i = torch.arange(32, dtype=torch.float64)
    assert torch.allclose(ramp, ((i - 8) / (18 - 8)).clamp(0, 1), atol=1e-5)
    assert (yarn_inv_freq(cfg) - yarn_inv_freq(big)).abs().max().item() > 1e-4


def test_yarn_inv_freq_by_formula_20b() -> None:
    cfg = preset("20b")
    d = 64
    low = correction_range_by_formula(d, 150000.0, 4096, 32.0)
    high = correction_range_by_formula(d, 150000.0, 4096, 1.0)
    pos_freqs = 150000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    want = (1 / (32 * pos_freqs)) * ramp + (1 / pos_freqs) * (1 - ramp)
    torch.testing.assert_close(yarn_inv_freq(cfg).double(), want, rtol=1e-6, atol=0)


def test_yarn_attention_factor_scales_cos_and_sin() -> None:
    cfg = preset("20b")
    factor = 0.1 * math.log(32) + 1
    assert factor == pytest.approx(1.3466, abs=1e-4)
    assert cfg.rope_scaling.attention_factor == pytest.approx(factor, rel=1e-12)
    cos, sin = rope_tables(cfg, torch.arange(0, 5000, 7))
    assert cos.shape == (715, 32) and cos.dtype == torch.float32
    assert torch.allclose(cos[0], torch.full((32,), factor)) and torch.all(sin[0] == 0)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, factor**2), rtol=1e-5)


ROPE_BITS = Path(__file__).with_name("rope_bits.py")


def test_rope_tables_are_the_same_bits_on_every_simd_path() -> None:
    """torch's fp32 pow and cos differ in the last bit between its AVX2 and AVX-512 kernels, and
    that bit times a position in the thousands moves a table entry by ~1e-4: an artifact made on
    one machine would fail verify on another. The tables are the same bits on every path."""
    seen = {}
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, str(ROPE_BITS)], env=env, check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        seen[out[0]] = out[1]
    if platform.machine() in ("x86_64", "AMD64"):  # elsewhere torch takes the default for these
        assert {"DEFAULT", "AVX2"} <= set(seen), seen
    assert len(set(seen.values())) == 1, seen


def test_rope_allowance_takes_rounding_and_refuses_wrong_frequencies() -> None:
    """rope_allowance (what the structure checks hold a stored table to): a table computed in fp32
    throughout from inverse frequencies a bit off either way (as fp32 pow gives them on one SIMD
    path or another) is within it at every position of the 20b's context; one with YaRN's
    truncate flipped or another theta is not, and the allowance is tight at the first positions."""
    cfg = preset("20b")
    positions = torch.arange(0, cfg.max_position_embeddings, 61)
    allowance = rope_allowance(cfg, positions)
    want, _ = rope_tables(cfg, positions)
    inv_freq = yarn_inv_freq(cfg)
    for towards in (math.inf, 0.0):
        bit_off = torch.nextafter(inv_freq, torch.full_like(inv_freq, towards))
        angles = positions.float()[:, None] * bit_off[None, :]
        fp32 = angles.cos() * cfg.rope_scaling.attention_factor
        assert ((fp32 - want).abs() <= allowance).all()
        assert (fp32 - want).abs().max() > 1e-3  # rounding that large is real at this context
    assert allowance[0].max() < 1e-6
    y = cfg.rope_scaling
    for other in (cfg.replace(rope_scaling=dataclasses.replace(y, truncate=True)),
                  cfg.replace(rope_theta=cfg.rope_theta * 1.001)):  # fmt: skip
        cos, _ = rope_tables(other, positions)
        assert ((cos - want).abs() > allowance).any()
        assert ((cos - want).abs() / allowance).max() > 100


def test_rope_is_neox_half_split() -> None:
    """Pair i rotates element i with element i + D/2 (not adjacent elements)."""
    cfg = preset("tiny")
    x = torch.randn(1, 1, 2, 16, generator=torch.Generator().manual_seed(9))
    cos, sin = rope_tables(cfg, torch.tensor([5]))
    c, s = cos[0], sin[0]  # [8]
    a, b = x[..., :8], x[..., 8:]
    want = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), want, rtol=1e-6, atol=1e-6)


# -- synthetic weights look like a trained model's ----------------------------------------------


@pytest.fixture(scope="module")
def captured(tiny_model):
    """Inputs of every attention and MoE module during one forward pass."""
    seen: list[tuple[str, torch.nn.Module, tuple]] = []
    hooks = []
    for block in tiny_model.blocks:
        hooks.append(block.attn.register_forward_pre_hook(lambda m, a: seen.append(("attn", m, a))))
        hooks.append(block.mlp.register_forward_pre_hook(lambda m, a: seen.append(("mlp", m, a))))
    try:
        tiny_model(tokens(2, 32, seed=8))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * tiny_model.config.num_hidden_layers
    return seen


def test_expert_preactivations_cross_the_clamp(tiny_model, captured) -> None:
    cfg = tiny_model.config
    gates, ups = [], []
    for kind, mlp, (x,) in (c for c in captured if c[0] == "mlp"):
        x = x.reshape(-1, cfg.hidden_size)
        top = torch.topk(F.linear(x, mlp.router_w, mlp.router_b), cfg.num_experts_per_tok).indices
        for e in range(cfg.num_local_experts):
            rows = (top == e).any(dim=-1)
            w1, _ = mlp._weights(e)
            gate_up = F.linear(x[rows], w1, mlp.gate_up_b[e])
            gates.append(gate_up[:, 0::2].flatten())
            ups.append(gate_up[:, 1::2].flatten())
    limit = cfg.swiglu_limit
    gate, up = torch.cat(gates), torch.cat(ups)
    lo, hi = CLAMP_FRACTION
    assert lo <= (gate > limit).float().mean().item() <= hi  # gate is clamped from above only
    assert lo <= (up.abs() > limit).float().mean().item() <= hi


def test_sinks_absorb_attention_mass(tiny_model, captured) -> None:
    cfg = tiny_model.config
    kv, d, h = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    shares = []
    for kind, attn, (x, pos, rope, _) in (c for c in captured if c[0] == "attn"):
        b, t, _ = x.shape
        q = apply_rope(F.linear(x, attn.q_w, attn.q_b).view(b, t, h, d), *rope)
        k = apply_rope(F.linear(x, attn.k_w, attn.k_b).view(b, t, kv, d), *rope)
        k = k.repeat_interleave(h // kv, dim=2)  # query head n uses kv head n // (H/KV)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        visible = pos[None, :] <= pos[:, None]
        if attn.sliding:
            visible &= pos[:, None] - pos[None, :] < cfg.sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        sinks = attn.sinks.view(1, h, 1, 1).expand(b, h, t, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)
        shares.append(probs[..., -1].mean().item())
        # Attention is peaked but not one-hot.
        top = probs[..., :-1].amax(dim=-1).mean().item()
        assert 0.2 < top < 0.99, top
    lo, hi = SINK_SHARE
    assert all(s > lo / 2 for s in shares), shares
    assert lo <= sum(shares) / len(shares) <= hi, shares


def test_forced_routing_and_the_router_record(tiny_model) -> None:
    """verify's hooks: the experts of `forced` are used instead of the top-k (their weights the
    softmax of the router's logits for them), and `seen` gets each call's router logits."""
    ids = torch.arange(1, 13)[None]
    plain = tiny_model(ids)
    blocks, k = tiny_model.blocks, tiny_model.config.num_experts_per_tok
    for b in blocks:
        b.mlp.seen = []
    try:
        assert torch.equal(tiny_model(ids), plain)  # recording changes nothing
        logits = [b.mlp.seen[0] for b in blocks]
        for b, lg in zip(blocks, logits):  # the top-k, imposed: the same result
            b.mlp.forced = torch.topk(lg, k, dim=-1).indices.flip(-1)  # any order
        assert torch.allclose(tiny_model(ids), plain, atol=1e-6)
        blocks[0].mlp.forced = torch.topk(-logits[0], k, dim=-1).indices  # the bottom-k
        assert not torch.allclose(tiny_model(ids), plain, atol=1e-3)
        blocks[0].mlp.forced = blocks[0].mlp.forced[:3]
        with pytest.raises(ValueError, match="forced routing"):
            tiny_model(ids)
    finally:
        for b in blocks:
            b.mlp.forced = b.mlp.seen = None
