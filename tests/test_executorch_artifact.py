"""ExecuTorch artifacts end to end: `ossedge convert --target executorch` on the bundled model and
a synthetic one, parity with the reference runtime (prefill chunks and token-by-token decode past
the sliding window and the ring's wrap), the artifact contract, generate/verify on artifacts, and
broken artifacts."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GptOssConfig as HFConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from shared_artifacts import ARTIFACT_OPTIONS
from clitools import assert_one_line_error, invoke, run

from ossedge.assets import default_model_dir
from ossedge.convert.verify import verify_artifact
from ossedge.runtime.checkpoint import open_checkpoint
from ossedge.runtime.evaluate import default_text
from ossedge.runtime.errors import ArtifactError
from ossedge.targets.executorch import TOLERANCE_QUANTIZED
from ossedge.targets.executorch.checks import check_structure
from ossedge.targets.executorch.runner import ExecuTorchModel
from ossedge.runtime.model import build_model, rope_tables
from ossedge.runtime.quantized import QuantizedView
from ossedge.runtime.tokenizer import Tokenizer
from functools import partial

from ossedge.convert.pipeline import convert as convert_to

convert = partial(convert_to, "executorch")
from ossedge.targets.executorch.ptd import PtdError, read_index, rewrite

CONTEXT = ARTIFACT_OPTIONS["executorch"]["max_context"]
CHUNKS = [20, 32, 7, 1, 1, 30, 9] + [1] * 20  # 120 tokens: past the window (32), ring wraps 3×


@pytest.fixture(scope="module")
def artifact(et_artifact) -> Path:
    """The bundled trained model, recipe mobile (MXFP4 experts, int4 linears), verified."""
    return et_artifact


@pytest.fixture(scope="module")
def artifact_int4(tmp_path_factory, synth, tiny_config) -> tuple[Path, Path]:
    """A synthetic model (window 6) with recipe int4: int4-g32 experts through ossedge::moe_int4."""
    ckpt = synth(config=tiny_config(num_layers=3, window=6))
    out = tmp_path_factory.mktemp("et") / "synth-int4"
    convert(ckpt, out, recipe="int4", max_context=64, verify_tokens=0)
    return ckpt, out


def _parity(
    art: Path, ckpt: Path, recipe: str, chunks: list[int], *, text: bool = False
) -> tuple[list[float], float]:
    """Relative logits error of every call and top-1 agreement of the artifact fed in `chunks` vs the
    reference runtime with the same recipe and the kernels' int8 expert inputs (full forward).
    Input: the packaged evaluation text (`text`, for a trained model) or random token ids."""
    model = ExecuTorchModel(art)
    ref = build_model(QuantizedView(open_checkpoint(ckpt), recipe), expert_activations="int8-b32")
    n = sum(chunks)
    if text:
        ids = torch.tensor([Tokenizer.from_dir(ckpt).encode(default_text()[0])[:n]])
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, ref.config.vocab_size, (1, n), generator=g)
    full = ref(ids)[0]
    cache = model.new_cache()
    errors, agree, p = [], 0, 0
    for step in chunks:
        got = model(ids[:, p : p + step], cache=cache)[0, 0]
        want = full[p + step - 1]
        errors.append(((got - want).norm() / want.norm()).item())
        agree += int(got.argmax() == want.argmax())
        p += step
    print("relative errors", [round(e, 4) for e in errors])
    return errors, agree / len(chunks)


def _p90(errors: list[float]) -> float:
    return sorted(errors)[max(0, math.ceil(0.9 * len(errors)) - 1)]


def test_artifact_contract(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert names == {"model.pte", "model.ptd", "tokenizer.json", "manifest.json"}
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format"] == "ossedge-executorch" and m["contract_version"] == 2
    assert m["recipe"] == "mobile" and m["experts"]["op"] == "ossedge::moe_mxfp4_packed"
    store = m["experts"]["store"]
    assert store["layers"] == 4 and store["experts"] == 8 and store["stride"] % 4096 == 0
    assert m["max_context"] == CONTEXT and m["max_prefill"] == 32
    for name, f in m["files"].items():
        assert (artifact / name).stat().st_size == f["bytes"]
    assert m["verify"]["passed"] and m["verify"]["tokens"] == 72
    methods = m["methods"]
    assert methods["get_max_seq_len"] == 32 and methods["get_max_context_len"] == CONTEXT
    assert methods["use_kv_cache"] is True and methods["enable_dynamic_shape"] is True
    # the program itself answers the LLM runner's metadata methods
    model = ExecuTorchModel(artifact)
    for name, value in methods.items():
        got = model.program.run_method(name, ())
        assert (list(got) if isinstance(value, list) else got[0]) == value, name
    # every layer's packed experts have their own page-aligned segment in the data file, where
    # the manifest says
    entries = read_index(artifact / "model.ptd").entries()
    experts = [k for k in entries if k.endswith(".mlp.experts")]
    assert len(experts) == 4
    assert [entries[f"blocks.{n}.mlp.experts"][0] for n in range(4)] == m["experts"]["store"]["offsets"]
    assert all(entries[k][0] % 4096 == 0 for k in experts)


def test_expert_bytes_are_the_checkpoints(artifact):
    """The real MXFP4 bytes, not the export's placeholders, sit in model.ptd."""
    ckpt = open_checkpoint(default_model_dir())
    entries = read_index(artifact / "model.ptd").entries()
    from ossedge.targets.executorch.pack import Layout

    cfg = ckpt.config
    layout = Layout("mxfp4", cfg.hidden_size, cfg.intermediate_size)
    at, size = layout.parts()["down_codes"]
    with open(artifact / "model.ptd", "rb") as f:
        for layer in (0, 3):
            w = ckpt.weight(f"model.layers.{layer}.mlp.experts.down_proj")
            offset, _ = entries[f"blocks.{layer}.mlp.experts"]
            for e in (0, cfg.num_local_experts - 1):  # each expert's codes inside its extent
                want = w.parts["blocks"][e].contiguous().view(torch.uint8).reshape(-1)
                f.seek(offset + e * layout.stride + at)
                assert size == want.numel() and f.read(size) == want.numpy().tobytes()


