"""ONNX artifacts end to end: `ossedge convert --target onnx` on the bundled model and a synthetic
one, parity with the reference runtime (prefill chunks and token-by-token decode past the sliding
window), the MXFP4 experts written as exact int8 blocks, onnxruntime-genai generating from the
artifact, the CLI, and broken artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_artifacts import ARTIFACT_OPTIONS
from clitools import assert_one_line_error, invoke, run

from ossedge.assets import default_model_dir
from ossedge.targets import open_artifact
from ossedge.runtime.checkpoint import open_checkpoint
from ossedge.runtime.errors import ArtifactError
from ossedge.runtime.evaluate import default_text
from ossedge.runtime.model import build_model
from ossedge.targets.onnx.runner import OnnxModel
from ossedge.runtime.quantized import QuantizedView
from ossedge.runtime.tokenizer import Tokenizer
from functools import partial

from ossedge.convert.pipeline import convert as convert_to

convert = partial(convert_to, "onnx")

CONTEXT = ARTIFACT_OPTIONS["onnx"]["max_context"]


@pytest.fixture(scope="module")
def artifact(onnx_artifact) -> Path:
    return onnx_artifact


def _parity(art: Path, ckpt: Path, recipe: str, chunks: list[int], ids: torch.Tensor) -> float:
    """Largest relative logits error over the calls (fed in `chunks`) against the reference
    runtime with the same recipe (float expert inputs: QMoE runs unquantized activations)."""
    model = OnnxModel(art)
    ref = build_model(QuantizedView(open_checkpoint(ckpt), recipe))
    full = ref(ids)[0]
    cache, p, worst = model.new_cache(), 0, 0.0
    for step in chunks:
        got = model(ids[:, p : p + step], cache=cache)[0, 0]
        want = full[p + step - 1]
        worst = max(worst, ((got - want).norm() / want.norm()).item())
        p += step
    return worst


def test_artifact_contract(artifact: Path) -> None:
    names = {p.name for p in artifact.iterdir()}
    assert names == {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                     "genai_config.json", "manifest.json"}
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format"] == "ossedge-onnx" and m["contract_version"] == 1
    assert m["experts"] == {"op": "com.microsoft::QMoE", "bits": 8, "activations": "float",
                            "stored_as": "int8 block 32 (MXFP4, exact)"}
    assert m["verify"]["passed"] and m["verify"]["tokens"] == 72
    for name, f in m["files"].items():
        assert (artifact / name).stat().st_size == f["bytes"]
    genai = json.loads((artifact / "genai_config.json").read_text())
    assert genai["model"]["type"] == "gptoss" and genai["model"]["context_length"] == CONTEXT
    # the graph holds references only: every large weight is in the data file
    assert (artifact / "model.onnx").stat().st_size < 100_000


def test_parity_past_the_window(artifact: Path) -> None:
    """QMoE (int8 experts, float activations), GQA with sinks and MatMulNBits compute what the
    reference computes, to fp32 rounding, through prefill chunks and token-by-token decode."""
    ids = torch.tensor([Tokenizer.from_dir(default_model_dir()).encode(default_text()[0])[:120]])
    chunks = [20, 32, 7, 1, 1, 30, 9] + [1] * 20
    assert _parity(artifact, default_model_dir(), "mobile", chunks, ids) < 1e-4


def test_int4_experts_parity(synth, tiny_config, tmp_path) -> None:
    """Recipe int4: the stored int4 g32 experts go into QMoE as they are (4-bit, block 32)."""
    ckpt = synth(config=tiny_config(num_layers=3, window=6))
    out = tmp_path / "int4"
    m = convert(ckpt, out, recipe="int4", max_context=64, verify_tokens=0)
    assert m["experts"]["bits"] == 4
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (1, 26), generator=g)  # the synthetic vocabulary is 512
    assert _parity(out, ckpt, "int4", [5, 6, 1, 1, 1, 4, 1, 1, 1, 1, 1, 3], ids) < 1e-4


def test_mxfp4_experts_are_exact_int8_blocks(artifact: Path) -> None:
    """The int8 weights × scales in the data file are the checkpoint's MXFP4 values, bit for bit."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / "model.onnx"))  # with the external data
    inits = {t.name: t for t in model.graph.initializer}
    ckpt = open_checkpoint(default_model_dir())
    for layer in (0, 3):
        for name in ("gate_up_proj", "down_proj"):
            w = ckpt.weight(f"model.layers.{layer}.mlp.experts.{name}")
            q = numpy_helper.to_array(inits[f"layers.{layer}.{name}.qweight"]).astype(np.int16) - 128
            s = numpy_helper.to_array(inits[f"layers.{layer}.{name}.scales"])
            e, n, k = w.shape
            got = q.reshape(e, n, k // 32, 32).astype(np.float32) * s[..., None]
            want = w.dequantize(torch.float32).numpy().reshape(e, n, k // 32, 32)
            assert np.array_equal(got, want), (layer, name)


def test_genai_generates_what_the_runtime_does(artifact: Path) -> None:
    og = pytest.importorskip(
        "onnxruntime_genai",
        reason="NOT TESTED: onnxruntime-genai is not installed (pip install '.[genai]')",
    )
    prompt = Tokenizer.from_dir(default_model_dir()).encode("def add(a, b):")
    assert list(og.Tokenizer(og.Model(str(artifact))).encode("def add(a, b):")) == prompt
    params = og.GeneratorParams(og.Model(str(artifact)))
    params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
    gen = og.Generator(og.Model(str(artifact)), params)
    gen.append_tokens(np.array([prompt], np.int32))
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    model = OnnxModel(artifact, prepack=True)  # as genai_config.json runs it
    cache = model.new_cache()
    logits, ours = model(torch.tensor([prompt]), cache=cache), []
    for _ in range(len(theirs)):
        ours.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[ours[-1]]]), cache=cache)
    assert len(theirs) == 24 and ours == theirs


