"""OpenAI's openai-harmony library as the oracle of harmony rendering, offline: its o200k_base
encoding is the one ossedge rebuilds from quicktok-v1's vocabulary, checked against tiktoken's
published sha256 (`ossedge.runtime.tokenizer_o200k`)."""

from __future__ import annotations

import os
from pathlib import Path

from ossedge.runtime.tokenizer_o200k import O200K_SHA256, write_o200k_base

__all__ = ["O200K_SHA256", "harmony_encoding", "write_o200k_base"]


def harmony_encoding(folder: Path):
    """openai-harmony's gpt-oss encoding, loaded from `folder` (no network)."""
    write_o200k_base(folder)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    import openai_harmony as oh

    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
