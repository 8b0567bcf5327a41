"""The packed expert layout of version-2 ExecuTorch artifacts (mirrors `kernels/expert_pack.h`).

Every expert of a layer is one contiguous, page-aligned extent of a uint8 tensor [E, stride] in
`model.ptd`, so that a cache reads one expert with one `pread`:

    header (256 B) | gate_up codes | gate_up scales | gate_up bias f32 [2I]
                   | down codes    | down scales    | down bias f32 [H]

parts at 64-byte aligned offsets, codes and scales as stored (MXFP4: blocks + E8M0 scales; int4:
packed codes + fp16 scales). The header names the extent (layer, expert, its absolute offset in
the file), carries the routing profile's frequency of the expert and a checksum of the bytes
after it (the sum of the 64-bit words times 1, 3, 5, … modulo 2^64).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = 0x3150584544455353
VERSION = 1
HEADER_BYTES = 256
PART_ALIGN = 64
EXTENT_ALIGN = 4096
FORMATS = {"mxfp4": 0, "int4-g32": 1}
_HEADER = struct.Struct("<QIIqqqqqqqqqQfI")  # 104 bytes, then reserved zeros


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    fmt: str
    hidden: int
    intermediate: int

    def parts(self) -> dict[str, tuple[int, int]]:
        """part → (offset in the extent, bytes), in file order."""
        scale = 1 if self.fmt == "mxfp4" else 2
        h, i = self.hidden, self.intermediate
        sizes = {
            "gate_up_codes": 2 * i * h // 2,
            "gate_up_scales": 2 * i * (h // 32) * scale,
            "gate_up_bias": 2 * i * 4,
            "down_codes": h * i // 2,
            "down_scales": h * (i // 32) * scale,
            "down_bias": h * 4,
        }
        out, at = {}, HEADER_BYTES
        for name, size in sizes.items():
            out[name] = (at, size)
            at = _align(at + size, PART_ALIGN)
        return out

    @property
    def used(self) -> int:
        off, size = list(self.parts().values())[-1]
        return _align(off + size, PART_ALIGN)

    @property
    def stride(self) -> int:
        return _align(self.used, EXTENT_ALIGN)


def checksum(data: np.ndarray) -> int:
    """The header's checksum of uint8 `data` (a multiple of 8 bytes long)."""
    words = data.view("<u8")
    mult = np.arange(1, 2 * len(words), 2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(words * mult, dtype=np.uint64))


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


def pack_layer(
    layout: Layout,
    parts: dict[str, torch.Tensor],
    *,
    layer: int,
    layers: int,
    file_offset: int = 0,
    frequencies: list[float] | None = None,
) -> torch.Tensor:
    """uint8 [E, stride]: one layer's experts packed. `parts` maps gate_up_codes, gate_up_scales,
    gate_up_bias (float32), down_codes, down_scales, down_bias (float32) to stacked [E, …]
    tensors; `file_offset` is where the tensor starts in model.ptd."""
    e = parts["gate_up_bias"].shape[0]
    stride = layout.stride
    out = np.zeros((e, stride), dtype=np.uint8)
    spec = layout.parts()
    for name, (off, size) in spec.items():
        t = parts[name]
        if name.endswith("bias"):
            t = t.float()
        flat = _bytes(t).reshape(e, -1)
        if flat.shape[1] != size:
            raise ValueError(f"{name}: {flat.shape[1]} bytes per expert, the layout has {size}")
        out[:, off : off + size] = flat
    for x in range(e):
        freq = float(frequencies[x]) if frequencies is not None else 0.0
        head = _HEADER.pack(
            MAGIC, VERSION, FORMATS[layout.fmt], layer, layers, x, e, layout.hidden,
            layout.intermediate, stride, layout.used, file_offset + x * stride,
            checksum(out[x, HEADER_BYTES : layout.used]), freq, 0,
        )  # fmt: skip
        out[x, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    return torch.from_numpy(out)


def unpack_expert(layout: Layout, extent: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six parts of one extent (uint8 [stride]) as views: codes and scales in their stored
    shapes without the expert dimension, biases float32."""
    h, i = layout.hidden, layout.intermediate
    fp4 = layout.fmt == "mxfp4"
    shapes = {
        "gate_up_codes": ((2 * i, h // 32, 16) if fp4 else (2 * i, h // 2), torch.uint8),
        "gate_up_scales": ((2 * i, h // 32), torch.uint8 if fp4 else torch.float16),
        "gate_up_bias": ((2 * i,), torch.float32),
        "down_codes": ((h, i // 32, 16) if fp4 else (h, i // 2), torch.uint8),
        "down_scales": ((h, i // 32), torch.uint8 if fp4 else torch.float16),
        "down_bias": ((h,), torch.float32),
    }
    out = {}
    for name, (off, size) in layout.parts().items():
        shape, dtype = shapes[name]
        out[name] = extent[off : off + size].view(dtype).reshape(shape)
    return out


def read_header(extent: bytes) -> dict[str, int | float]:
    names = ("magic", "version", "format", "layer", "layers", "expert", "experts", "hidden",
             "intermediate", "stride", "used", "file_offset", "checksum", "frequency", "_")
    return dict(zip(names, _HEADER.unpack_from(extent), strict=True))  # fmt: skip