@pytest.mark.parametrize("table", ["hf-fp32", "truncate-flipped", "no-attention-factor"])
def test_the_rotary_tables_are_held_to_rounding(artifact, tmp_path, table):
    """verify's structure check takes a rotary table computed another correct way (HF's: fp32
    throughout, whose last bits vary with the SIMD path; ~1e-4 off at position 2000) and refuses
    one whose frequencies or scale are off (YaRN's truncate flipped; the attention factor left
    out), though the first positions' rows are nearly the same."""
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    source = QuantizedView(open_checkpoint(default_model_dir()), manifest["recipe"])
    cfg, positions = source.config, torch.arange(manifest["max_context"])
    y = cfg.rope_scaling
    if table == "hf-fp32":
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](HFConfig(**cfg.to_hf_dict()), "cpu")
        angles = positions.float()[:, None] * inv_freq.float()[None, :]
        cos, sin = angles.cos() * factor, angles.sin() * factor
        assert 1e-6 < (cos - rope_tables(cfg, positions)[0]).abs().max() < 1e-3
    elif table == "truncate-flipped":
        flipped = cfg.replace(rope_scaling=dataclasses.replace(y, truncate=not y.truncate))
        cos, sin = rope_tables(flipped, positions)
    else:
        cos, sin = (t / y.attention_factor for t in rope_tables(cfg, positions))
    entries = read_index(copy / "model.ptd").entries()
    with open(copy / "model.ptd", "r+b") as f:
        for key, t in (("rope_cos", cos), ("rope_sin", sin)):
            offset, size = entries[key]
            assert size == t.numel() * 4
            f.seek(offset)
            f.write(t.float().contiguous().numpy().tobytes())
    r = check_structure(SimpleNamespace(root=copy, manifest=manifest), source)
    if table == "hf-fp32":
        assert r["ok"], r["problems"]
    else:
        assert not r["ok"] and {p.split()[0] for p in r["problems"]} == {"rope_cos", "rope_sin"}


def test_parity_past_window_and_ring_wrap(artifact):
    # as `verify` judges: 90% of the steps within the tolerance (int8 activations put a few
    # steps further off, where a router flips an expert); a wrong export is off at every step
    errors, agree = _parity(artifact, default_model_dir(), "mobile", CHUNKS, text=True)
    assert _p90(errors) < TOLERANCE_QUANTIZED, errors
    assert agree >= 0.95


