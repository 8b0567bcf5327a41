"""How well one layer's hidden state names the next layer's experts: the recall that `convert
--lookahead` relies on, measured with the reference runtime.

    python -m ossedge.benchmarks.lookahead_recall [--model DIR] [--text FILE] [--tokens 1024]

For every layer l but the last, the next layer's router is applied to layer l's post-attention
hidden state (normalized with layer l+1's norm, as the exported lookahead does) and its top-k is
compared with the top-k layer l+1 really selects. Prints the share of the real selections the
guess contains, per layer and overall, against chance (k / experts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ossedge.assets import default_model_dir
from ossedge.runtime import load_model
from ossedge.runtime.evaluate import default_text
from ossedge.runtime.model import linear, rms_norm
from ossedge.runtime.tokenizer import Tokenizer


def recall(model, ids: list[int]) -> list[float]:
    """Per layer l < L-1: the share of layer l+1's selected experts that its router, applied to
    layer l's post-attention hidden state, also puts in its top-k."""
    blocks = list(model.blocks)
    mids: dict[int, torch.Tensor] = {}

    def capture(i: int, block):
        def forward(x, pos, rope, cache):
            eps = block.attn.cfg.rms_norm_eps
            x = x + block.attn(rms_norm(x, block.attn_norm, eps), pos, rope, cache)
            mids[i] = x.detach().reshape(-1, x.shape[-1])
            return x + block.mlp(rms_norm(x, block.mlp_norm, eps))

        return forward

    for i, b in enumerate(blocks):
        b.forward = capture(i, b)
    with torch.no_grad():
        model(torch.tensor([ids]))
    k = blocks[0].mlp.cfg.num_experts_per_tok

    def top(b, h: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(h, b.mlp_norm, b.attn.cfg.rms_norm_eps)
        return linear(normed, b.mlp.router_w, b.mlp.router_b).topk(k, dim=-1).indices

    out = []
    for layer in range(len(blocks) - 1):
        nxt = blocks[layer + 1]
        actual, guess = top(nxt, mids[layer + 1]), top(nxt, mids[layer])
        out.append(float((guess[:, :, None] == actual[:, None, :]).any(-1).float().mean()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Checkpoint [default: bundled tiny]")
    p.add_argument("--text", default=None, help="Text [default: packaged held-out]")
    p.add_argument("--tokens", type=int, default=1024)
    a = p.parse_args()
    path = a.model or str(default_model_dir())
    body, label = default_text() if a.text is None else (Path(a.text).read_text("utf-8"), a.text)
    ids = Tokenizer.from_dir(path).encode(body)[: a.tokens]
    model = load_model(path, dtype=torch.float32)
    per_layer = recall(model, ids)
    cfg = model.blocks[0].mlp.cfg
    result = {"model": path, "text": label, "tokens": len(ids),
              "recall_per_layer": [round(r, 4) for r in per_layer],
              "recall": round(sum(per_layer) / len(per_layer), 4),
              "chance": cfg.num_experts_per_tok / cfg.num_local_experts}  # fmt: skip
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
