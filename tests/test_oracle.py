"""The reference model against HF transformers' `GptOssForCausalLM` on the same synthetic
checkpoints: MXFP4 and dense experts, both layer types, sequences several sliding windows long,
batch 2, YaRN truncate true and false; full forward, cached decode and greedy generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency: missing, this file must fail rather than skip
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ossedge.runtime.config import config_from_hf_dict, preset
from ossedge.runtime.model import load_model, yarn_inv_freq

MAX_ABS_ERR_FP32 = 1e-4  # max |Δlogits| vs HF in fp32; logits are O(1–10), measured ~1e-5
# How much truncate and the sliding window must move the logits for the comparisons to see them.
MIN_EFFECT = 100 * MAX_ABS_ERR_FP32
WINDOW = 6
SEQ = 3 * WINDOW
BATCH = 2
VOCAB = 512

CASES = [
    ("mxfp4", False),
    ("mxfp4", True),
    ("dense", False),
    ("dense", True),
]
CASE_IDS = [f"{fmt}-{'truncate' if t else 'no-truncate'}" for fmt, t in CASES]


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_hf(path: Path, expert_format: str):
    kwargs = {}
    if expert_format == "mxfp4":  # CPU cannot run MXFP4; HF dequantizes the same bytes
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model.eval()


@pytest.fixture(scope="module")
def oracle_ckpt(synth, tiny_config):
    """3 layers (sliding, full, sliding), window 6; the same weights for every truncate flag."""

    def make(expert_format: str, truncate: bool, window: int = WINDOW) -> Path:
        cfg = tiny_config(truncate=truncate, num_layers=3, window=window)
        return synth(config=cfg, expert_format=expert_format, seed=11)

    return make


@pytest.mark.parametrize(("expert_format", "truncate"), CASES, ids=CASE_IDS)
def test_logits_match_hf(oracle_ckpt, expert_format: str, truncate: bool) -> None:
    path = oracle_ckpt(expert_format, truncate)
    hf = load_hf(path, expert_format)
    ours = load_model(path, dtype=torch.float32)
    assert ours.config.rope_scaling.truncate is truncate
    assert hf.config.rope_parameters.get("truncate") is truncate
    assert [ours.config.is_sliding(n) for n in range(3)] == [True, False, True]
    ids = tokens(BATCH, SEQ, seed=1)
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids)
    assert got.shape == want.shape == (BATCH, SEQ, VOCAB)
    err = (got - want).abs().max().item()
    assert err <= MAX_ABS_ERR_FP32, err


@pytest.mark.parametrize("expert_format", ["mxfp4", "dense"])
def test_truncate_changes_logits(oracle_ckpt, expert_format: str) -> None:
    """Power check for the test above: an implementation ignoring `truncate` would fail it."""
    ids = tokens(BATCH, SEQ, seed=1)
    a = load_model(oracle_ckpt(expert_format, False))(ids)
    b = load_model(oracle_ckpt(expert_format, True))(ids)
    assert (a - b).abs().max().item() > MIN_EFFECT
    hf_a = load_hf(oracle_ckpt(expert_format, False), expert_format)
    hf_b = load_hf(oracle_ckpt(expert_format, True), expert_format)
    with torch.no_grad():
        assert (hf_a(ids).logits - hf_b(ids).logits).abs().max().item() > MIN_EFFECT


def test_sliding_window_changes_logits(oracle_ckpt) -> None:
    """Power check: with the same weights, a window covering the whole sequence gives other
    logits past the first window, so ignoring the window fails the oracle test."""
    ids = tokens(BATCH, SEQ, seed=1)
    windowed = load_model(oracle_ckpt("mxfp4", False))(ids)
    wide = load_model(oracle_ckpt("mxfp4", False, window=SEQ))(ids)
    delta = (windowed - wide).abs().amax(dim=(0, 2))  # [T]
    assert delta[:WINDOW].max().item() <= MAX_ABS_ERR_FP32
    assert delta[WINDOW:].min().item() > MIN_EFFECT


def test_original_layout_matches_hf(synth) -> None:
    """OpenAI's layout (fused qkv) loads to the same logits as HF reading the HF layout."""
    hf = load_hf(synth(seed=12), "mxfp4")
    ours = load_model(synth(seed=12, layout="original"))
    ids = tokens(BATCH, 24, seed=2)  # tiny preset: window 8, 4 layers
    with torch.no_grad():
        want = hf(ids).logits
    assert (ours(ids) - want).abs().max().item() <= MAX_ABS_ERR_FP32


