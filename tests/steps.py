"""Driving an artifact model as generation does: a prefill, then greedy one-token steps."""

from __future__ import annotations

import torch


def greedy_steps(model, prompt: torch.Tensor, gen: int) -> torch.Tensor:
    """Logits [1 + gen, V]: of the prompt's prefill and of `gen` greedy one-token steps."""
    cache = model.new_cache()
    steps = [model(prompt, cache=cache).reshape(-1)]
    for _ in range(gen):
        steps.append(model(torch.tensor([[int(steps[-1].argmax())]]), cache=cache).reshape(-1))
    return torch.stack(steps)
