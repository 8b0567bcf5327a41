"""OpenAI's openai-harmony library as the oracle of harmony rendering, offline: its o200k_base
encoding rebuilt from quicktok-v1's vocabulary (u32 count, then per token u16 length, the bytes,
u32 rank), checked against tiktoken's published sha256."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from importlib import resources
from pathlib import Path

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def write_o200k_base(folder: Path) -> Path:
    """folder/o200k_base.tiktoken (base64 token, space, rank per line), as tiktoken ships it."""
    data = resources.files("quicktok").joinpath("data/o200k.vocab").read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    at, ranked = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, at)
        token = data[at + 2 : at + 2 + n]
        (rank,) = struct.unpack_from("<I", data, at + 2 + n)
        ranked.append((rank, token))
        at += 6 + n
    text = "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in sorted(ranked)).encode()
    if hashlib.sha256(text).hexdigest() != O200K_SHA256:
        raise RuntimeError("quicktok's o200k vocabulary does not rebuild tiktoken's o200k_base")
    path = folder / "o200k_base.tiktoken"
    path.write_bytes(text)
    return path


def harmony_encoding(folder: Path):
    """openai-harmony's gpt-oss encoding, loaded from `folder` (no network)."""
    write_o200k_base(folder)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    import openai_harmony as oh

    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
