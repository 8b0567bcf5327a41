"""`convert --lookahead`: each layer's MoE op also gets the next layer's router applied to its own
hidden state and the next layer's packed experts, and the expert cache starts reading those
experts early. Same logits as without, bit for bit; the hints are counted and mostly used."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from clitools import run
from steps import greedy_steps

from ossedge.assets import default_model_dir
from ossedge.runtime.executorch import ExecuTorchModel
from ossedge.runtime.expert_cache import store_of

GEN = 8


@pytest.fixture(scope="module")
def ahead_artifact(tmp_path_factory) -> Path:
    """The bundled model converted as `et_artifact` is, with --lookahead."""
    from ossedge.targets.executorch.export import convert

    out = tmp_path_factory.mktemp("ahead") / "tiny-ahead"
    convert(default_model_dir(), out, max_context=2048, verify_tokens=0, lookahead=True)
    return out


def _stride(artifact: Path) -> int:
    return store_of(json.loads((artifact / "manifest.json").read_text())).stride


def test_manifest_names_the_lookahead_ops(ahead_artifact) -> None:
    m = json.loads((ahead_artifact / "manifest.json").read_text())
    assert m["experts"]["lookahead_op"] == "ossedge::moe_mxfp4_ahead"
    assert m["experts"]["op"] == "ossedge::moe_mxfp4_packed"  # the last layer has no next


@pytest.mark.parametrize("slots", [None, 4, 16], ids=["cache-off", "4-slots", "16-slots"])
def test_lookahead_changes_no_logit(et_artifact, ahead_artifact, slots) -> None:
    option = "off" if slots is None else slots * _stride(et_artifact)
    prompt = torch.randint(0, 4000, (1, 40), generator=torch.Generator().manual_seed(9))
    plain = greedy_steps(ExecuTorchModel(et_artifact, expert_cache=option), prompt, GEN)
    model = ExecuTorchModel(ahead_artifact, expert_cache=option)
    assert torch.equal(greedy_steps(model, prompt, GEN), plain)
    s = model.expert_cache_stats()
    if slots == 16:
        # 3 of the 4 layers hint their successor's 2 experts on every decoded token, read when
        # absent and an LRU slot is free (2 here: a hint is often evicted before its use)
        assert 0 < s["prefetched"] <= 3 * 2 * GEN
        assert s["prefetch_used"] > 0
    elif slots == 4:  # one LRU slot, held by the layer that hints: no room to read ahead
        assert s["prefetched"] == 0


def test_runner_counts_the_hints(ahead_artifact) -> None:
    from ossedge.benchmarks.harness import native_runner

    p = subprocess.run([str(native_runner()), "--model", str(ahead_artifact), "--prompt-length",
                        "40", "--gen-tokens", "8", "--runs", "1", "--warmup", "0",
                        "--expert-cache", str(16 * _stride(ahead_artifact))],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    io = json.loads(p.stdout.strip().splitlines()[-1])["runs"][0]["decode_io"]
    assert io["prefetched"] > 0 and io["prefetch_used"] > 0


def test_lookahead_is_an_executorch_option(tmp_path: Path) -> None:
    p = run("convert", str(default_model_dir()), "--target", "onnx", "-o", str(tmp_path / "o"),
            "--lookahead")  # fmt: skip
    assert p.returncode == 2 and "--lookahead applies to --target executorch" in p.stderr
    assert not (tmp_path / "o").exists()
