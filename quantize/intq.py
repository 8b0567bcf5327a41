"""Integer codecs: int8 per-output-channel symmetric, and int4 group-wise (symmetric or
asymmetric) with two 4-bit values per byte (element 2k in the low nibble, as MXFP4).

Symmetric int4 stores codes in [-8, 7] (offset by 8 in the nibble) with scale = amax / 7, so
quantizing values already on the grid returns the same codes (torchao's amax / 7.5 does not);
the stored form, value = code · scale, is what any int4 lowering consumes. Asymmetric int4 uses
scale = (max - min) / 15 and an integer zero point in [0, 15]. Work is chunked by rows: a 201088 × 2880 tensor never needs
more than a few tens of MB of temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUPS = (32, 64, 128)
CHUNK_ELEMENTS = 1 << 22
_TINY = torch.finfo(torch.float32).tiny


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{what} needs a 2-D float weight [out, in], got {w.dtype} {tuple(w.shape)}")


# -- int8 activations per block of 32 ----------------------------------------------------------

ACT_BLOCK = 32
ACTIVATIONS = ("float", "int8-b32")  # how an expert kernel takes its inputs


def round_activations_int8(v: torch.Tensor) -> torch.Tensor:
    """v float32 [..., N] (N a multiple of 32) rounded to int8 per block of 32 and dequantized, with
    the native MoE kernels' arithmetic: q = round(v · (127 / amax)) (half to even), value
    q · (amax / 127). What `ossedge::moe_*` does to both expert inputs (activations "int8-b32")."""
    b = v.reshape(*v.shape[:-1], -1, ACT_BLOCK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv).clamp(-127, 127)
    return (q * (amax / 127.0)).reshape(v.shape)


LINEAR_ACTIVATIONS = ("float", "int8-b32", "int8-asym-token")  # how a backend's linears take theirs


def round_activations_int8_asym_token(v: torch.Tensor) -> torch.Tensor:
    """v float32 [..., K] rounded to int8 per row with a zero point and dequantized, as XNNPACK's
    dynamic int8 linears (QD8) do: the range [min(v, 0), max(v, 0)] spread over -128..127, the
    zero point nudged to an integer, q = round(v · 255 / range) + zero point (half to even).
    A range so small (< ~7.5e-37) that 255 / range overflows is taken as none (scale 1, the row
    rounds to zeros): there XNNPACK's own parameters are infinite and its result undefined."""
    lo = v.amin(-1, keepdim=True).clamp(max=0)
    hi = v.amax(-1, keepdim=True).clamp(min=0)
    scale = 255.0 / (hi - lo)
    scale = torch.where((hi > lo) & scale.isfinite(), scale, torch.ones_like(hi))
    rmin, rmax = lo * scale, hi * scale
    zero = torch.where((rmin - 128) + (rmax + 127) > 0, -128 - rmin, 127 - rmax)
    zero = torch.round(zero.clamp(-128, 127))
    q = (torch.round(v * scale) + zero).clamp(-128, 127)
    return (q - zero) * (1.0 / scale)


def round_scales_bf16(scale: torch.Tensor) -> torch.Tensor:
    """Group scales as XNNPACK's int4 kernels (QB4W) hold them: rounded to bfloat16."""
    return scale.to(torch.bfloat16).to(scale.dtype)


# -- int8 per output channel ------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (codes int8 [N, K] in [-127, 127], scale fp32 [N]); w ≈ codes · scale."""
    _check_2d(w, "int8 quantization")
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    for a, b in _row_chunks(n, k):
        x = w[a:b].to(torch.float32)
        s = (x.abs().amax(dim=1) / 127).clamp_(min=_TINY)  # [n]
        codes[a:b] = torch.round(x / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[a:b] = s
    return codes, scale


def dequantize_int8(
    codes: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    if codes.dtype != torch.int8 or scale.shape != codes.shape[:1]:
        raise ValueError(f"int8 codes {codes.dtype} {tuple(codes.shape)} and scale "
                         f"{tuple(scale.shape)} do not match: expected int8 [N, K] and [N]")
    return (codes.to(torch.float32) * scale[:, None].to(torch.float32)).to(dtype)


# -- int4 group-wise --------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4:
    """Packed int4 weights [N, K]: `packed` uint8 [N, K/2], `scale` fp32 [N, K/G], and for the
    asymmetric form `zero` uint8 [N, K/G] (None when symmetric)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] [..., K] (K even) → bytes [..., K/2]; element 2k in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing 4-bit codes needs an even last dimension, got {codes.shape}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: bytes [..., K/2] → uint8 codes [..., K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def _stored_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as they will be stored (e.g. fp16), back in fp32: codes are computed against the
    stored scale, so decoding reproduces exactly what the encoder rounded to."""
    if dtype == torch.float32:
        return s
    info = torch.finfo(dtype)
    return s.clamp(min=info.tiny, max=info.max).to(dtype).to(torch.float32)


def quantize_int4(
    w: torch.Tensor,
    *,
    group: int = 32,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
) -> Int4:
    """w [N, K] → int4 with one scale (and zero point) per `group` consecutive inputs. Scales are
    kept in `scale_dtype` (fp16 is what XNNPACK and Core ML consume)."""
    _check_2d(w, "int4 quantization")
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group}")
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 group {group} does not divide the input dimension {k}")
    g = k // group
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale = torch.empty(n, g, dtype=scale_dtype)
    zero = None if symmetric else torch.empty(n, g, dtype=torch.uint8)
    for a, b in _row_chunks(n, k):
        x = w[a:b].to(torch.float32).reshape(b - a, g, group)  # [n, G, group]
        if symmetric:
            s = _stored_scale((x.abs().amax(dim=2) / 7).clamp_(min=_TINY), scale_dtype)
            q = torch.round(x / s[..., None]).clamp_(-8, 7) + 8  # offset binary in the nibble
        else:
            lo = x.amin(dim=2).clamp(max=0)  # the grid always holds 0 exactly
            hi = x.amax(dim=2).clamp(min=0)
            s = _stored_scale(((hi - lo) / 15).clamp_(min=_TINY), scale_dtype)
            z = torch.round(-lo / s).clamp_(0, 15)
            q = (torch.round(x / s[..., None]) + z[..., None]).clamp_(0, 15)
            zero[a:b] = z.to(torch.uint8)
        packed[a:b] = pack_nibbles(q.to(torch.uint8).reshape(b - a, k))
        scale[a:b] = s
    return Int4(packed, scale, zero, group)


def dequantize_int4(q: Int4, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    g = k // q.group
    if q.scale.shape != (n, g) or (q.zero is not None and q.zero.shape != (n, g)):
        raise ValueError(f"int4 scale {tuple(q.scale.shape)} does not match weights [{n}, {k}] "
                         f"with group {q.group}")
    out = torch.empty(n, k, dtype=dtype)
    for a, b in _row_chunks(n, k):
        codes = unpack_nibbles(q.packed[a:b]).to(torch.float32).reshape(b - a, g, q.group)
        offset = 8.0 if q.zero is None else q.zero[a:b].to(torch.float32)[..., None]
        scale = q.scale[a:b, :, None].to(torch.float32)
        out[a:b] = ((codes - offset) * scale).reshape(b - a, k).to(dtype)
    return out
