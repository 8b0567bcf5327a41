"""The benchmark harness: every backend available here, the native runner, the adb transport
against a local stand-in, memory-limited runs, the report, and bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from clitools import assert_one_line_error, invoke, run

from ossedge.benchmarks.harness import run_bench, validate
from ossedge.benchmarks.limits import LimitError, memory_cgroup
from ossedge.benchmarks.rss import run_measured

SHORT = dict(prompt_lengths=(16, 40), gen_tokens=6, runs=2, warmup=1)


def _check(result: dict, model: Path) -> None:
    validate(result)
    assert [r["prompt_tokens"] for r in result["results"]] == [16, 40]
    for r in result["results"]:
        assert len(r["raw"]["runs"]) == 2 and r["raw"]["warmup_runs"] == 1
        assert r["decode_tok_s"]["median"] > 0 and r["ttft_s"]["min"] <= r["ttft_s"]["max"]
        assert r["peak_rss_bytes"] > 1e6 and r["rss_anon_bytes"] > 0
        assert all(len(x["tokens"]) == 6 for x in r["raw"]["runs"])
    manifest = model / "manifest.json"
    if manifest.is_file():
        assert result["artifact"]["manifest_sha256"] == hashlib.sha256(
            manifest.read_bytes()).hexdigest()
    roof = result["roofline"]
    if result["device"]["transport"] == "local":
        assert len(roof["bandwidth_gbs"]) == 2 and min(roof["bandwidth_gbs"]) > 0.1
    else:
        assert roof["bandwidth_gbs"] == [] and roof["roofline_tok_s"] is None
    if manifest.is_file():  # an artifact: its bytes per token, some MB for the tiny model
        assert 1e5 < roof["bytes_per_token"] < sum(f.stat().st_size for f in model.rglob("*"))
    else:
        assert roof["bytes_per_token"] is None and roof["roofline_tok_s"] is None
    assert result["versions"]["torch"] and result["device"]["transport"]


@pytest.fixture(scope="module")
def pybindings(et_artifact: Path) -> dict:
    return run_bench(et_artifact, backend="executorch", **SHORT)


def test_executorch_pybindings(pybindings: dict, et_artifact: Path) -> None:
    _check(pybindings, et_artifact)
    assert pybindings["runner"] == "pybindings" and pybindings["artifact"]["recipe"] == "mobile"


def test_reference_backend(tiny_ckpt: Path) -> None:
    r = run_bench(tiny_ckpt, backend="reference", **SHORT)
    _check(r, tiny_ckpt)
    assert r["runner"] == "python"


def _tokens(result: dict) -> list[list[int]]:
    return [r["raw"]["runs"][0]["tokens"] for r in result["results"]]


def test_native_runner_generates_what_the_pybindings_do(pybindings, et_artifact: Path) -> None:
    r = run_bench(et_artifact, backend="executorch", runner="native", **SHORT)
    _check(r, et_artifact)
    assert _tokens(r) == _tokens(pybindings)
    assert r["settings"]["weights"] == "mmap" and r["results"][0]["raw"]["weights"] == "mmap"
    heap = run_bench(et_artifact, backend="executorch", runner="native", weights="heap", **SHORT)
    _check(heap, et_artifact)
    assert _tokens(heap) == _tokens(pybindings)
    assert heap["results"][0]["raw"]["weights"] == "heap"
    assert heap["results"][0]["rss_anon_bytes"] > r["results"][0]["rss_anon_bytes"]
    from ossedge.benchmarks.report import label

    assert "weights heap" in label(heap) and "weights" not in label(r)


@pytest.fixture()
def fake_adb(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "device"
    root.mkdir()
    script = tmp_path / "adb"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} "
                      f"{Path(__file__).with_name('fake_adb.py')} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("OSSEDGE_ADB", str(script))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    return root


def test_adb_transport_against_a_stand_in(fake_adb: Path, pybindings, et_artifact: Path) -> None:
    r = run_bench(et_artifact, backend="executorch", device="adb:FAKE01", **SHORT)
    _check(r, et_artifact)
    d = r["device"]
    assert d["transport"] == "adb" and d["model"] == "Fake Pixel" and d["os"] == "Android 16"
    assert d["thermal"] == {"battery": 31.0, "cpu-big": 45.5} and d["thermal_status"] == "0"
    pushed = fake_adb / "data/local/tmp/ossedge"
    assert (pushed / "model" / "model.ptd").is_file() and os.access(pushed / "runner", os.X_OK)
    assert _tokens(r) == _tokens(pybindings)


def test_unreachable_device_and_missing_runner_are_one_line_errors(
    fake_adb: Path, et_artifact: Path, tmp_path: Path
) -> None:
    out = str(tmp_path / "r.json")
    short = ("--prompt-lengths", "16", "--gen-tokens", "4")
    p = run("bench", str(et_artifact), "--device", "adb:NOPE", *short, "-o", out)
    assert_one_line_error(p, "Android device NOPE is not reachable", "FAKE01")
    p = run("bench", str(et_artifact), "--runner", "native", "--runner-bin", "/no/runner",
            *short, "-o", out)
    assert_one_line_error(p, "/no/runner: the native runner is missing", "make install")
    p = invoke("bench", str(et_artifact), "--backend", "tpu", "-o", out)
    assert p.returncode == 2 and "tpu" in p.stderr
    p = run("bench", str(et_artifact), "--prompt-lengths", "4000", "-o", out)
    assert_one_line_error(p, "exceed", "context of 2048")
    p = run("bench", str(et_artifact), "--weights", "heap", *short, "-o", out)
    assert_one_line_error(p, "--weights heap is a native runner mode", "--runner native")
    p = run("bench", str(et_artifact), "--backend", "coreml", *short, "-o", out)
    assert_one_line_error(p, "Core ML predictions need macOS", "ossedge verify")
    assert not Path(out).exists()


def test_memory_limited_run(et_artifact: Path, tmp_path: Path) -> None:
    try:
        with memory_cgroup(1 << 30):
            pass
    except LimitError as e:
        pytest.skip(f"no memory cgroup here: {e}")
    r = run_bench(et_artifact, backend="executorch", memory_limit="1G", **SHORT)
    _check(r, et_artifact)
    assert r["settings"]["memory_limit_bytes"] == 1 << 30
    assert r["device"]["memory_limit_bytes"] == 1 << 30
    p = run("bench", str(et_artifact), "--memory-limit", "100M", "--prompt-lengths", "16",
            "-o", str(tmp_path / "never.json"))
    assert_one_line_error(p, "out of memory under --memory-limit 100M")
    assert not (tmp_path / "never.json").exists()


def test_report_renders_tables_and_plots(pybindings: dict, tmp_path: Path, tiny_ckpt) -> None:
    import matplotlib.image as mpimg

    ref = run_bench(tiny_ckpt, backend="reference", **SHORT)
    files = []
    for name, r in (("et.json", pybindings), ("ref.json", ref)):
        (tmp_path / name).write_text(json.dumps(r))
        files.append(str(tmp_path / name))
    out = tmp_path / "report"
    p = run("bench", "report", *files, "-o", str(out))
    assert p.returncode == 0, p.stderr
    for png in ("decode_vs_context.png", "ttft_vs_prompt.png", "memory.png"):
        img = mpimg.imread(out / png)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.05, png
    plots = json.loads((out / "plots.json").read_text())
    labels = set(plots["decode_vs_context"])
    assert len(labels) == 2 and any("executorch/pybindings" in x for x in labels)
    assert any("reference/python" in x for x in labels)
    for series in plots["decode_vs_context"].values():
        assert series["x"] == [16, 40] and all(v > 0 for v in series["y"])
    md = (out / "report.md").read_text()
    assert md.count("| ") > 8 and "![decode tok/s vs context](decode_vs_context.png)" in md
    et_row = next(x for x in md.splitlines() if "executorch/pybindings" in x and "| 16 |" in x)
    top = pybindings["roofline"]["roofline_tok_s"]
    share = 100 * pybindings["results"][0]["decode_tok_s"]["median"] / top
    assert f"{share:.0f}% of {top:.1f}" in et_row
    ref_row = next(x for x in md.splitlines() if "reference/python" in x and "| 16 |" in x)
    assert "| — |" in ref_row  # a checkpoint: no bytes per token, no roofline
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    p = run("bench", "report", str(bad), "-o", str(tmp_path / "r2"))
    assert_one_line_error(p, "bad.json: not an ossedge bench result")


def test_llama_cpp_peer_on_the_same_weights(pybindings: dict, tmp_path: Path) -> None:
    from ossedge.benchmarks.harness import run_peer
    from ossedge.benchmarks.peer import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python not installed: pip install llama-cpp-python")
    peer = run_peer(pybindings, gguf=tmp_path / "same.gguf")
    validate(peer)
    assert peer["backend"] == "llama.cpp" and peer["artifact"]["export"]["tensor_types"]["MXFP4"]
    assert peer["settings"]["prompt_lengths"] == [16, 40]
    ours, theirs = _tokens(pybindings), _tokens(peer)
    assert [t[0] for t in theirs] == [t[0] for t in ours]  # same prompt, same weights


def test_run_measured_keeps_stdout_for_the_benchmarks_json(capfd) -> None:
    """The 20b benchmarks time their children with run_measured: wall time and the child's peak
    RSS; the child's output goes to stderr, so the benchmark's stdout parses as one JSON object;
    a failing child stops the benchmark naming the command."""
    grow = "b = bytearray(64 << 20); print('child says hi')"
    wall, peak = run_measured([sys.executable, "-c", grow])
    out, err = capfd.readouterr()
    assert out == "" and "child says hi" in err
    assert wall > 0 and peak > 64 << 20
    with pytest.raises(SystemExit, match="failed with exit code 3"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"])
