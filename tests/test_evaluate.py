"""`ossedge eval`: metrics checked on hand-made logits, windows, and the command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from clitools import invoke, run

from ossedge.runtime.evaluate import (
    METRICS,
    default_text,
    evaluate,
    summarize_metrics,
    token_metrics,
    windows,
)
from ossedge.runtime.quantized import quantize_checkpoint


def test_identical_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g)
    targets = torch.randint(0, 11, (7,), generator=g)
    s = summarize_metrics(token_metrics(logits, logits.clone(), targets))
    assert tuple(s) == METRICS
    assert s["kl_mean"] == 0.0 and s["kl_max"] == 0.0
    assert s["top1_agreement"] == 1.0
    assert s["perplexity_model"] == s["perplexity_reference"]


def test_hand_computed_values() -> None:
    # reference q = (3/4, 1/4), model p = (1/2, 1/2); the target is token 1
    ref = torch.tensor([[math.log(3.0), 0.0]])
    model = torch.tensor([[0.0, 0.0]])
    m = token_metrics(model, ref, torch.tensor([1]))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert m["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert m["nll_model"].item() == pytest.approx(math.log(2))
    assert m["nll_reference"].item() == pytest.approx(math.log(4))
    # argmax of [0, 0] is token 0, as the reference's: they agree
    assert m["agree"].item() == 1.0
    m = token_metrics(torch.tensor([[0.0, 1.0]]), ref, torch.tensor([1]))
    assert m["agree"].item() == 0.0


def test_perplexity_is_exp_mean_nll() -> None:
    # uniform over 8 tokens: perplexity 8 whatever the targets
    logits = torch.zeros(5, 8)
    s = summarize_metrics(token_metrics(logits, logits, torch.tensor([0, 1, 2, 3, 7])))
    assert s["perplexity_model"] == pytest.approx(8.0)


def test_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        token_metrics(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))


def test_windows() -> None:
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail predicts nothing
    assert windows(1, 4) == []


def test_evaluate_scores_each_window_from_its_start(tiny_ckpt: Path) -> None:
    from ossedge.runtime.model import load_model

    m = load_model(tiny_ckpt)
    ids = list(range(3, 3 + 40))
    r = evaluate(m, m, ids, window=16)
    assert r["windows"] == 3 and r["tokens_scored"] == 15 + 15 + 7
    assert r["kl_max"] == 0.0 and r["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(m, m, [5], window=16)


def test_default_text_ships_with_the_package() -> None:
    text, label = default_text()
    assert len(text) > 10_000 and "packaged" in label


@pytest.fixture(scope="module")
def mobile(tiny_ckpt: Path, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("e") / "m", recipe="mobile")


def test_cli_eval_json(mobile: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    p = run(
        "eval",
        str(mobile),
        "--reference",
        str(tiny_ckpt),
        "--text",
        str(text),
        "--window",
        "64",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in (*METRICS, "tokens_scored", "windows"):
        assert key in r
    assert r["model"]["recipe"] == "mobile" and r["reference"]["layout"] == "hf"
    assert r["kl_mean"] > 0 and 0 < r["top1_agreement"] <= 1
    # against itself: nothing differs
    p = run("eval", str(tiny_ckpt), "--reference", str(tiny_ckpt), "--text", str(text), "--json")
    same = json.loads(p.stdout)
    assert same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0


def test_cli_eval_human_output(mobile: Path, tiny_ckpt: Path) -> None:
    p = run("eval", str(mobile), "--reference", str(tiny_ckpt), "--max-tokens", "300")
    assert p.returncode == 0, p.stderr
    assert "perplexity" in p.stdout and "top-1 agreement" in p.stdout
    assert "recipe mobile" in p.stdout and "packaged" in p.stdout


def test_cli_eval_bad_text(mobile: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    p = invoke("eval", str(mobile), "--reference", str(tiny_ckpt), "--text", str(tmp_path / "no.txt"))
    assert p.returncode == 2 and "cannot read" in p.stderr and "Traceback" not in p.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    p = invoke("eval", str(mobile), "--reference", str(tiny_ckpt), "--text", str(empty))
    assert p.returncode == 2 and "fewer than 2 tokens" in p.stderr


def test_cli_eval_refuses_different_tokenizers(synth, tiny_config, mobile: Path) -> None:
    other = synth(config=tiny_config(vocab_size=600))
    p = run("eval", str(mobile), "--reference", str(other), "--max-tokens", "50")
    assert p.returncode == 1 and "tokenizer" in p.stderr and "Traceback" not in p.stderr
