"""The native benchmark runner (benchmarks/runner, built by `make install`) on an ExecuTorch
artifact of the bundled model: its JSON report, greedy tokens equal to the Python ExecuTorch
path's, and its refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from shared_artifacts import ARTIFACT_OPTIONS
from clitools import assert_one_line_error

from ossedge.targets.executorch.runner import ExecuTorchModel


ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "runner" / "bin" / "ossedge_runner"
CONTEXT = ARTIFACT_OPTIONS["executorch"]["max_context"]


@pytest.fixture(scope="module")
def artifact(et_artifact) -> Path:
    return et_artifact


@pytest.fixture(scope="module")
def runner() -> Path:
    if not RUNNER.is_file():
        pytest.fail(f"{RUNNER} is missing: run `make install` to build the native runner")
    return RUNNER


def run(runner: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=300)


def report(runner: Path, *args: str) -> dict:
    p = run(runner, *args)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)  # the whole of stdout is the one JSON object


def python_greedy(artifact: Path, ids: list[int], gen: int) -> list[int]:
    m = ExecuTorchModel(artifact)
    cache = m.new_cache()
    logits = m(torch.tensor([ids]), cache=cache)
    tokens = [int(logits.reshape(-1).argmax())]
    while len(tokens) < gen:
        logits = m(torch.tensor([[tokens[-1]]]), cache=cache)
        tokens.append(int(logits.reshape(-1).argmax()))
    return tokens


def test_report(runner, artifact):
    r = report(runner, "--model", str(artifact), "--prompt-length", "128", "--gen-tokens", "32",
               "--runs", "3", "--warmup", "1", "--threads", "2")
    assert r["runner"] == "ossedge_runner"
    assert (r["prompt_tokens"], r["gen_tokens"], r["warmup_runs"], r["threads"]) == (128, 32, 1, 2)
    assert (r["max_seq_len"], r["max_context"]) == (32, CONTEXT)
    assert r["load_s"] > 0
    assert len(r["runs"]) == 3
    for run_ in r["runs"]:
        assert run_["ttft_s"] == run_["prefill_s"] > 0
        assert run_["decode_s"] > 0
        assert run_["prefill_tok_s"] > 0 and run_["decode_tok_s"] > 0
        assert len(run_["tokens"]) == 32
        assert run_["tokens"] == r["runs"][0]["tokens"]  # same prompt, cache restarted
    assert {"VmHWM", "VmRSS", "RssAnon", "RssFile"} <= set(r["rss"]) <= {
        "VmHWM", "VmRSS", "RssAnon", "RssFile", "AnonHugePages"}
    assert r["weights"] == "mmap" and r["mlock"] is False
    assert r["rss"]["VmHWM"] >= r["rss"]["VmRSS"] > 0
    assert r["major_faults"] >= 0


def test_tokens_match_python(runner, artifact):
    vocab = json.loads((artifact / "manifest.json").read_text())["methods"]["get_vocab_size"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (45,), generator=g).tolist()  # two prefill chunks
    gen = 20
    r = report(runner, "--model", str(artifact), "--prompt-ids", ",".join(map(str, ids)),
               "--gen-tokens", str(gen), "--runs", "2", "--warmup", "0")
    assert r["prompt_tokens"] == len(ids) and len(r["runs"]) == 2
    expected = python_greedy(artifact, ids, gen)
    for run_ in r["runs"]:
        assert run_["tokens"] == expected


def test_weights_in_the_heap_give_the_same_tokens(runner, artifact):
    common = ["--model", str(artifact), "--prompt-length", "40", "--gen-tokens", "10", "--runs",
              "1", "--warmup", "0"]
    mapped = report(runner, *common)
    heap = report(runner, *common, "--weights", "heap")
    assert heap["weights"] == "heap"
    assert heap["runs"][0]["tokens"] == mapped["runs"][0]["tokens"]
    # the .ptd is copied into anonymous memory instead of being mapped from the file
    ptd = (artifact / "model.ptd").stat().st_size
    assert heap["rss"]["RssAnon"] - mapped["rss"]["RssAnon"] > 0.9 * ptd
    assert heap["rss"]["RssFile"] < mapped["rss"]["RssFile"]


def test_bad_weights_mode(runner, artifact):
    p = run(runner, "--model", str(artifact), "--weights", "disk")
    assert_one_line_error(p, "--weights needs mmap or heap", "disk")
    p = run(runner, "--model", str(artifact), "--weights", "heap", "--mlock")
    assert_one_line_error(p, "--mlock", "--weights heap")


def test_seed_changes_prompt(runner, artifact):
    common = ["--model", str(artifact), "--prompt-length", "16", "--gen-tokens", "8", "--runs",
              "1", "--warmup", "0"]
    a = report(runner, *common, "--seed", "1")["runs"][0]["tokens"]
    b = report(runner, *common, "--seed", "1")["runs"][0]["tokens"]
    c = report(runner, *common, "--seed", "2")["runs"][0]["tokens"]
    assert a == b != c


def test_missing_model_dir(runner, tmp_path):
    assert_one_line_error(run(runner, "--model", str(tmp_path / "nope")), "no such model directory")


def test_missing_file(runner, artifact, tmp_path):
    for name in ("model.pte", "manifest.json"):
        (tmp_path / name).symlink_to(artifact / name)
    assert_one_line_error(run(runner, "--model", str(tmp_path)), "model.ptd", "missing")


def test_prompt_longer_than_context(runner, artifact):
    p = run(runner, "--model", str(artifact), "--prompt-length", str(CONTEXT + 44))
    assert_one_line_error(p, "exceed", str(CONTEXT))
    p = run(runner, "--model", str(artifact), "--prompt-length", str(CONTEXT - 6), "--gen-tokens",
            "7")
    assert_one_line_error(p, "exceed", str(CONTEXT))


def test_missing_kernel_library(runner, artifact, tmp_path):
    p = run(runner, "--model", str(artifact), "--kernels", str(tmp_path / "libnone.so"))
    assert_one_line_error(p, "kernel library")
