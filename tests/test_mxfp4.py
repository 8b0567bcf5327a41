"""MXFP4 codec: decode of hand-written bytes, the reference quantizer's rounding on worked
examples, round-trip properties (hypothesis), chunking and shape errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ossedge.quantize import mxfp4

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
HYPOTHESIS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def block(byte_values: list[int]) -> torch.Tensor:
    """One block [1, 16] from up to 16 bytes, zero-padded."""
    data = byte_values + [0] * (mxfp4.BYTES_PER_BLOCK - len(byte_values))
    return torch.tensor([data], dtype=torch.uint8)


def decode_by_spec(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Straight from the spec, one nibble at a time (an oracle independent of the lookup tables)."""
    out = []
    for row_b, s in zip(blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist(), strict=True):
        for byte in row_b:
            for code in (byte & 0xF, byte >> 4):
                sign = -1.0 if code & 0x8 else 1.0
                out.append(sign * E2M1[code & 0x7] * 2.0 ** (s - 127))
    return torch.tensor(out, dtype=torch.float32).reshape(*scales.shape[:-1], -1)


# The next fp32 above 6 (and 3): amax/6 is then a power of two plus one ulp, and must round up.
F32_ABOVE_6 = torch.nextafter(torch.tensor(6.0), torch.tensor(7.0)).item()
F32_ABOVE_3 = torch.nextafter(torch.tensor(3.0), torch.tensor(4.0)).item()


def scale_of(exponent_byte: int) -> float:
    return 2.0 ** (exponent_byte - 127)


# -- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("byte", "scale", "first", "second"),
    [
        (0x21, 127, 0.5, 1.0),  # low nibble (code 1) is element 0, high nibble (code 2) element 1
        (0x12, 127, 1.0, 0.5),
        (0x21, 128, 1.0, 2.0),  # scale byte 128 doubles
        (0x21, 126, 0.25, 0.5),
        (0x73, 127, 1.5, 6.0),
        (0x64, 127, 2.0, 4.0),
        (0x59, 127, -0.5, 3.0),  # code 9 = sign bit + code 1
        (0x9A, 127, -1.0, -0.5),
        (0xF7, 127, 6.0, -6.0),
        (0x07, 137, 6.0 * 1024, 0.0),
    ],
    ids=["0x21", "0x12", "0x21-scale128", "0x21-scale126", "0x73", "0x64", "0x59-neg-low",
         "0x9A-both-neg", "0xF7-max", "0x07-scale137"],
)
def test_decode_hand_written_byte(byte: int, scale: int, first: float, second: float) -> None:
    out = mxfp4.dequantize(block([byte]), torch.tensor([scale], dtype=torch.uint8))
    assert out.shape == (32,)
    assert out[0].item() == first and out[1].item() == second
    assert torch.count_nonzero(out[2:]) == 0


def test_decode_every_code_in_order() -> None:
    """Bytes 0x10, 0x32, ... hold codes 0..15 in element order; 8 is negative zero."""
    out = mxfp4.dequantize(block([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]),
                           torch.tensor([127], dtype=torch.uint8))
    want = list(E2M1) + [-v for v in E2M1]
    assert out[:16].tolist() == want
    assert math.copysign(1.0, out[8].item()) == -1.0


