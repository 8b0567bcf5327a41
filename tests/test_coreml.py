"""Core ML artifacts, checked on Linux through ossedge's MIL interpreter: the interpreter's ops
against numpy and coremltools' own constant folding, each function type against torch, whole
artifacts for both deployment targets past the sliding window and the ring's wrap, the known
coremltools traps, and broken artifacts."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_artifacts import ARTIFACT_OPTIONS
from clitools import assert_one_line_error, invoke, run

from ossedge.assets import default_model_dir
from ossedge.quantize.qtensor import QTensor
from ossedge.convert.verify import verify_artifact
from ossedge.runtime.checkpoint import open_checkpoint
from ossedge.targets.coreml.runner import CoreMLArtifactError, CoreMLModel
from ossedge.targets.coreml.checks import check_structure
from ossedge.targets.coreml.interpreter import MilError, MilPackage, quiet_coremltools, unpack_bits
from ossedge.runtime.model import build_model, rms_norm, rope_tables
from ossedge.runtime.quantized import QuantizedView
from ossedge.runtime.atomic import sha256_file
from ossedge.convert.pipeline import convert as convert_to
from ossedge.targets.coreml.convert import CoreMLExportError

quiet_coremltools()
import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Program, types  # noqa: E402

convert = partial(convert_to, "coreml")
CONTEXT = ARTIFACT_OPTIONS["coreml"]["max_context"]  # the bundled model's window is 32


@pytest.fixture(scope="module")
def art26(coreml_artifact) -> Path:
    return coreml_artifact  # ios26, the default


@pytest.fixture(scope="module")
def art18(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coreml") / "tiny-ios18"
    convert(default_model_dir(), out, deployment_target="ios18", max_context=CONTEXT,
            chunk_mb=2, verify_tokens=0)
    return out


def _save(prog_fns: dict, path: Path, opset=ct.target.iOS26) -> MilPackage:
    prog = Program()
    for name, fn in prog_fns.items():
        prog.add_function(name, fn)
    prog.default_function_name = next(iter(prog_fns))
    prog.export_as_multifunction = True
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
               pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True).save(str(path))
    return MilPackage(path)


# -- the interpreter ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed", [(4, False), (4, True), (2, False), (1, False)])
def test_unpack_bits_matches_numpy_packing(bits, signed):
    rng = np.random.default_rng(bits)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    v = rng.integers(lo, hi, size=101)
    u = (v % (1 << bits)).astype(np.uint64)
    packed_bits = ((u[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8).ravel()
    raw = np.packbits(packed_bits, bitorder="little")
    assert np.array_equal(unpack_bits(raw, bits, v.size, signed), v)


def test_compressed_constants_decode_like_coremltools(tmp_path):
    """lut_to_dense (per-tensor and per-block tables) and blockwise_shift_scale (with offsets)
    decoded by the interpreter from the saved package == coremltools' own constant folding."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, (8, 64)).astype(types.np_uint4_dtype)
    lut = rng.standard_normal((1, 1, 16, 1)).astype(np.float16)
    lut_blocks = rng.standard_normal((2, 2, 16, 1)).astype(np.float16)
    data = rng.integers(-8, 8, (8, 64)).astype(types.np_int4_dtype)
    scale = rng.random((8, 2)).astype(np.float16)
    offset = rng.integers(-2, 3, (8, 2)).astype(types.np_int4_dtype)
    expected = {}

    @mb.function(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp16)],
                 opset_version=ct.target.iOS26)
    def fn(x):
        a = mb.constexpr_lut_to_dense(indices=idx, lut=lut, name="a")
        b = mb.constexpr_lut_to_dense(indices=idx, lut=lut_blocks, name="b")
        c = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, name="c")
        d = mb.constexpr_blockwise_shift_scale(data=a, scale=scale, name="d")
        for v in (a, b, c, d):
            expected[v.name] = v.op.materialized_val_inference()
        ys = [mb.linear(x=x, weight=w) for w in (a, b, c, d)]
        return mb.concat(values=ys, axis=-1, name="y")

    pkg = _save({"main": fn}, tmp_path / "c.mlpackage")
    env: dict = {}
    for op in pkg.ops("main"):
        if op.type.startswith("constexpr_"):
            env[op.outputs[0].name] = pkg.decoded("main", op, env)
    for name, want in expected.items():
        assert np.array_equal(env[name], want), name
    x = rng.standard_normal((1, 64)).astype(np.float16)
    y = pkg.run("main", {"x": x})["y"]
    ref = np.concatenate([x.astype(np.float32) @ expected[n].astype(np.float32).T
                          for n in "abcd"], axis=-1)
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=2e-2)


