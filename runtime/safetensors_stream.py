"""A streaming safetensors writer: the header is computed from shapes, then tensors are written
chunk by chunk, so a multi-GB shard never has to be held in memory (safetensors' own `save_file`
takes a dict of whole tensors). The files are read back with the safetensors library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}


def write_streaming(
    path: Path,
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
    chunks: Callable[[str], Iterable[torch.Tensor]],
    *,
    metadata: dict[str, str] | None = None,
    digest=None,
) -> int:
    """Write `tensors` (name, shape, dtype) to `path`, pulling each one's bytes from `chunks(name)`.
    `digest` (a hashlib object) is fed every byte of the file as it is written.

    Returns the number of data bytes written. Raises ValueError if a tensor's chunks do not add up.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        n = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    def write(f, data) -> None:
        f.write(data)
        if digest is not None:
            digest.update(data)

    with open(path, "wb") as f:
        write(f, len(raw).to_bytes(8, "little"))
        write(f, raw)
        for name, shape, dtype in tensors:
            want = dtype.itemsize * math.prod(shape)
            got = 0
            for chunk in chunks(name):
                if chunk.dtype != dtype:
                    raise ValueError(f"{name}: chunk dtype {chunk.dtype}, expected {dtype}")
                data = chunk.contiguous().view(torch.uint8).numpy()
                write(f, memoryview(data))
                got += data.nbytes
            if got != want:
                raise ValueError(f"{name}: wrote {got} bytes, expected {want}")
    return offset
