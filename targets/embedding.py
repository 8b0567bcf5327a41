"""The embedding table as a host-read file, for targets whose programs take hidden states (Core
ML, Core AI): `embedding.safetensors` in the recipe's format, read row by row (memory-mapped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ossedge.quantize.qtensor import QTensor

EMBEDDING = "embedding.safetensors"


def write_embedding(source, path: Path) -> dict[str, Any]:
    """The embedding table as safetensors, in its recipe format (parts of a QTensor, or fp16);
    returns its manifest entry."""
    w = source.weight("model.embed_tokens.weight")
    if isinstance(w, QTensor):
        tensors = {f"embedding.{p}": t.contiguous() for p, t in w.parts.items()}
        fmt = w.fmt
    else:
        tensors = {"embedding": w.to(torch.float16).contiguous()}
        fmt = "fp16"
    save_file(tensors, str(path))
    return {"file": path.name, "format": fmt, "shape": list(w.shape)}


class EmbeddingFile:
    """The rows of an artifact's embedding file, as its manifest entry (`write_embedding`)
    describes it."""

    def __init__(self, root: Path, entry: dict[str, Any]) -> None:
        self._file = safe_open(str(root / entry["file"]), "pt")
        self._fmt, self._shape = entry["format"], tuple(entry["shape"])

    def rows(self, tokens: list[int]) -> np.ndarray:
        """fp32 [len(tokens), H], the rows of `tokens` (consecutive ids read as one slice)."""
        return np.concatenate([self.row(t) for t in tokens]) if tokens else np.zeros(
            (0, self._shape[1]), np.float32)  # fmt: skip

    def row(self, token: int) -> np.ndarray:
        """fp32 [1, H] embedding row of `token`."""
        if not 0 <= token < self._shape[0]:
            raise ValueError(f"token id {token} outside the vocabulary of {self._shape[0]}")
        f = self._file
        if self._fmt == "fp16":
            row = f.get_slice("embedding")[token : token + 1].float()
        else:
            parts = {k.split(".", 1)[1]: f.get_slice(k)[token : token + 1] for k in f.keys()}
            row = QTensor(self._fmt, (1, self._shape[1]), parts).dequantize(torch.float32)
        return row.numpy().astype(np.float32).reshape(1, -1)
