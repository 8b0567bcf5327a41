"""Quantized tensors as an ossedge quantized checkpoint stores them, and their decoding.

A logical weight [..., N, K] (N outputs, K inputs; experts are [E, N, K]) is stored as parts:

  format     parts (stored names)                          part shapes and dtypes
  mxfp4      {name}_blocks, {name}_scales  (HF's names)    u8 [..., N, K/32, 16], u8 [..., N, K/32]
  int8-ch    {name}.q, {name}.scale                        i8 [..., N, K],        f32 [..., N]
  int4-g32   {name}.q, {name}.scale                        u8 [..., N, K/2],      f16 [..., N, K/32]

int4 codes are symmetric in [-8, 7], stored offset by 8, element 2k in the low nibble; the scale is
fp16 (what XNNPACK and Core ML consume) and the codes are computed against the fp16 scale. Sizes
follow from shapes alone (`part_specs`), so a recipe's bytes on the 20b are known without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ossedge.quantize import intq, mxfp4

INT4_GROUP = 32
INT4_SCALE_DTYPE = torch.float16
QUANTIZED_FORMATS = ("mxfp4", "int8-ch", "int4-g32")


def part_specs(fmt: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """part → (shape, dtype) of a logical weight `shape` [..., N, K] stored in `fmt`."""
    *lead, n, k = shape
    rows = (*lead, n)
    if fmt == "mxfp4":
        if k % mxfp4.BLOCK:
            raise ValueError(f"MXFP4 needs inputs in blocks of 32; {list(shape)} has {k}")
        g = k // mxfp4.BLOCK
        return {
            "blocks": ((*rows, g, mxfp4.BYTES_PER_BLOCK), torch.uint8),
            "scales": ((*rows, g), torch.uint8),
        }
    if fmt == "int8-ch":
        return {"q": ((*rows, k), torch.int8), "scale": (rows, torch.float32)}
    if fmt == "int4-g32":
        if k % INT4_GROUP:
            raise ValueError(f"int4 needs inputs in groups of {INT4_GROUP}; {list(shape)} has {k}")
        return {
            "q": ((*rows, k // 2), torch.uint8),
            "scale": ((*rows, k // INT4_GROUP), INT4_SCALE_DTYPE),
        }
    raise ValueError(f"unknown quantized format {fmt!r}; expected one of {QUANTIZED_FORMATS}")


def part_name(name: str, fmt: str, part: str) -> str:
    """Stored tensor name of one part: MXFP4 keeps HF's `_blocks`/`_scales` suffixes."""
    return f"{name}_{part}" if fmt == "mxfp4" else f"{name}.{part}"


def stored_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    return sum(math.prod(s) * d.itemsize for s, d in part_specs(fmt, shape).values())


def encode(fmt: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize a float weight [..., N, K] to its parts (rows are processed in chunks)."""
    specs = part_specs(fmt, tuple(w.shape))
    k = w.shape[-1]
    if fmt == "mxfp4":
        blocks, scales = mxfp4.quantize(w)
        return {"blocks": blocks, "scales": scales}
    flat = w.reshape(-1, k)
    if fmt == "int8-ch":
        q, scale = intq.quantize_int8(flat)
        parts = {"q": q, "scale": scale}
    else:
        packed = intq.quantize_int4(flat, group=INT4_GROUP, scale_dtype=INT4_SCALE_DTYPE)
        parts = {"q": packed.packed, "scale": packed.scale}
    return {p: t.reshape(specs[p][0]) for p, t in parts.items()}


@dataclass(frozen=True)
class QTensor:
    """A quantized logical weight [..., N, K]; parts are usually memory-mapped from the file.
    `dequantize` decodes all of it, or one leading index (an expert); `rows` decodes selected
    rows of a 2-D weight (an embedding lookup, or a chunk of the unembedding)."""

    fmt: str
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        specs = part_specs(self.fmt, self.shape)
        for p, (shape, dtype) in specs.items():
            t = self.parts.get(p)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                raise ValueError(
                    f"{self.fmt} part {p!r} of a {list(self.shape)} weight is {got}; expected "
                    f"{dtype} {list(shape)}"
                )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def __getitem__(self, index: int | slice | torch.Tensor) -> QTensor:
        """Index the leading dimension (an expert of [E, N, K], or rows of [N, K])."""
        parts = {p: t[index] for p, t in self.parts.items()}
        first = next(iter(self.parts))  # its dims after the row dims [..., N] stay as they are
        trailing = self.parts[first].dim() - (len(self.shape) - 1)
        lead = parts[first].shape[: parts[first].dim() - trailing]
        return QTensor(self.fmt, (*lead, self.shape[-1]), parts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k = self.shape[-1]
        p = self.parts
        if self.fmt == "mxfp4":
            return mxfp4.dequantize(p["blocks"], p["scales"], dtype=dtype)
        if self.fmt == "int8-ch":
            out = intq.dequantize_int8(p["q"].reshape(-1, k), p["scale"].reshape(-1), dtype=dtype)
        else:
            packed = intq.Int4(
                p["q"].reshape(-1, k // 2),
                p["scale"].reshape(-1, k // INT4_GROUP),
                None,
                INT4_GROUP,
            )
            out = intq.dequantize_int4(packed, dtype=dtype)
        return out.reshape(self.shape)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` (any shape) of a 2-D weight, decoded: [*ids.shape, K]."""
        if len(self.shape) != 2:
            raise ValueError(f"rows() needs a 2-D weight, this one is {list(self.shape)}")
        return self[ids.reshape(-1)].dequantize(dtype).reshape(*ids.shape, self.shape[-1])
