"""Stored formats of quantized weights: shapes and sizes from shapes alone, exact round trips on
their own grid (fp16 int4 scales included), and decoding by expert or by row."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ossedge.quantize import qtensor
from ossedge.quantize.qtensor import QTensor, encode, part_specs, stored_bytes

FORMATS = list(qtensor.QUANTIZED_FORMATS)


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.05


@pytest.mark.parametrize("fmt", FORMATS)
def test_parts_match_their_specs(fmt: str) -> None:
    w = _w(3, 8, 64)
    parts = encode(fmt, w)
    specs = part_specs(fmt, tuple(w.shape))
    assert set(parts) == set(specs)
    for p, t in parts.items():
        assert (tuple(t.shape), t.dtype) == specs[p]
    assert QTensor(fmt, tuple(w.shape), parts).nbytes == stored_bytes(fmt, tuple(w.shape))


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_decoded_values_are_a_fixed_point(
    fmt: str, rows: int, groups: int, seed: int, scale: float
) -> None:
    """Values already on the format's grid encode to the same values again."""
    w = _w(rows, 32 * groups, seed=seed) * scale
    once = QTensor(fmt, tuple(w.shape), encode(fmt, w)).dequantize()
    twice = QTensor(fmt, tuple(w.shape), encode(fmt, once)).dequantize()
    assert torch.equal(once, twice)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_int4_error_is_at_most_half_a_stored_step(rows: int, seed: int, scale: float) -> None:
    w = _w(rows, 96, seed=seed) * scale
    parts = encode("int4-g32", w)
    back = QTensor("int4-g32", tuple(w.shape), parts).dequantize()
    step = parts["scale"].float().repeat_interleave(32, dim=-1)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-3) + 1e-12).all()


def test_fp16_scales_keep_tiny_weights_finite() -> None:
    w = torch.full((2, 32), 1e-9)
    back = QTensor("int4-g32", (2, 32), encode("int4-g32", w)).dequantize()
    assert torch.isfinite(back).all() and (back - w).abs().max() < 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_and_row_indexing(fmt: str) -> None:
    w = _w(4, 16, 64)
    q = QTensor(fmt, tuple(w.shape), encode(fmt, w))
    full = q.dequantize()
    assert torch.equal(q[2].dequantize(), full[2])
    rows = QTensor(fmt, (16, 64), encode(fmt, w[1]))
    ids = torch.tensor([[3, 0], [15, 3]])
    assert torch.equal(rows.rows(ids), rows.dequantize()[ids])
    assert torch.equal(rows[4:9].dequantize(), rows.dequantize()[4:9])


def test_wrong_part_is_refused() -> None:
    parts = encode("int8-ch", _w(8, 64))
    parts["scale"] = parts["scale"][:4]
    with pytest.raises(ValueError, match="part 'scale'"):
        QTensor("int8-ch", (8, 64), parts)


def test_unknown_format_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown quantized format"):
        part_specs("int3", (8, 64))
    with pytest.raises(ValueError, match="groups of 32"):
        part_specs("int4-g32", (8, 48))


def test_bits_per_weight() -> None:
    shape = (2880, 2880)
    bits = {f: 8 * stored_bytes(f, shape) / math.prod(shape) for f in FORMATS}
    assert bits["mxfp4"] == 4.25
    assert bits["int4-g32"] == 4.5
    assert 8 < bits["int8-ch"] < 8.02