def test_ops_against_numpy(tmp_path):
    """The arithmetic, indexing and state ops the artifacts use, with fp16 rounding per op."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 4)).astype(np.float32)

    @mb.function(input_specs=[mb.TensorSpec((2, 8), dtype=types.fp32),
                              mb.TensorSpec((1,), dtype=types.int32),
                              mb.StateTensorSpec((1, 3, 8), dtype=types.fp16)],
                 opset_version=ct.target.iOS26)
    def fn(x, pos, st):
        s = mb.softmax(x=x, axis=-1, name="s")
        r = mb.rsqrt(x=mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True), name="r")
        v, i = mb.topk(x=x, k=3, axis=-1, name="t")
        g = mb.gather(x=table, indices=pos, axis=0, name="g")
        half = mb.cast(x=x, dtype="fp16", name="half")
        m = mb.mod(x=mb.sub(x=pos, y=np.arange(5, dtype=np.int32)), y=np.int32(3), name="mod")
        sel = mb.select(cond=mb.less_equal(x=np.arange(4, dtype=np.int32), y=pos),
                        a=np.ones(4, np.float32), b=np.zeros(4, np.float32), name="sel")
        c = mb.clip(x=half, alpha=np.float16(-0.5), beta=np.float16(0.5), name="c")
        sg = mb.sigmoid(x=x, name="sg")
        mm = mb.matmul(x=x, y=x, transpose_y=True, name="mm")
        upd = mb.reshape(x=mb.slice_by_size(x=half, begin=[0, 0], size=[1, 8]), shape=[1, 1, 8])
        begin = mb.concat(values=[np.zeros(1, np.int32), pos, np.zeros(1, np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([1, 1, 8], np.int32))
        new = mb.slice_update(x=mb.read_state(input=st), update=upd, begin=begin, end=end)
        mb.coreml_update_state(state=st, value=new)
        return s, r, v, i, g, half, m, sel, c, sg, mm

    pkg = _save({"main": fn}, tmp_path / "ops.mlpackage")
    x = rng.standard_normal((2, 8)).astype(np.float32) * 2
    state = {"st": np.zeros((1, 3, 8), np.float16)}
    out = pkg.run("main", {"x": x, "pos": np.array([2], np.int32)}, state)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(out["s"], e / e.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(out["r"], 1 / np.sqrt((x * x).mean(-1, keepdims=True)), rtol=1e-6)
    order = np.argsort(-x, axis=-1)[:, :3]
    values, indices = list(out.values())[2:4]  # topk's two outputs, in the function's order
    assert np.array_equal(indices, order)
    assert np.array_equal(values, np.take_along_axis(x, order, axis=-1))
    np.testing.assert_array_equal(out["g"], table[[2]])
    assert out["half"].dtype == np.float16 and np.array_equal(out["half"], x.astype(np.float16))
    assert np.array_equal(out["mod"], np.mod(2 - np.arange(5), 3))
    assert np.array_equal(out["sel"], [1, 1, 1, 0])
    assert np.array_equal(out["c"], np.clip(x.astype(np.float16), -0.5, 0.5))
    np.testing.assert_allclose(out["sg"], 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(out["mm"], x @ x.T, rtol=1e-5)
    assert np.array_equal(state["st"][0, 2], x[0].astype(np.float16))
    assert not state["st"][0, :2].any()


def test_unknown_op_is_a_loud_error(tmp_path):
    @mb.function(input_specs=[mb.TensorSpec((4,), dtype=types.fp32)],
                 opset_version=ct.target.iOS26)
    def fn(x):
        return mb.erf(x=x, name="y")

    pkg = _save({"main": fn}, tmp_path / "erf.mlpackage")
    with pytest.raises(MilError, match="op 'erf' is not implemented"):
        pkg.run("main", {"x": np.zeros(4, np.float32)})


# -- function types against torch ----------------------------------------------------------------

def test_expert_and_head_functions_match_torch(art26):
    model = CoreMLModel(art26, engine="interpreter")
    src = QuantizedView(open_checkpoint(default_model_dir()), "mobile")
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    m = torch.randn(1, cfg.hidden_size, generator=g).half()
    p = "model.layers.2.mlp.experts."
    w1 = src.weight(p + "gate_up_proj")[5].dequantize(torch.float32)
    w2 = src.weight(p + "down_proj")[5].dequantize(torch.float32)
    b1, b2 = src.weight(p + "gate_up_proj_bias")[5].float(), src.weight(p + "down_proj_bias")[5]
    gu = m.float() @ w1.T + b1
    gate, up = gu[:, 0::2].clamp(max=7), gu[:, 1::2].clamp(-7, 7)
    ref = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ w2.T + b2.float()
    got = model.engine.predict("expert_2_5", {"m": m.numpy()})["y"]
    torch.testing.assert_close(torch.from_numpy(got).float(), ref, rtol=2e-2, atol=2e-2)

    h = torch.randn(1, cfg.hidden_size, generator=g)
    unembed = src.weight("lm_head.weight").dequantize(torch.float32)
    w = src.weight("model.norm.weight").float()
    logits = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w) @ unembed.T
    got = model.engine.predict("head", {"h": h.numpy()})["logits"]
    rel = (torch.from_numpy(got) - logits).norm() / logits.norm()
    assert rel < 5e-3


def test_attention_function_matches_the_reference_layer(art26):
    """attn_1 (a full layer) and attn_0 (sliding) against the reference model's attention block
    and router, token by token past the window."""
    model = CoreMLModel(art26, engine="interpreter")
    src = QuantizedView(open_checkpoint(default_model_dir()), "mobile")
    ref = build_model(src)
    cfg = model.cfg
    n = 40
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, n, cfg.hidden_size, generator=g)
    for layer in (0, 1):
        block = ref.blocks[layer]
        pos = torch.arange(n)
        rope = rope_tables(cfg, pos)
        h_ref = x + block.attn(rms_norm(x, block.attn_norm, cfg.rms_norm_eps), pos, rope, None)
        m_ref = rms_norm(h_ref, block.mlp_norm, cfg.rms_norm_eps)
        logits = m_ref @ block.mlp.router_w.float().T + block.mlp.router_b.float()
        top = torch.topk(logits, cfg.num_experts_per_tok, dim=-1)
        state = model.engine.new_state(f"attn_{layer}")
        for t in range(n):
            out = model.engine.predict(
                f"attn_{layer}",
                {"x": x[0, t : t + 1].numpy(), "pos": np.array([t], np.int32)}, state,
            )
            got = torch.from_numpy(out["h"])
            rel = ((got - h_ref[0, t]).norm() / h_ref[0, t].norm()).item()
            assert rel < 5e-3, (layer, t, rel)
            assert out["ids"].tolist()[0] == top.indices[0, t].tolist(), (layer, t)
            w_ref = torch.softmax(top.values[0, t], -1)
            torch.testing.assert_close(torch.from_numpy(out["w"][0]), w_ref, rtol=0, atol=5e-3)


# -- whole artifacts -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["art26", "art18"])
def test_artifact_parity_and_structure(which, request):
    art = request.getfixturevalue(which)
    r = verify_artifact(art, default_model_dir(), tokens=80)
    assert r["passed"], r
    assert r["rel_err"] < 5e-3 and r["top1_same"] == 1.0
    g = r["routing"]  # ids and weights from the attention functions, no router logits
    assert g["decisions"] == 80 * 4 and not g["router_logits"] and g["router_err"] < 1e-2
    s = r["structure"]
    assert s["ok"] and s["expert_weights_exact"] == s["expert_weights_checked"] == 64
    assert abs(s["expert_bits_per_weight"] - 4.5) < 0.01
    m = json.loads((art / "manifest.json").read_text())
    assert m["predictions_per_token"] == 4 * (1 + 2) + 1
    assert m["experts"]["format"] == ("mxfp4" if which == "art26" else "int4-g32")


def test_chunking_spreads_functions_over_packages(art18):
    m = json.loads((art18 / "manifest.json").read_text())
    assert len(m["packages"]) > 1
    listed = [f for p in m["packages"].values() for f in p["functions"]]
    assert sorted(listed) == sorted(m["functions"])
    for name, p in m["packages"].items():
        assert set(MilPackage(art18 / name).functions) == set(p["functions"])


def test_ios26_program_keeps_mxfp4_compact(art26):
    """The iOS18 canonicalization trap: MXFP4 as lut → shift_scale must stay that order (4.5
    bits/weight), not become per-block tables (~3× the bytes)."""
    pkg = MilPackage(art26 / "chunk_00.mlpackage")
    types_ = [op.type for op in pkg.ops("expert_0_0") if op.type.startswith("constexpr")]
    assert types_ == ["constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"] * 2
    lut = next(op for op in pkg.ops("expert_0_0") if op.type == "constexpr_lut_to_dense")
    shape = [d.constant.size for d in lut.inputs["lut"].arguments[0].value.type.tensorType
             .dimensions]
    assert shape == [1, 1, 16, 1]


def _rewrite_package(art: Path, package: str, edit) -> None:
    """Edit a package's program and re-record the manifest's checksums, as a faulty converter
    would have written it: only the structural checks can catch what `edit` broke."""
    from coremltools.proto import Model_pb2

    spec_file = art / package / "Data/com.apple.CoreML/model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    edit(spec)
    spec_file.write_bytes(spec.SerializeToString())
    m = json.loads((art / "manifest.json").read_text())
    rel = str(spec_file.relative_to(art))
    m["files"][rel] = {"bytes": spec_file.stat().st_size, "sha256": sha256_file(spec_file)}
    (art / "manifest.json").write_text(json.dumps(m))


def _ops(spec, fn):
    f = spec.mlProgram.functions[fn]
    return f.block_specializations[f.opset].operations


def test_dropped_state_write_is_caught(art26, tmp_path):
    """The trap of index-tensor cache writes: a state write that silently disappears."""
    art = tmp_path / "a"
    shutil.copytree(art26, art)

    def drop(spec):
        ops = _ops(spec, "attn_1")
        for i in reversed(range(len(ops))):
            if ops[i].type == "write_state":
                del ops[i]

    _rewrite_package(art, "chunk_00.mlpackage", drop)
    r = verify_artifact(art, default_model_dir(), tokens=40)
    assert not r["passed"]
    assert any("attn_1: state k_cache is written 0 times" in p for p in r["structure"]["problems"])
    assert r["rel_err"] > 0.05  # and the numbers show it too
    p = run("verify", str(art), "--reference", str(default_model_dir()), "--tokens", "40")
    assert p.returncode == 3


def test_structure_checks_flag_gathers_and_rereads(tmp_path):
    """A gather over a compressed weight (Core ML would expand all experts at load) and a state
    read after its write (coremltools merges it with the read before the write)."""
    from ossedge.targets.coreml.checks import _compressed_gathers, _state_discipline

    idx = np.zeros((4, 8), dtype=types.np_uint4_dtype)

    @mb.function(input_specs=[mb.TensorSpec((1,), dtype=types.int32),
                              mb.StateTensorSpec((1, 8), dtype=types.fp16)],
                 opset_version=ct.target.iOS26)
    def fn(i, st):
        w = mb.constexpr_lut_to_dense(indices=idx, lut=np.ones((1, 1, 16, 1), np.float16))
        row = mb.gather(x=w, indices=i, axis=0)
        mb.coreml_update_state(state=st, value=row)
        again = mb.read_state(input=st)
        return mb.add(x=again, y=row, name="y")

    pkg = _save({"main": fn}, tmp_path / "bad.mlpackage")
    assert _compressed_gathers("main", pkg.ops("main"))
    problems = _state_discipline("main", pkg.ops("main"), ["st"])
    assert any("read after it is written" in p for p in problems)


def test_missing_function_is_named(art26, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(art26, art)
    _rewrite_package(art, "chunk_00.mlpackage",
                     lambda spec: spec.mlProgram.functions.pop("expert_3_7"))
    model = CoreMLModel(art, engine="interpreter")
    r = check_structure(model, QuantizedView(open_checkpoint(default_model_dir()), "mobile"))
    assert not r["ok"] and any("expert_3_7" in p for p in r["problems"])
    p = run("verify", str(art), "--reference", str(default_model_dir()), "--tokens", "40")
    assert p.returncode in (1, 3) and "expert_3_7" in p.stderr


def test_tampered_weight_file_is_named(art26, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(art26, art)
    weights = art / "chunk_00.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    with open(weights, "r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0xFF]))
    p = run("verify", str(art), "--reference", str(default_model_dir()), "--tokens", "40")
    assert_one_line_error(p, "weight.bin", "sha256")
    weights.write_bytes(weights.read_bytes()[:1000])
    p = run("verify", str(art), "--reference", str(default_model_dir()))
    assert_one_line_error(p, "weight.bin", "truncated")


def test_truncated_blob_is_a_clear_interpreter_error(art26, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(art26, art)
    weights = art / "chunk_00.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pkg = MilPackage(art / "chunk_00.mlpackage")
    with pytest.raises(MilError, match="truncated|beyond the end"):
        pkg.run("head", {"h": np.zeros((1, 256), np.float32)})


def test_cli_convert_and_errors(tmp_path):
    ckpt = str(default_model_dir())
    out = tmp_path / "c"
    p = run("convert", ckpt, "--target", "coreml", "-o", str(out), "--max-context", "64",
            "--verify-tokens", "40")
    assert p.returncode == 0, p.stderr
    assert "coreml ios26" in p.stdout and "verified over 40 tokens" in p.stdout
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no partial dirs
    p = run("generate", str(out), "--prompt", "hi")
    assert_one_line_error(p, "Core ML prediction needs macOS", "ossedge verify")
    p = run("convert", ckpt, "--target", "coreml", "--deployment-target", "ios18",
            "--recipe", "mobile", "-o", str(tmp_path / "d"))
    assert_one_line_error(p, "ios26", "--recipe int4")
    p = run("convert", ckpt, "--target", "coreml", "--max-context", "8", "-o",
            str(tmp_path / "e"))
    assert_one_line_error(p, "--max-context")
    p = invoke("convert", ckpt, "--target", "coreml", "--max-prefill", "8", "-o",
            str(tmp_path / "f"))
    assert p.returncode == 2 and "--max-prefill" in p.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_bad_deployment_target_in_api():
    with pytest.raises(CoreMLExportError, match="ios18"):
        convert(default_model_dir(), "/tmp/never", deployment_target="ios17")


def test_prediction_needs_macos_or_the_interpreter(art26):
    with pytest.raises(CoreMLArtifactError, match="needs macOS"):
        CoreMLModel(art26)
    model = CoreMLModel(art26, engine="interpreter")
    cache = model.new_cache()
    logits = model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert logits.shape == (1, 1, model.cfg.vocab_size) and cache.position == 3
    with pytest.raises(Exception, match="context full"):
        model(torch.zeros(1, CONTEXT, dtype=torch.long), cache=cache)


def test_quantized_weight_storage_is_exact_for_int_formats():
    """int4 codes and int8 codes are stored as they are (data = code - 8 for int4)."""
    from ossedge.targets.coreml.builder import compressed_parts

    src = QuantizedView(open_checkpoint(default_model_dir()), "mobile")
    w = src.weight("model.layers.0.self_attn.q_proj.weight")
    assert isinstance(w, QTensor) and w.fmt == "int4-g32"
    p = compressed_parts(w)
    dense = p["data"].astype(np.float32) * np.repeat(p["scale"].astype(np.float32), 32, axis=1)
    assert np.array_equal(dense.astype(np.float16),
                          w.dequantize(torch.float32).numpy().astype(np.float16))


@pytest.mark.macos
def test_coreml_engine_generates_like_the_interpreter(art26):
    """On macOS: Core ML itself runs the artifact and agrees with the interpreter."""
    interp = CoreMLModel(art26, engine="interpreter")
    native = CoreMLModel(art26, engine="coreml")
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    a = interp(ids, cache=interp.new_cache())[0, 0]
    b = native(ids, cache=native.new_cache())[0, 0]
    assert ((a - b).norm() / a.norm()).item() < 2e-2