def test_open_artifact_and_generate_cli(artifact: Path) -> None:
    assert isinstance(open_artifact(artifact), OnnxModel)
    p = run("generate", str(artifact), "--prompt", "def add(a, b):", "--max-new-tokens", "8")
    assert p.returncode == 0 and "8 tokens" in p.stderr, p.stdout + p.stderr


def test_verify_cli_json(artifact: Path) -> None:
    p = run("verify", str(artifact), "--reference", str(default_model_dir()), "--tokens", "48",
            "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("max_abs_err", "rel_err", "rel_err_p90", "kl_mean", "top1", "tokens", "passed"):
        assert key in r
    assert r["passed"] and r["target"] == "onnx" and r["rel_err"] < 1e-4
    # the QMoE router logits, read as extra graph outputs, match the reference's to rounding
    g = r["routing"]
    assert g["decisions"] == 48 * 4 and g["router_logits"] and g["router_err"] < 1e-4
    assert g["flips"] == g["inconsistent"] == 0 and r["tolerance"] == 1e-3
    assert r["linear_activations"] == "float"  # MatMulNBits without prepacking


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_missing_external_data_is_a_clear_error(artifact: Path, tmp_path: Path) -> None:
    broken = _copy(artifact, tmp_path)
    (broken / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="model.onnx.data: missing"):
        OnnxModel(broken)
    p = run("generate", str(broken), "--prompt", "x", "--max-new-tokens", "2")
    assert_one_line_error(p, "model.onnx.data: missing")


def test_tampered_data_is_caught(artifact: Path, tmp_path: Path) -> None:
    broken = _copy(artifact, tmp_path)
    data = broken / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        OnnxModel(broken, checksums=True)
    p = run("verify", str(broken), "--reference", str(default_model_dir()), "--tokens", "40")
    assert_one_line_error(p, "sha256 differs")
    # a truncated data file: sizes no longer match
    data.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ArtifactError, match="truncated"):
        OnnxModel(broken)


def test_convert_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    p = invoke("convert", str(default_model_dir()), "--target", "onnx", "-o", str(tmp_path / "x"),
            "--max-prefill", "8")
    assert p.returncode == 2 and "--max-prefill applies to --target executorch only" in p.stderr
    p = invoke("convert", str(default_model_dir()), "--target", "onnx", "-o", str(tmp_path / "y"),
            "--device", "pixel-9-pro")
    assert p.returncode == 2 and "drop it for onnx" in p.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bench_backend_onnx(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = run("bench", str(artifact), "--backend", "onnx", "--prompt-lengths", "16",
            "--gen-tokens", "4", "--runs", "1", "--warmup", "0", "-o", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["backend"] == "onnx" and r["runner"] == "onnxruntime"
    assert r["artifact"]["format"] == "ossedge-onnx" and r["results"][0]["prompt_tokens"] == 16
    p = run("bench", str(default_model_dir()), "--backend", "onnx", "--prompt-lengths", "16",
            "-o", str(tmp_path / "no.json"))
    assert_one_line_error(p, "not an ossedge onnx artifact")


def test_memory_model_counts_the_data_file(artifact: Path) -> None:
    """The planner's ONNX weights (targets/memory.py) against the bytes the exporter wrote."""
    from ossedge.runtime.config import config_from_hf_dict
    from ossedge.targets.onnx.memory import onnx_footprint

    import onnx

    m = json.loads((artifact / "manifest.json").read_text())
    f = onnx_footprint(config_from_hf_dict(m["config"]), m["recipe"], CONTEXT)
    weights = sum(f.part(n) for n in ("linears", "experts", "embedding"))
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    written = sum(int(e.value) for t in graph.initializer for e in t.external_data
                  if e.key == "length")  # without the 64 KiB alignment padding
    assert abs(weights / written - 1) < 0.03, (weights, written)  # small tensors inline, rope


def test_bundle_takes_an_onnx_artifact(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    p = run("bundle", str(artifact), "--platform", "android", "--device", "pixel-9-pro",
            "-o", str(out))
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [x["target"] for x in m["models"]] == ["onnx"]
    assert "models/tiny-onnx/model.onnx.data" in m["files"]
    assert m["device_plan"]["models"]["tiny-onnx"]["fits"] == "resident"
    assert run("verify", str(out)).returncode == 0
