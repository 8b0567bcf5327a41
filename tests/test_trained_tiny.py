"""The bundled trained tiny gpt-oss: a valid checkpoint in the released layout that has really
learned its corpus (held-out perplexity far below a unigram model), and the default model."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ossedge.assets import default_model_dir
from ossedge.runtime import load_model
from ossedge.runtime.checkpoint import open_checkpoint
from ossedge.runtime.evaluate import default_text
from ossedge.runtime.tokenizer import Tokenizer, special_ids

MODEL = default_model_dir()
WINDOW = 256


def _train_script():
    """assets/train.py (for its split function), loaded from the source tree."""
    path = Path(__file__).resolve().parents[1] / "assets" / "train.py"
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(MODEL)


def test_is_a_valid_gpt_oss_checkpoint_under_20_mb(tok: Tokenizer) -> None:
    ckpt = open_checkpoint(MODEL)
    assert ckpt.layout == "hf" and ckpt.expert_format == "mxfp4"
    cfg = ckpt.config
    assert {cfg.is_sliding(n) for n in range(cfg.num_hidden_layers)} == {True, False}
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert len(special_ids(tok)) == 9 and tok.vocab_size == cfg.vocab_size
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 20e6


def _perplexity(model, ids: list[int]) -> float:
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, WINDOW):
        x = torch.tensor(ids[a : a + WINDOW + 1])
        if len(x) < 2:
            break
        nll += float(F.cross_entropy(model(x[None, :-1])[0], x[1:], reduction="sum"))
        n += len(x) - 1
    return math.exp(nll / n)


def test_heldout_perplexity_beats_a_unigram_model(model, tok: Tokenizer) -> None:
    ids = tok.encode(default_text()[0])
    ppl = _perplexity(model, ids)
    # The unigram model is fit on the held-out text itself: optimistic, so the test is strict.
    counts = torch.bincount(torch.tensor(ids), minlength=tok.vocab_size).double() + 1
    unigram = math.exp(-float((counts / counts.sum()).log()[torch.tensor(ids)].mean()))
    assert ppl < 0.5 * unigram, f"held-out perplexity {ppl:.2f} vs unigram {unigram:.2f}"
    recorded = json.loads((MODEL / "training.json").read_text())["heldout_perplexity"]
    assert ppl == pytest.approx(recorded, rel=0.01), "training.json is stale for this model"


def test_eval_text_is_held_out() -> None:
    split = _train_script().is_heldout
    files = re.findall(r"^# file: (\S+)$", default_text()[0], flags=re.MULTILINE)
    assert len(files) >= 3
    assert all(split(f) for f in files), [f for f in files if not split(f)]


def test_greedy_code_completion(model, tok: Tokenizer) -> None:
    from ossedge.runtime.generate import generate
    from ossedge.runtime.sampling import Sampler

    greedy = Sampler(temperature=0)
    r = generate(model, tok, tok.encode("def "), max_new_tokens=24, sampler=greedy, stop_ids=[])
    text = tok.decode(r.ids)
    assert re.search(r"[A-Za-z_]{3,}", text), text


def test_generate_uses_it_by_default() -> None:
    from clitools import run

    p = run("generate", "--prompt", "import ", "--max-new-tokens", "8", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("import ") and len(p.stdout.strip()) > len("import")
