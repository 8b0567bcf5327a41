"""int8 per-channel and int4 group-wise codecs: exact on their own grid, bounded error off it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ossedge.quantize import intq

GROUPS = [(g, sym) for g in intq.INT4_GROUPS for sym in (True, False)]
IDS = [f"g{g}-{'sym' if sym else 'asym'}" for g, sym in GROUPS]


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3


def test_int8_error_is_at_most_half_a_step() -> None:
    w = _weights(37, 96, 0)
    codes, scale = intq.quantize_int8(w)
    back = intq.dequantize_int8(codes, scale)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    assert ((back - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_is_exact_on_its_grid() -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int8)
    codes[:, 0] = 127  # pin each row's amax to the grid's end
    scale = torch.rand(16, generator=g) + 0.01
    w = intq.dequantize_int8(codes, scale)
    again, s2 = intq.quantize_int8(w)
    assert torch.equal(again, codes)
    assert torch.allclose(s2, scale, rtol=1e-6)


def test_int8_zero_row_is_zero() -> None:
    codes, scale = intq.quantize_int8(torch.zeros(3, 8))
    assert not codes.any() and torch.isfinite(scale).all()


@pytest.mark.parametrize(("group", "symmetric"), GROUPS, ids=IDS)
def test_int4_error_is_at_most_half_a_step(group: int, symmetric: bool) -> None:
    w = _weights(19, 256, 2)
    q = intq.quantize_int4(w, group=group, symmetric=symmetric)
    back = intq.dequantize_int4(q)
    step = q.scale.repeat_interleave(group, dim=1)
    assert q.packed.shape == (19, 128) and q.symmetric == symmetric
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize(("group", "symmetric"), GROUPS, ids=IDS)
def test_int4_is_exact_on_its_grid(group: int, symmetric: bool) -> None:
    w = _weights(8, 256, 3)
    q = intq.quantize_int4(w, group=group, symmetric=symmetric)
    grid = intq.dequantize_int4(q)
    q2 = intq.quantize_int4(grid, group=group, symmetric=symmetric)
    assert torch.equal(q2.packed, q.packed)
    assert torch.allclose(intq.dequantize_int4(q2), grid, rtol=1e-6, atol=1e-7)


def test_int4_asymmetric_beats_symmetric_on_shifted_weights() -> None:
    w = _weights(16, 128, 4).abs() + 1.0  # all positive: symmetric wastes half its codes
    err = {
        sym: (intq.dequantize_int4(intq.quantize_int4(w, symmetric=sym)) - w).abs().mean()
        for sym in (True, False)
    }
    assert err[False] < 0.6 * err[True]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_nibble_pack_unpack_round_trip(values: list[int]) -> None:
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = intq.pack_nibbles(codes)
    assert torch.equal(intq.unpack_nibbles(packed), codes)
    assert int(packed[0]) == values[0] | (values[1] << 4)  # element 0 in the low nibble


def test_chunking_does_not_change_results(monkeypatch) -> None:
    w = _weights(64, 128, 5)
    whole8, whole4 = intq.quantize_int8(w), intq.quantize_int4(w, symmetric=False)
    monkeypatch.setattr(intq, "CHUNK_ELEMENTS", 300)  # ~2 rows per chunk
    small8, small4 = intq.quantize_int8(w), intq.quantize_int4(w, symmetric=False)
    assert torch.equal(whole8[0], small8[0]) and torch.equal(whole8[1], small8[1])
    assert torch.equal(whole4.packed, small4.packed) and torch.equal(whole4.zero, small4.zero)
    assert torch.equal(intq.dequantize_int4(whole4), intq.dequantize_int4(small4))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: intq.quantize_int4(torch.randn(4, 48), group=32), "does not divide"),
        (lambda: intq.quantize_int4(torch.randn(4, 64), group=16), "group size"),
        (lambda: intq.quantize_int8(torch.randn(4)), "2-D"),
        (lambda: intq.pack_nibbles(torch.zeros(3, dtype=torch.uint8)), "even"),
    ],
    ids=["group-does-not-divide", "bad-group", "not-2d", "odd-pack"],
)
def test_bad_shapes_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=96))
@example([5.7271068236955274e-42])  # a range whose 255 / range overflows: zeros, not NaN
@example([-1e-38, 3e-39])
def test_int8_asym_token_rounding_is_within_half_a_step(values) -> None:
    v = torch.tensor([values])
    r = intq.round_activations_int8_asym_token(v)
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    step = (hi - lo) / 255 if hi > lo else 1.0
    assert (r - v).abs().max() <= step * 0.5 + 1e-5 * max(1.0, hi - lo)
    # zero is exactly representable (the zero point is an integer), as XNNPACK's QD8 makes it
    assert intq.round_activations_int8_asym_token(torch.tensor([[0.0, *values]]))[0, 0] == 0


def test_bf16_scales_round_to_nearest() -> None:
    s = torch.tensor([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-9], dtype=torch.float16)
    assert intq.round_scales_bf16(s).tolist() == [1.0, 1.0, 1.0 + 2**-7]
