"""ExecuTorch `.ptd` data files (the FlatTensor format): read the index, and rewrite a file with
some named tensors replaced, streaming — no tensor is held in memory beyond one chunk.

Layout: an 8-byte flatbuffer prologue, an extended header (magic "FH01": flatbuffer offset and
size, segment base offset, segment data size), the FlatTensor flatbuffer (segments = offset/size
relative to the segment base; named data = key → segment index + tensor layout), then segments.
Every segment written here starts on a page boundary, so any tensor can be memory-mapped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ossedge.runtime.errors import OssedgeError

ALIGN = 4096
CHUNK = 64 << 20
_HEADER_AT = 8  # the extended header follows the flatbuffer's root offset and identifier


class PtdError(OssedgeError):
    """A .ptd data file is malformed or does not match what is written into it."""


@dataclass(frozen=True)
class Index:
    flat_tensor: object  # executorch FlatTensor dataclass
    segment_base: int

    def entries(self) -> dict[str, tuple[int, int]]:
        """key → (absolute offset, size) in the file."""
        segs = self.flat_tensor.segments
        return {
            nd.key: (self.segment_base + segs[nd.segment_index].offset,
                     segs[nd.segment_index].size)
            for nd in self.flat_tensor.named_data
        }  # fmt: skip


def read_index(path: str | os.PathLike) -> Index:
    """The FlatTensor index of a .ptd (reads only the header and flatbuffer)."""
    from executorch.extension.flat_tensor.serialize.serialize import (
        FlatTensorHeader,
        _deserialize_to_flat_tensor,
    )

    with open(path, "rb") as f:
        head = f.read(_HEADER_AT + FlatTensorHeader.EXPECTED_LENGTH)
        try:
            header = FlatTensorHeader.from_bytes(head[_HEADER_AT:])
        except ValueError:
            header = None
        if header is None or not header.is_valid():
            raise PtdError(f"{path}: not an ExecuTorch .ptd data file (bad header)")
        size = os.fstat(f.fileno()).st_size
        if header.segment_base_offset + header.segment_data_size > size:
            raise PtdError(
                f"{path}: truncated ({size} bytes, the header promises "
                f"{header.segment_base_offset + header.segment_data_size}); convert again"
            )
        f.seek(0)
        flatbuffer = f.read(header.flatbuffer_offset + header.flatbuffer_size)
    return Index(_deserialize_to_flat_tensor(flatbuffer), header.segment_base_offset)


def rewrite(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    replace: dict[str, Callable[[int], torch.Tensor]],
    *,
    progress: bool = False,
) -> None:
    """Copy `src` to `dst`, giving every key in `replace` its own segment filled with the tensor
    its thunk returns when called with the segment's absolute offset in `dst` (same byte size as
    the placeholder). Other segments are copied (shared segments stay shared). The thunks are
    called one at a time, while writing."""
    from executorch.exir._serialize._program import _insert_flatbuffer_header
    from executorch.exir._serialize.padding import aligned_size, pad_to
    from executorch.extension.flat_tensor.serialize.flat_tensor_schema import (
        DataSegment,
        FlatTensor,
        NamedData,
    )
    from executorch.extension.flat_tensor.serialize.serialize import (
        FlatTensorHeader,
        _serialize_to_flatbuffer,
    )

    index = read_index(src)
    ft = index.flat_tensor
    missing = sorted(set(replace) - {nd.key for nd in ft.named_data})
    if missing:
        raise PtdError(f"{src}: no constant named {missing[0]} to fill ({len(missing)} missing)")
    # Plan the new segments: (source, size) where source is an old segment index or a key.
    plan: list[tuple[int | str, int]] = []
    old_to_new: dict[int, int] = {}
    named = []
    for nd in ft.named_data:
        size = ft.segments[nd.segment_index].size
        if nd.key in replace:
            seg = len(plan)
            plan.append((nd.key, size))
        else:
            seg = old_to_new.get(nd.segment_index)
            if seg is None:
                seg = old_to_new[nd.segment_index] = len(plan)
                plan.append((nd.segment_index, size))
        named.append(NamedData(key=nd.key, segment_index=seg, tensor_layout=nd.tensor_layout))
    segments, end = [], 0
    for _, size in plan:
        offset = aligned_size(end, ALIGN)
        segments.append(DataSegment(offset=offset, size=size))
        end = offset + size
    flatbuffer = bytes(_serialize_to_flatbuffer(FlatTensor(ft.version, segments, named)))
    header_len = aligned_size(FlatTensorHeader.EXPECTED_LENGTH, 16)
    base = aligned_size(header_len + len(flatbuffer), ALIGN)
    header = FlatTensorHeader(
        flatbuffer_offset=header_len,
        flatbuffer_size=len(flatbuffer),
        segment_base_offset=base,
        segment_data_size=end,
    ).to_bytes()
    prologue = _insert_flatbuffer_header(flatbuffer, r"FT[0-9a-zA-Z][0-9a-zA-Z]",
                                         pad_to(header, header_len))  # fmt: skip
    total = base + end
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="write model.ptd", disable=not progress)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(pad_to(prologue, base))
        bar.update(base)
        for (what, size), seg in zip(plan, segments, strict=True):
            fout.seek(base + seg.offset)
            if isinstance(what, str):
                _write_tensor(fout, replace[what](base + seg.offset), size, what, bar)
            else:
                fin.seek(index.segment_base + ft.segments[what].offset)
                left = size
                while left:
                    chunk = fin.read(min(CHUNK, left))
                    if not chunk:
                        raise PtdError(f"{src}: ends inside segment {what}")
                    fout.write(chunk)
                    left -= len(chunk)
                    bar.update(len(chunk))
        fout.truncate(total)
        fout.flush()
        os.fsync(fout.fileno())
    bar.close()


def _write_tensor(f, t: torch.Tensor, size: int, key: str, bar) -> None:
    if t.numel() * t.element_size() != size:
        raise PtdError(
            f"{key}: {t.numel() * t.element_size()} bytes to write where the program expects "
            f"{size}; the checkpoint does not match the exported model"
        )
    flat = t.contiguous().view(torch.uint8).reshape(-1)
    for a in range(0, size, CHUNK):
        part = flat[a : a + CHUNK]
        f.write(memoryview(part.numpy()))
        bar.update(part.numel())
