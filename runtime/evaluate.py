"""`ossedge eval`: how far a model (a quantized checkpoint, later an artifact) is from a reference,
over a text in windows. Per predicted token: the negative log-likelihood under each model, the KL
divergence KL(reference ‖ model) of the next-token distributions, and whether both rank the same
token first. Reported: perplexity of both, mean / median / p99 / max KL, top-1 agreement."""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ossedge.runtime.checkpoint import detect_layout, read_manifest

DEFAULT_TEXT_RESOURCE = "data/eval.txt"
DEFAULT_WINDOW = 256
METRICS = (
    "perplexity_model",
    "perplexity_reference",
    "kl_mean",
    "kl_median",
    "kl_p99",
    "kl_max",
    "top1_agreement",
)


def default_text() -> tuple[str, str]:
    """(text, label) of the evaluation text shipped with the package: held-out Python sources,
    never seen by the bundled model in training."""
    res = resources.files("ossedge.runtime").joinpath(DEFAULT_TEXT_RESOURCE)
    return res.read_text("utf-8"), f"ossedge/runtime/{DEFAULT_TEXT_RESOURCE} (packaged)"


def token_metrics(
    model_logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position metrics of logits [T, V] predicting `targets` [T]: nll of each, KL(ref‖model)
    (≥ 0; exactly 0 for identical logits) and top-1 agreement."""
    if model_logits.shape != ref_logits.shape or model_logits.shape[:1] != targets.shape:
        raise ValueError(
            f"logits {tuple(model_logits.shape)} and {tuple(ref_logits.shape)} and targets "
            f"{tuple(targets.shape)} do not match: expected [T, V], [T, V], [T]"
        )
    logp = torch.log_softmax(model_logits.double(), dim=-1)
    logq = torch.log_softmax(ref_logits.double(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1).clamp_(min=0)
    rows = torch.arange(targets.shape[0])
    return {
        "nll_model": -logp[rows, targets],
        "nll_reference": -logq[rows, targets],
        "kl": kl,
        "agree": (model_logits.argmax(-1) == ref_logits.argmax(-1)).double(),
    }


def summarize_metrics(m: dict[str, torch.Tensor]) -> dict[str, float]:
    kl = m["kl"].numpy()
    return {
        "perplexity_model": math.exp(float(m["nll_model"].mean())),
        "perplexity_reference": math.exp(float(m["nll_reference"].mean())),
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(m["agree"].mean()),
    }


def windows(n_tokens: int, window: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, stop) windows; a last partial window counts if it predicts one."""
    return [
        (a, min(a + window, n_tokens))
        for a in range(0, n_tokens, window)
        if min(a + window, n_tokens) - a >= 2
    ]


def evaluate(
    model: Any,
    reference: Any,
    ids: list[int],
    *,
    window: int = DEFAULT_WINDOW,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of `model` against `reference` (both `model(ids [1, T]) → logits [1, T, V]`) over
    `ids` in windows of `window` tokens; each window is scored from its own start."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    spans = windows(len(ids), window)
    if not spans:
        raise ValueError(f"the text has {len(ids)} token(s); evaluation needs at least 2")
    seq = torch.tensor(ids, dtype=torch.long)
    per: dict[str, list[torch.Tensor]] = {}
    start = time.perf_counter()
    for a, b in tqdm(spans, desc="eval", unit="window", disable=not progress):
        x = seq[a:b][None]
        lm, lr = window_logits(model, x), window_logits(reference, x)
        for k, v in token_metrics(lm, lr, seq[a + 1 : b]).items():
            per.setdefault(k, []).append(v)
    metrics = summarize_metrics({k: torch.cat(v) for k, v in per.items()})
    return {
        **metrics,
        "tokens_scored": sum(b - a - 1 for a, b in spans),
        "windows": len(spans),
        "window": window,
        "seconds": time.perf_counter() - start,
    }


def window_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Logits [T - 1, V] predicting x[0, 1:]. A torch model scores the window in one call; an
    artifact (which returns the last position only) in one-token calls from a fresh cache: the
    decode path that generation takes, cache-aware routing included."""
    if isinstance(model, torch.nn.Module):
        return model(x)[0, :-1].float()
    cache = model.new_cache()
    return torch.stack([model(x[:, i : i + 1], cache=cache)[0, -1].float()
                        for i in range(x.shape[1] - 1)])  # fmt: skip


def describe(path: str | Path, artifact: str | None = None) -> dict[str, Any]:
    """What a model path is, for the report: layout and, when quantized, the recipe. `artifact`:
    the target name when `path` is an artifact (its manifest gives the recipe)."""

    if artifact:
        recipe = json.loads((Path(path) / "manifest.json").read_text()).get("recipe")
        return {"path": str(path), "layout": f"{artifact} artifact", "recipe": recipe}
    root, layout = detect_layout(path)
    out: dict[str, Any] = {"path": str(path), "layout": layout}
    if layout == "quantized":
        m = read_manifest(root)
        out["recipe"] = m["recipe"].get("name")
        out["bytes"] = m.get("total_bytes")
    return out
