"""The Core AI target: `.aimodel` assets converted with coreai-torch and run here by coreai-core's
own runtime. Parity with the reference runtime on the same recipe through prefill, decode past the
window and the ring's wrap; the experts' bytes kept exactly; each state written once per call;
bad inputs. (The contract, corrupt, missing and tampered files: tests/test_targets.py.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_one_line_error, invoke, run

from ossedge.assets import default_model_dir
from ossedge.benchmarks import structure
from ossedge.convert.pipeline import convert
from ossedge.runtime.model import build_model
from ossedge.targets.coreai import backend
from ossedge.targets.coreai.checks import check_structure
from ossedge.targets.coreai.convert import layer_chunks
from ossedge.targets.coreai.runner import CoreAIModel
from ossedge.targets.source import weight_source

pytest.importorskip("coreai_torch", reason="NOT TESTED: coreai-torch is not installed "
                    "(pip install '.[coreai]')")  # fmt: skip


def _parity(art: Path, ckpt: Path, recipe: str, ids: torch.Tensor, prefill: int) -> float:
    """Largest relative logits error of the artifact against the reference on the same recipe,
    over a prefill of `prefill` tokens then one decode step per token."""
    model = CoreAIModel(art)
    ref = build_model(weight_source(ckpt, recipe)[0])
    want = ref(ids)[0]
    cache = model.new_cache()
    got = [model(ids[:, :prefill], cache=cache)[0, 0]]
    for i in range(prefill, ids.shape[1]):
        got.append(model(ids[:, i : i + 1], cache=cache)[0, 0])
    got = torch.stack(got)
    want = want[prefill - 1 :]
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())


@pytest.mark.parametrize("recipe", ["mobile", "native", "int4"])
def test_parity_through_prefill_window_and_ring_wrap(synth, tiny_config, tmp_path, recipe):
    # window 6: the prefill of 9 tokens goes in two calls (6 + 3), 15 decode steps wrap the ring
    # twice; 2 chunks (one layer each) hand hidden states and states over
    ckpt = synth(config=tiny_config(num_layers=2, window=6))
    art = tmp_path / "art"
    m = convert("coreai", ckpt, art, recipe=recipe, max_context=32, chunk_mb=1,
                verify_tokens=0)  # fmt: skip
    assert m["max_prefill"] == 6 and m["recipe"] == recipe
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    assert _parity(art, ckpt, recipe, ids, prefill=9) < 1e-5


def test_chunks_hold_whole_layers_of_at_most_chunk_mb() -> None:
    from ossedge.runtime.config import preset

    cfg = preset("20b")
    chunks = layer_chunks(cfg, "mobile", 1024 << 20)
    assert [len(c) for c in chunks] == [2] * 12 and chunks[-1].stop == 24
    assert [len(c) for c in layer_chunks(cfg, "mobile", 1)] == [1] * 24


def test_structure_experts_exact_and_states_written_once(artifact_of) -> None:
    art = artifact_of("coreai")
    model = CoreAIModel(art)
    src = weight_source(default_model_dir(), model.manifest["recipe"])[0]
    s = check_structure(model, src)
    assert s["ok"], s["problems"]
    layers = model.cfg.num_hidden_layers
    assert s["expert_weights_exact"] == s["expert_weights_checked"] == 4 * layers
    assert s["expert_bits_per_weight"] == pytest.approx(4.25)  # MXFP4: 4 bits + E8M0 per 32
    # the experts are in the chunk as uint8 once, not also as floats
    chunk = s["storage_types"]["layers_00.aimodel"]
    experts = layers * 8 * 3 * 256 * 256
    assert chunk["UInt8"] >= experts * 17 // 32 and chunk.get("Float32", 0) < experts


def test_decode_writes_one_slot_of_each_state(artifact_of) -> None:
    model = CoreAIModel(artifact_of("coreai"))
    cache = model.new_cache()
    window = model.cfg.sliding_window
    model(torch.arange(1, window + 1)[None], cache=cache)  # fills the ring
    before = {k: v.numpy().copy() for k, v in cache.states["layers_00.aimodel"].items()}
    model(torch.tensor([[7]]), cache=cache)  # position `window`: ring slot 0, full slot window
    for name, was in before.items():
        now = cache.states["layers_00.aimodel"][name].numpy()
        changed = np.flatnonzero(np.abs(now - was).reshape(now.shape[0], -1).sum(1))
        layer = int(name.split("_")[1])
        assert changed.tolist() == [0 if model.cfg.is_sliding(layer) else window], name


def test_a_changed_expert_byte_fails_the_structure_check(artifact_of, tmp_path) -> None:
    art = tmp_path / "art"
    shutil.copytree(artifact_of("coreai"), art)
    m = json.loads((art / "manifest.json").read_text())
    where = m["experts"]["layout"]["1"]["down_proj.blocks"]
    with open(art / where["file"], "r+b") as f:
        f.seek(where["offset"] + 100)
        b = f.read(1)
        f.seek(where["offset"] + 100)
        f.write(bytes([b[0] ^ 0x11]))
    model = CoreAIModel(art)  # sizes as recorded: it opens
    s = check_structure(model, weight_source(default_model_dir(), m["recipe"])[0])
    assert not s["ok"] and s["expert_weights_exact"] == s["expert_weights_checked"] - 1
    assert any("layer 1 down_proj.blocks" in p for p in s["problems"])


def test_verify_json_has_the_structure(artifact_of) -> None:
    p = run("verify", str(artifact_of("coreai")), "--reference", str(default_model_dir()),
            "--tokens", "40", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["target"] == "coreai" and r["passed"] and r["rel_err"] < 1e-5
    assert r["structure"]["ok"] and r["routing"]["flips"] == 0


def test_bad_options_are_one_line_errors(tmp_path) -> None:
    model = str(default_model_dir())
    p = invoke("convert", model, "-o", str(tmp_path / "a"), "--target", "coreai",
               "--max-context", "8")  # fmt: skip
    assert_one_line_error(p, "--max-context must be 32..")
    p = invoke("convert", model, "-o", str(tmp_path / "b"), "--target", "coreai",
               "--deployment-target", "ios26")  # fmt: skip
    assert p.returncode == 2 and "--deployment-target applies to --target coreml" in p.stderr
    assert not list(tmp_path.iterdir())


def test_missing_coreai_names_the_extra(tmp_path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "coreai" or m.startswith(("coreai.", "coreai_"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "coreai", None)  # import coreai → ImportError
    backend.coreai.cache_clear()
    backend.coreai_torch.cache_clear()
    try:
        p = invoke("convert", str(default_model_dir()), "-o", str(tmp_path / "a"), "--target",
                   "coreai")  # fmt: skip
        assert_one_line_error(p, "coreai-core", "pip install 'ossedge[coreai]'")
    finally:
        backend.coreai.cache_clear()
        backend.coreai_torch.cache_clear()
    assert not (tmp_path / "a").exists()


def test_plan_and_ios_bundle_take_the_target(artifact_of, tmp_path) -> None:
    from ossedge.targets.bundle import make_bundle, verify_bundle

    art = artifact_of("coreai")
    p = run("plan", "--model", str(art), "--device", "ipad-pro-m4", "--json")
    assert p.returncode == 0, p.stderr
    options = json.loads(p.stdout)["options"]
    assert {o["target"] for o in options} == {"coreai"}
    m = make_bundle([art], tmp_path / "ios", platform="ios")
    assert [x["target"] for x in m["models"]] == ["coreai"]
    assert "models/tiny-coreai/layers_00.aimodel/main.mlirb" in m["files"]
    assert verify_bundle(tmp_path / "ios")["passed"]
    p = run("bundle", str(art), "--platform", "android", "-o", str(tmp_path / "a"))
    assert_one_line_error(p, "a coreai artifact does not run on android")


def test_the_benchmarks_structure_check_opens_without_loading(artifact_of, monkeypatch) -> None:
    """benchmarks/structure.py reads the assets without lowering them to executables (at the 20b's
    size, preparing all 13 for the runtime would be the check's whole cost)."""
    def no_executable(*args, **kwargs):
        raise AssertionError("the structure check prepared an executable")

    monkeypatch.setattr(backend.coreai().authoring.AIModelAsset, "executable", no_executable)
    r = structure.check(str(artifact_of("coreai")), str(default_model_dir()))
    assert r["ok"] and r["expert_weights_exact"] == r["expert_weights_checked"] > 0
