"""Next-token sampling: greedy at temperature 0, otherwise temperature, top-k, then top-p."""

from __future__ import annotations

import math

import torch


class Sampler:
    """`sample(logits[V]) -> id`. A seeded sampler draws the same ids for the same logits."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number, got {temperature!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):  # fmt: skip
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = None if top_p is None else float(top_p)
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
            f"seed={self.seed})"
        )

    def sample(self, logits: torch.Tensor) -> int:
        """One id from `logits` [V] (or [1, V])."""
        if logits.dim() == 2 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.dim() != 1 or logits.numel() == 0:
            raise ValueError(f"logits must have shape [V], got {tuple(logits.shape)}")
        logits = logits.detach().to("cpu", torch.float32)
        if torch.isnan(logits).any():
            raise ValueError("logits contain NaN; the model produced invalid numbers")
        if self.greedy:
            return int(torch.argmax(logits))
        ids = None  # original ids of the kept candidates, None while all V are kept
        scores = logits / self.temperature
        if self.top_k is not None and self.top_k < scores.numel():
            scores, ids = torch.topk(scores, self.top_k)  # sorted, descending
        if self.top_p is not None and self.top_p < 1:
            if ids is None:
                scores, ids = torch.sort(scores, descending=True, stable=True)
            probs = torch.softmax(scores, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of the higher-ranked candidates
            keep = before < self.top_p
            keep[0] = True
            scores, ids = scores[keep], ids[keep]
        probs = torch.softmax(scores, dim=-1)
        if not torch.isfinite(probs).all() or probs.sum() <= 0:
            raise ValueError("logits give no valid probabilities (all -inf?)")
        pick = int(torch.multinomial(probs, 1, generator=self.generator))
        return pick if ids is None else int(ids[pick])