def test_int4_experts_parity(artifact_int4):
    ckpt, art = artifact_int4
    m = json.loads((art / "manifest.json").read_text())
    assert m["experts"]["op"] == "ossedge::moe_int4_packed"
    errors, agree = _parity(art, ckpt, "int4", [5, 6, 1, 1, 1, 4, 1, 1, 1, 1, 1, 6, 1])
    # random weights and tokens: XNNPACK's int8 linears and the kernels' int8 expert inputs each
    # move the logits by a few percent, more where a router flip picks another expert (2-8%
    # measured, 14% once); a wrong kernel or layout is off by ~100%
    assert _p90(errors) < 0.10 and sorted(errors)[len(errors) // 2] < 0.05, errors


def test_float_linears_are_exact(synth, tiny_config, tmp_path):
    """Recipe native keeps linear layers in float: the program then computes exactly what the
    reference does (the kernels and the graph add nothing but summation order)."""
    ckpt = synth(config=tiny_config(num_layers=2, window=4))
    out = tmp_path / "native"
    convert(ckpt, out, recipe="native", max_context=32, verify_tokens=0)
    errors, agree = _parity(out, ckpt, "native", [3, 4, 1, 1, 1, 2, 1, 1, 1, 1])
    assert max(errors) < 1e-4 and agree == 1.0, errors


def test_verify_json_and_failure_exit(artifact):
    p = run("verify", str(artifact), "--reference", str(default_model_dir()), "--tokens", "48",
            "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("max_abs_err", "rel_err", "rel_err_p90", "kl_mean", "top1", "tokens", "passed"):
        assert key in r
    assert r["passed"] and r["tokens"] == 48 and 0.9 <= r["top1_same"] <= 1.0
    g = r["routing"]  # every token's choice in every layer, recorded by the kernels
    assert g["decisions"] == 48 * 4 and g["router_logits"] and g["inconsistent"] == 0
    assert 0 <= g["flips"] <= g["decisions"] and g["router_err_p90"] < r["tolerance"]
    assert r["linear_activations"] == "int8-asym-token"
    p = run("verify", str(artifact), "--reference", str(default_model_dir()), "--tokens", "48",
            "--tolerance", "1e-9")
    assert p.returncode == 3 and "FAILED" in p.stdout
    assert_one_line_error(p, "at the 90th percentile of steps", "same experts routed", code=3)


def test_generate_on_artifact_matches_reference_greedy(artifact):
    """Greedy text from the artifact equals the reference runtime with the same recipe for the
    first tokens (quantized activations may flip a near-tie later)."""
    from ossedge.runtime.generate import generate
    from ossedge.runtime.sampling import Sampler
    from ossedge.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(artifact)
    prompt = tok.encode("def add(a, b):\n    return")
    kw = {"max_new_tokens": 8, "sampler": Sampler(temperature=0), "stop_ids": []}
    ref = build_model(QuantizedView(open_checkpoint(default_model_dir()), "mobile"))
    want = generate(ref, tok, prompt, **kw).ids
    got = generate(ExecuTorchModel(artifact), tok, prompt, **kw).ids
    assert got[:4] == want[:4]
    p = run("generate", str(artifact), "--prompt", "def add(a, b):", "--temperature", "0",
            "--max-new-tokens", "8")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("def add(a, b):") and "tok/s" in p.stderr


def test_prompt_longer_than_context(artifact):
    p = run("generate", str(artifact), "--prompt", "x = 1\n" * 1200, "--max-new-tokens", "2")
    assert_one_line_error(p, f"context window is {CONTEXT}")


def _copy(artifact: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    return bad


def test_corrupt_pte(artifact, tmp_path):
    bad = _copy(artifact, tmp_path)
    data = bytearray((bad / "model.pte").read_bytes())
    data[:64] = b"\0" * 64
    (bad / "model.pte").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="cannot load model.pte"):
        ExecuTorchModel(bad)
    p = run("verify", str(bad), "--reference", str(default_model_dir()))
    assert_one_line_error(p, "model.pte", "sha256")


def test_missing_or_mismatched_ptd(artifact, artifact_int4, tmp_path):
    bad = _copy(artifact, tmp_path)
    (bad / "model.ptd").unlink()
    p = run("generate", str(bad), "--prompt", "x")
    assert_one_line_error(p, "model.ptd", "missing")
    shutil.copyfile(artifact_int4[1] / "model.ptd", bad / "model.ptd")
    p = run("generate", str(bad), "--prompt", "x")
    assert_one_line_error(p, "model.ptd", "another conversion")


def test_truncated_ptd_is_named(artifact, tmp_path):
    bad = tmp_path / "t.ptd"
    bad.write_bytes((artifact / "model.ptd").read_bytes()[:100000])
    with pytest.raises(PtdError, match="truncated"):
        read_index(bad)
    junk = tmp_path / "junk.ptd"
    junk.write_bytes(b"not a data file" * 10)
    with pytest.raises(PtdError, match="bad header"):
        read_index(junk)


def test_rewrite_refuses_wrong_sizes(artifact, tmp_path):
    key = "blocks.0.mlp.experts"  # each thunk is called with its segment's offset
    with pytest.raises(PtdError, match="checkpoint does not match"):
        rewrite(artifact / "model.ptd", tmp_path / "x.ptd", {key: lambda at: torch.zeros(3)})
    with pytest.raises(PtdError, match="no constant named"):
        rewrite(artifact / "model.ptd", tmp_path / "y.ptd", {"nope": lambda at: torch.zeros(3)})


def test_kernel_library_missing(artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("OSSEDGE_KERNELS", str(tmp_path / "nowhere.so"))
    p = run("generate", str(artifact), "--prompt", "x")
    assert_one_line_error(p, "kernel library is missing", "make install")


def test_verify_with_other_model(artifact, synth):
    with pytest.raises(ArtifactError):
        verify_artifact(artifact, synth())


def test_convert_bad_inputs(tmp_path):
    out = tmp_path / "o"
    p = run("convert", str(default_model_dir()), "-o", str(out), "--max-prefill", "33")
    assert_one_line_error(p, "--max-prefill must be 1..32")
    p = run("convert", str(tmp_path / "missing"), "-o", str(out))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    out.mkdir()
    p = run("convert", str(default_model_dir()), "-o", str(out))
    assert_one_line_error(p, "already exists", "--force")
    p = invoke("convert", str(default_model_dir()), "-o", str(out), "--target", "tflite")
    assert p.returncode == 2
    assert [x.name for x in tmp_path.iterdir()] == ["o"]  # nothing half-written beside it


LLM_RUNNER_SCRIPT = r"""
import sys
from ossedge.targets.executorch.library import load_kernels
from ossedge.targets.base import quiet_imports
quiet_imports()
load_kernels()
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
d, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
runner = TextLLMRunner(f"{d}/model.pte", f"{d}/tokenizer.json", f"{d}/model.ptd")
cfg = GenerationConfig()
cfg.max_new_tokens, cfg.temperature, cfg.num_bos, cfg.echo = n, 0.0, 0, False
pieces = []
runner.generate(prompt, cfg, token_callback=pieces.append)
sys.stdout.write("<<" + "".join(pieces) + ">>")
"""


@pytest.mark.parametrize("prompt", ["class Stack:", "import os\n" * 12])  # 1 and 2 prefill chunks
def test_executorch_llm_runner_generates_the_same_text(artifact, prompt):
    """ExecuTorch's own TextLLMRunner (with the kernel library loaded) runs the artifact and
    greedily generates what `ossedge generate` generates from it."""
    import subprocess
    import sys

    from ossedge.runtime.generate import generate
    from ossedge.runtime.sampling import Sampler
    from ossedge.runtime.tokenizer import Tokenizer

    p = subprocess.run(
        [sys.executable, "-c", LLM_RUNNER_SCRIPT, str(artifact), prompt, "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    runner_text = p.stdout.split("<<", 1)[1].rsplit(">>", 1)[0]
    tok = Tokenizer.from_dir(artifact)
    ids = tok.encode(prompt)
    assert len(ids) > 32 or prompt == "class Stack:"
    ours = generate(ExecuTorchModel(artifact), tok, ids, max_new_tokens=12,
                    sampler=Sampler(temperature=0), stop_ids=[]).text
    assert runner_text and len(runner_text) >= 8
    shorter = min(len(runner_text), len(ours))
    assert runner_text[:shorter] == ours[:shorter], (runner_text, ours)


def test_chat_on_artifact(artifact):
    p = run("chat", str(artifact), "--temperature", "0", "--max-new-tokens", "24",
            stdin="Write a Python function named add.\n")
    assert p.returncode == 0, p.stderr
    assert "<|" not in p.stdout  # harmony markup parsed away, never printed