def test_decode_matches_spec_on_random_bytes() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 2, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 2, 4), dtype=torch.uint8, generator=g)
    out = mxfp4.dequantize(blocks, scales)
    assert out.shape == (3, 2, 128)
    torch.testing.assert_close(out, decode_by_spec(blocks, scales), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_decode_is_exact_in_low_precision(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (6, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 136, (6, 2), dtype=torch.uint8, generator=g)  # in fp16 range
    low = mxfp4.dequantize(blocks, scales, dtype=dtype)
    assert low.dtype == dtype
    assert torch.equal(low.float(), mxfp4.dequantize(blocks, scales))


@pytest.mark.parametrize("chunk_blocks", [1, 3, 7, 1000], ids=lambda n: f"chunk{n}")
def test_chunked_decode_equals_unchunked(chunk_blocks: int) -> None:
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (4, 5, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (4, 5, 3), dtype=torch.uint8, generator=g)
    whole = mxfp4.dequantize(blocks, scales, chunk_blocks=1 << 20)
    assert torch.equal(mxfp4.dequantize(blocks, scales, chunk_blocks=chunk_blocks), whole)


@pytest.mark.parametrize("chunk_blocks", [1, 5, 64], ids=lambda n: f"chunk{n}")
def test_chunked_encode_equals_unchunked(chunk_blocks: int) -> None:
    x = torch.randn(6, 7, 96, generator=torch.Generator().manual_seed(3))
    b_whole, s_whole = mxfp4.quantize(x, chunk_blocks=1 << 20)
    b, s = mxfp4.quantize(x, chunk_blocks=chunk_blocks)
    assert torch.equal(b, b_whole) and torch.equal(s, s_whole)
    assert b.shape == (6, 7, 3, 16) and s.shape == (6, 7, 3)


# -- encode -------------------------------------------------------------------------------------


def encode_one_block(values: list[float]) -> tuple[torch.Tensor, int]:
    """Values (≤ 32, zero-padded) → (decoded values, scale byte)."""
    x = torch.tensor(values + [0.0] * (32 - len(values)), dtype=torch.float32)
    blocks, scales = mxfp4.quantize(x)
    return mxfp4.dequantize(blocks, scales), int(scales.item())


MIDPOINT_CASES = [  # (value at scale 1, nearest-even neighbour)
    (0.25, 0.0),
    (0.75, 1.0),
    (1.25, 1.0),
    (1.75, 2.0),
    (2.5, 2.0),
    (3.5, 4.0),
    (5.0, 4.0),
]


@pytest.mark.parametrize(("value", "want"), MIDPOINT_CASES, ids=[str(v) for v, _ in MIDPOINT_CASES])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
def test_encode_midpoints_round_to_even(value: float, want: float, sign: float) -> None:
    # The 6.0 pins the block's scale to 2^0 (scale byte 127).
    out, scale = encode_one_block([6.0, sign * value])
    assert scale == 127
    assert out[1].item() == sign * want


@pytest.mark.parametrize(
    ("value", "want"),
    [(0.26, 0.5), (0.74, 0.5), (1.3, 1.5), (2.49, 2.0), (2.51, 3.0), (4.9, 4.0), (5.1, 6.0),
     (0.1, 0.0)],
    ids=["0.26", "0.74", "1.3", "2.49", "2.51", "4.9", "5.1", "0.1"],
)
def test_encode_rounds_to_nearest(value: float, want: float) -> None:
    out, _ = encode_one_block([6.0, value, -value])
    assert out[1].item() == want and out[2].item() == -want


@pytest.mark.parametrize(
    ("amax", "scale_byte"),
    [(6.0, 127), (6.01, 128), (12.0, 128), (12.5, 129), (3.0, 126), (5.99, 127), (0.75, 124),
     (F32_ABOVE_6, 128), (F32_ABOVE_3, 127)],
    ids=["6", "6.01", "12", "12.5", "3", "5.99", "0.75", "6+ulp", "3+ulp"],
)
def test_encode_scale_exponent_rounds_up(amax: float, scale_byte: int) -> None:
    _, scale = encode_one_block([0.1, -amax, 0.3])
    assert scale == scale_byte
    # The smallest power-of-two scale under which nothing clips.
    assert 3.0 * scale_of(scale) < amax <= 6.0 * scale_of(scale)


def test_encode_zero_block() -> None:
    out, _ = encode_one_block([0.0] * 32)
    assert torch.count_nonzero(out) == 0


def test_encode_worked_block_bytes() -> None:
    """[0.5, 1.0, -6.0, 3.0, 0...] at scale 1 → bytes 0x21, 0x5F (codes 1, 2, 15, 5)."""
    blocks, scales = mxfp4.quantize(torch.tensor([0.5, 1.0, -6.0, 3.0] + [0.0] * 28))
    assert scales.tolist() == [127]
    assert blocks[0, :2].tolist() == [0x21, 0x5F]
    assert blocks[0, 2:].tolist() == [0] * 14


# -- properties ---------------------------------------------------------------------------------


@st.composite
def grid_blocks(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 bytes of 1–3 blocks whose first element is ±6 (so the block scale is pinned), with
    scale bytes that keep every value a finite fp32 (6·2^125 is the largest safe magnitude)."""
    n = draw(st.integers(1, 3))
    codes = draw(st.lists(st.integers(0, 15), min_size=32 * n, max_size=32 * n))
    for b in range(n):
        codes[32 * b] = draw(st.sampled_from([7, 15]))
    scales = draw(st.lists(st.integers(1, 252), min_size=n, max_size=n))
    c = torch.tensor(codes, dtype=torch.uint8).reshape(n, 16, 2)
    blocks = c[..., 0] | (c[..., 1] << 4)
    return blocks, torch.tensor(scales, dtype=torch.uint8)


@HYPOTHESIS
@given(grid_blocks())
def test_quantize_is_identity_on_grid(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    blocks, scales = data
    values = mxfp4.dequantize(blocks, scales)
    b2, s2 = mxfp4.quantize(values)
    assert torch.equal(s2, scales)
    assert torch.equal(b2, blocks)  # -0 keeps its sign bit, so even the bytes survive


@HYPOTHESIS
@given(
    st.lists(st.integers(0, 15), min_size=32, max_size=32),
    st.integers(1, 252),
)
def test_quantize_dequantize_fixed_point_on_any_grid_values(codes: list[int], scale: int) -> None:
    """Without a pinned ±6 the encoder may pick a smaller scale, but the values must survive."""
    c = torch.tensor(codes, dtype=torch.uint8).reshape(16, 2)
    blocks = (c[:, 0] | (c[:, 1] << 4))[None]
    values = mxfp4.dequantize(blocks, torch.tensor([scale], dtype=torch.uint8))
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(values)), values)


def half_step(scaled_magnitude: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid spacing around |x|/scale: steps 0.5, 1, 2 on [0,2), [2,4), [4,6]."""
    return torch.where(scaled_magnitude < 2, 0.25, torch.where(scaled_magnitude < 4, 0.5, 1.0))


finite_f32 = st.floats(
    min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32
)


@HYPOTHESIS
@given(
    st.integers(1, 3).flatmap(lambda n: st.lists(finite_f32, min_size=32 * n, max_size=32 * n)),
    st.integers(-40, 40),
)
def test_roundtrip_error_within_half_grid_step(values: list[float], exp2: int) -> None:
    x = torch.tensor(values, dtype=torch.float32).reshape(-1, 32) * 2.0**exp2
    blocks, scales = mxfp4.quantize(x)
    y = mxfp4.dequantize(blocks, scales)
    scale = torch.exp2(scales.double() - 127).reshape(-1, 1)  # [N, 1] N=blocks
    err = (y.double() - x.double()).abs()
    amax = x.double().abs().amax(dim=1, keepdim=True)
    # Scale exponent rounded up: the block max fits (no clipping) and the scale is the smallest
    # power of two that does so, unless the block is all zero.
    assert torch.all(amax <= 6 * scale * (1 + 2**-23))
    nonzero = amax[:, 0] > 0
    assert torch.all(amax[nonzero] > 3 * scale[nonzero] * (1 - 2**-23))
    bound = half_step(x.double().abs() / scale) * scale
    assert torch.all(err <= bound * (1 + 1e-6)), (err - bound).max()
    assert torch.equal(torch.signbit(y[y != 0]), torch.signbit(x[y != 0]))


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "scales"),
    [
        (torch.zeros(2, 15, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)),
        (torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8)),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8)),
        (torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8)),
        (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.float32)),
    ],
    ids=["block-15-bytes", "scale-count", "group-count", "scale-rank", "int8-blocks",
         "float-scales"],
)
def test_dequantize_rejects_bad_shapes(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="MXFP4"):
        mxfp4.dequantize(blocks, scales)


@pytest.mark.parametrize("k", [31, 33, 48, 1], ids=lambda k: f"K{k}")
def test_quantize_rejects_partial_blocks(k: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(3, k))
