"""`convert --lookahead` (the default): each layer's MoE op also gets the next layer's router
applied to its own hidden state and the next layer's packed experts, and the expert cache starts
reading those experts early. Same logits as `--no-lookahead`, bit for bit; the hints are counted
and used."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from clitools import invoke
from steps import greedy_steps

from ossedge.assets import default_model_dir
from ossedge.runtime.errors import OssedgeError
from ossedge.targets.executorch.runner import ExecuTorchModel
from ossedge.runtime.expert_cache import store_of
from functools import partial

from ossedge.convert.pipeline import convert as convert_to

convert = partial(convert_to, "executorch")

GEN = 8


@pytest.fixture(scope="module")
def plain_artifact(tmp_path_factory) -> Path:
    """The bundled model converted as `et_artifact` is (lookahead on), with --no-lookahead."""
    out = tmp_path_factory.mktemp("plain") / "tiny-plain"
    convert(default_model_dir(), out, max_context=2048, verify_tokens=0, lookahead=False)
    return out


def _stride(artifact: Path) -> int:
    return store_of(json.loads((artifact / "manifest.json").read_text())).stride


def test_manifest_names_the_lookahead_ops(et_artifact, plain_artifact) -> None:
    m = json.loads((et_artifact / "manifest.json").read_text())
    assert m["experts"]["lookahead_op"] == "ossedge::moe_mxfp4_ahead"
    assert m["experts"]["op"] == "ossedge::moe_mxfp4_packed"  # the last layer has no next
    plain = json.loads((plain_artifact / "manifest.json").read_text())
    assert plain["experts"]["lookahead_op"] is None


@pytest.mark.parametrize("slots", [None, 4, 16], ids=["cache-off", "4-slots", "16-slots"])
def test_lookahead_changes_no_logit(et_artifact, plain_artifact, slots) -> None:
    option = "off" if slots is None else slots * _stride(et_artifact)
    prompt = torch.randint(0, 4000, (1, 40), generator=torch.Generator().manual_seed(9))
    plain = greedy_steps(ExecuTorchModel(plain_artifact, expert_cache=option), prompt, GEN)
    model = ExecuTorchModel(et_artifact, expert_cache=option)
    assert torch.equal(greedy_steps(model, prompt, GEN), plain)
    s = model.expert_cache_stats()
    if slots == 16:
        # 3 of the 4 layers hint their successor's 2 experts on every decoded token, read when
        # absent and an LRU slot is free (2 here: a hint is often evicted before its use)
        assert 0 < s["prefetched"] <= 3 * 2 * GEN
        assert s["prefetch_used"] > 0
    elif slots == 4:
        # one LRU slot, mostly held by the layer that hints: a hint is read only when the slot
        # happens to be idle (how often depends on the I/O thread's timing), at most one per
        # hinting layer and token
        assert s["prefetched"] <= 3 * GEN
        assert s["prefetch_used"] <= s["prefetched"]


def test_runner_counts_the_hints(et_artifact) -> None:
    from ossedge.benchmarks.harness import native_runner

    p = subprocess.run([str(native_runner()), "--model", str(et_artifact), "--prompt-length",
                        "40", "--gen-tokens", "8", "--runs", "1", "--warmup", "0",
                        "--expert-cache", str(16 * _stride(et_artifact))],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    io = json.loads(p.stdout.strip().splitlines()[-1])["runs"][0]["decode_io"]
    assert io["prefetched"] > 0 and io["prefetch_used"] > 0


def test_lookahead_is_an_executorch_option(tmp_path: Path) -> None:
    p = invoke("convert", str(default_model_dir()), "--target", "onnx", "-o", str(tmp_path / "o"),
            "--lookahead")  # fmt: skip
    assert p.returncode == 2 and "--lookahead applies to --target executorch" in p.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(OssedgeError, match="lookahead needs contract version 2"):
        convert(default_model_dir(), tmp_path / "v1", contract=1, lookahead=True, verify_tokens=0)
    assert not (tmp_path / "v1").exists()
