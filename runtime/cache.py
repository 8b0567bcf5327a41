"""KV caches: full-attention layers keep every position (grown on demand up to the context limit);
sliding-window layers keep a ring buffer of `sliding_window` slots tagged with their positions."""

from __future__ import annotations

import torch

from ossedge.runtime.config import GptOssConfig
from ossedge.runtime.errors import OssedgeError


class FullLayerCache:
    def __init__(self, b: int, kv: int, d: int, *, dtype: torch.dtype, capacity: int) -> None:
        self.k = torch.zeros(b, kv, capacity, d, dtype=dtype)  # [B, KV, S, D]
        self.v = torch.zeros(b, kv, capacity, d, dtype=dtype)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, *, limit: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, T, D] at positions `pos` [T]; return all keys, values, positions."""
        end = int(pos[-1]) + 1
        if end > self.k.shape[2]:
            cap = min(max(end, 2 * self.k.shape[2]), limit)
            grow = cap - self.k.shape[2]
            pad = (0, 0, 0, grow)
            self.k = torch.nn.functional.pad(self.k, pad)
            self.v = torch.nn.functional.pad(self.v, pad)
        start = int(pos[0])
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end], torch.arange(end)


class RingLayerCache:
    def __init__(self, b: int, kv: int, d: int, *, dtype: torch.dtype, window: int) -> None:
        self.k = torch.zeros(b, kv, window, d, dtype=dtype)  # [B, KV, W, D]
        self.v = torch.zeros(b, kv, window, d, dtype=dtype)
        self.slot_pos = torch.full((window,), -1, dtype=torch.long)  # -1: empty slot
        self.window = window

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, *, limit: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys visible to the new tokens: the ring's old entries plus the new ones (the mask
        trims them to the window); then the newest `window` tokens overwrite their slots."""
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_pos = torch.cat([self.slot_pos, pos])
        keep = min(k.shape[2], self.window)
        slots = pos[-keep:] % self.window
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.slot_pos[slots] = pos[-keep:]
        return keys, values, key_pos


class KVCache:
    """Per-layer caches plus the number of positions already consumed."""

    def __init__(
        self,
        cfg: GptOssConfig,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        max_context: int | None = None,
    ) -> None:
        self.max_context = min(max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.position = 0
        kv, d = cfg.num_key_value_heads, cfg.head_dim
        self.layers: list[FullLayerCache | RingLayerCache] = [
            RingLayerCache(batch_size, kv, d, dtype=dtype, window=cfg.sliding_window)
            if cfg.is_sliding(n)
            else FullLayerCache(batch_size, kv, d, dtype=dtype, capacity=min(256, self.max_context))
            for n in range(cfg.num_hidden_layers)
        ]

    def positions(self, t: int) -> torch.Tensor:
        if self.position + t > self.max_context:
            raise OssedgeError(
                f"context full: {self.position} + {t} tokens exceed the context limit of "
                f"{self.max_context}; start a new conversation or raise max_context"
            )
        return torch.arange(self.position, self.position + t)

    def advance_(self, t: int) -> None:
        self.position += t