@pytest.mark.parametrize(("expert_format", "truncate"), CASES[:2], ids=CASE_IDS[:2])
def test_cached_decode_matches_hf_cached_decode(oracle_ckpt, expert_format, truncate) -> None:
    """Prefill 4 tokens, then feed the rest one at a time through both caches (past the ring
    buffer's wrap: 18 tokens, window 6)."""
    path = oracle_ckpt(expert_format, truncate)
    hf, ours = load_hf(path, expert_format), load_model(path)
    ids = tokens(BATCH, SEQ, seed=3)
    cache = ours.new_cache(batch_size=BATCH)
    mine = [ours(ids[:, :4], cache=cache)]
    with torch.no_grad():
        out = hf(ids[:, :4], use_cache=True)
        theirs = [out.logits]
        for t in range(4, SEQ):
            out = hf(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            theirs.append(out.logits)
            mine.append(ours(ids[:, t : t + 1], cache=cache))
    err = (torch.cat(mine, 1) - torch.cat(theirs, 1)).abs().max().item()
    assert err <= MAX_ABS_ERR_FP32, err


def test_greedy_generation_matches_hf_generate(oracle_ckpt) -> None:
    path = oracle_ckpt("mxfp4", False)
    hf, ours = load_hf(path, "mxfp4"), load_model(path)
    prompt, new = tokens(BATCH, 10, seed=4), 12  # 22 tokens > 3 windows
    # Plain argmax for a fixed length: no stop tokens (min_new_tokens would instead mask them).
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    cache = ours.new_cache(batch_size=BATCH)
    logits = ours(prompt, cache=cache, last_only=True)[:, -1]
    picked, errs = [], []
    for step in range(new):
        errs.append((logits - gen.logits[step]).abs().max().item())
        nxt = logits.argmax(-1)
        picked.append(nxt)
        logits = ours(nxt[:, None], cache=cache)[:, -1]
    assert torch.equal(torch.stack(picked, 1), gen.sequences[:, prompt.shape[1] :])
    assert max(errs) <= MAX_ABS_ERR_FP32, errs


@pytest.mark.parametrize("truncate", [False, True, None], ids=["false", "true", "absent"])
def test_yarn_inv_freq_matches_hf_on_20b_config(truncate: bool | None) -> None:
    d = json.loads(json.dumps(preset("20b").to_hf_dict()))
    if truncate is None:
        del d["rope_scaling"]["truncate"]
    else:
        d["rope_scaling"]["truncate"] = truncate
    hf_config = transformers.GptOssConfig(**copy.deepcopy(d))  # HF edits nested dicts in place
    want, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    cfg = config_from_hf_dict(d)
    # HF computes in fp32, its pow off by up to a bit (which bit varies with the SIMD path); ours
    # is rounded once from fp64: within two fp32 steps of HF's
    torch.testing.assert_close(yarn_inv_freq(cfg), want.float(), rtol=2 * 2.0**-23, atol=0)
    assert cfg.rope_scaling.attention_factor == pytest.approx(attention_factor, rel=1e-12)


def test_hf_sees_sinks_absorbing_mass(oracle_ckpt) -> None:
    """HF's eager attention returns probabilities without the sink column: rows sum below one by
    the sink's share, which must be non-trivial for the sink comparison to mean anything."""
    hf = load_hf(oracle_ckpt("mxfp4", False), "mxfp4")
    with torch.no_grad():
        out = hf(tokens(BATCH, SEQ, seed=5), output_attentions=True)
    for probs in out.attentions:  # [B, H, T, S]
        sink = 1 - probs.sum(-1)
        assert 0.005 < sink.mean().item() < 0.5
