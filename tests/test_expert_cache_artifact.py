"""The expert cache on whole ExecuTorch artifacts: with the cache at any budget the program's
logits equal the memory-mapped run's bit for bit (prefill and decode, pybindings and the native
runner); bad budgets and damaged files fail with one clear line; version-1 artifacts still run;
routing profiles are measured, embedded and pinned; synthetic routers can be skewed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from clitools import assert_one_line_error, invoke, run
from steps import greedy_steps

from ossedge.runtime.errors import ArtifactError, BudgetError
from ossedge.targets.executorch.runner import ExecuTorchModel
from ossedge.runtime.expert_cache import CacheOptionError, parse_option, resolve, store_of
from ossedge.targets.executorch.pack import HEADER_BYTES, read_header

GEN = 6


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 4000, (1, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def mapped(et_artifact, prompt) -> torch.Tensor:
    return greedy_steps(ExecuTorchModel(et_artifact, expert_cache="off"), prompt, GEN)


def _stride(artifact: Path) -> int:
    return store_of(json.loads((artifact / "manifest.json").read_text())).stride


@pytest.mark.parametrize("slots", [2, 5, 32], ids=["top-k-slots", "5-slots", "all"])
def test_cache_gives_the_mapped_logits_bitwise(et_artifact, prompt, mapped, slots) -> None:
    model = ExecuTorchModel(et_artifact, expert_cache=slots * _stride(et_artifact))
    got = greedy_steps(model, prompt, GEN)
    assert torch.equal(got, mapped)
    s = model.expert_cache_stats()
    assert s["slots"] == slots and s["direct"] in (0, 1)
    if slots < 32:  # 4 layers x 8 experts: a small cache misses again and again
        assert s["misses"] > 32 - slots
        assert s["bytes_read"] == (s["misses"] + s["prefetched"]) * s["slot_bytes"]
    else:  # every expert read once (the warm-up step read some before the counters reset)
        assert s["misses"] <= 32 and s["hits"] > 0


def test_native_runner_tokens_are_the_same_with_the_cache(et_artifact) -> None:
    from ossedge.benchmarks.harness import native_runner

    tokens = {}
    for option in ("off", str(3 * _stride(et_artifact))):
        p = subprocess.run([str(native_runner()), "--model", str(et_artifact), "--prompt-length",
                            "40", "--gen-tokens", "8", "--runs", "1", "--warmup", "0",
                            "--expert-cache", option], capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout.strip().splitlines()[-1])
        tokens[option] = r["runs"][0]["tokens"]
        if option != "off":
            assert r["expert_cache"]["slots"] == 3
            assert r["runs"][0]["decode_io"]["cache_misses"] > 0
    assert tokens["off"] == tokens[str(3 * _stride(et_artifact))]


def test_options_parse_and_budgets_resolve(et_artifact) -> None:
    assert parse_option("off") == "off" and parse_option(None) == "auto"
    assert parse_option("6G") == 6 << 30 and parse_option("1.5GiB") == 3 << 29
    with pytest.raises(CacheOptionError):
        parse_option("12Q")
    m = json.loads((et_artifact / "manifest.json").read_text())
    store = store_of(m)
    # auto: off where everything fits; else the limit minus the rest and the margin
    assert resolve("auto", m, rest=100 << 20, total=10 << 20, limit=1 << 30) == 0
    budget = resolve("auto", m, rest=100 << 20, total=10 << 40, limit=1 << 30)
    assert budget == min(store.bytes, (1 << 30) - (100 << 20) - (256 << 20))
    with pytest.raises(BudgetError, match="needs at least"):
        resolve("auto", m, rest=1 << 30, total=10 << 40, limit=(1 << 30) + (256 << 20))
    with pytest.raises(BudgetError, match="below the minimum"):
        resolve(store.minimum - 1, m, rest=0, total=0)
    assert resolve(10 << 40, m, rest=0, total=0) == store.bytes  # capped at all the experts


def test_cli_refuses_bad_budgets_in_one_line(et_artifact) -> None:
    p = run("generate", str(et_artifact), "--prompt", "x", "--expert-cache", "1K")
    assert_one_line_error(p, "below the minimum", code=4)
    p = invoke("generate", str(et_artifact), "--prompt", "x", "--expert-cache", "lots")
    assert p.returncode == 2 and "--expert-cache" in p.stderr and "Traceback" not in p.stderr
    p = run("bench", str(et_artifact), "--backend", "reference", "--expert-cache", "1G",
            "-o", "/tmp/never.json")  # fmt: skip
    assert_one_line_error(p, "ExecuTorch option")


def test_generate_with_the_cache_prints_the_same_text(et_artifact) -> None:
    texts = []
    for option in ("off", str(2 * _stride(et_artifact))):
        p = run("generate", str(et_artifact), "--prompt", "class Stack:", "--temperature", "0",
                "--max-new-tokens", "12", "--expert-cache", option)  # fmt: skip
        assert p.returncode == 0, p.stderr
        texts.append(p.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > len("class Stack:")


def test_a_damaged_expert_is_a_clear_error_never_logits(et_artifact, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(et_artifact, bad)
    m = json.loads((bad / "manifest.json").read_text())
    offset = m["experts"]["store"]["offsets"][2] + 3 * _stride(bad) + HEADER_BYTES + 777
    with open(bad / "model.ptd", "r+b") as f:  # one byte of layer 2's expert 3
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ArtifactError, match="expert 3 of layer 2 .* fails its checksum"):
        # at load (its warm-up step) or at the first call that routes a token to that expert
        model = ExecuTorchModel(bad, expert_cache=32 * _stride(bad))
        cache = model.new_cache()
        ids = torch.arange(0, 32)[None]
        for _ in range(8):
            model(ids, cache=cache)
            ids = ids + 32


def test_version_1_artifacts_still_run(et_artifact, prompt, mapped, tmp_path: Path) -> None:
    from ossedge.assets import default_model_dir
    from functools import partial

    from ossedge.convert.pipeline import convert as convert_to

    convert = partial(convert_to, "executorch")

    out = tmp_path / "v1"
    m = convert(default_model_dir(), out, max_context=2048, verify_tokens=0, contract=1)
    assert m["contract_version"] == 1 and m["experts"]["op"] == "ossedge::moe_mxfp4"
    assert store_of(m) is None
    model = ExecuTorchModel(out)  # auto: no cache for version 1
    assert model.expert_cache_bytes == 0
    # the same model as the version-2 artifact: the same logits up to the routing softmax's
    # rounding (torch's in version 1, the kernel's own in version 2) and the same greedy tokens
    got = greedy_steps(model, prompt, GEN)
    assert torch.allclose(got, mapped, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(-1), mapped.argmax(-1))
    with pytest.raises(ArtifactError, match="version-2 artifact"):
        ExecuTorchModel(out, expert_cache=1 << 30)


def test_profile_is_measured_embedded_and_written_into_the_headers(tmp_path: Path) -> None:
    from ossedge.assets import default_model_dir

    prof = tmp_path / "profile.json"
    p = run("profile-experts", "-o", str(prof), "--max-tokens", "512")
    assert p.returncode == 0, p.stderr
    profile = json.loads(prof.read_text())
    assert profile["layers"] == 4 and profile["experts"] == 8 and profile["tokens"] == 512
    assert all(abs(sum(r) - 1) < 1e-9 for r in profile["frequencies"])
    assert sum(map(sum, profile["counts"])) == 512 * 2 * 4  # top-2, 4 layers
    assert max(profile["top_quarter_share"]) > 0.3  # the trained model routes unevenly
    out = tmp_path / "et"
    p = run("convert", str(default_model_dir()), "-o", str(out), "--max-context", "128",
            "--verify-tokens", "0", "--expert-profile", str(prof))  # fmt: skip
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["expert_profile"]["frequencies"] == profile["frequencies"]
    store = m["experts"]["store"]
    with open(out / "model.ptd", "rb") as f:
        for layer in (0, 3):
            f.seek(store["offsets"][layer] + 5 * store["stride"])
            h = read_header(f.read(HEADER_BYTES))
            assert (h["layer"], h["expert"]) == (layer, 5)
            assert h["file_offset"] == store["offsets"][layer] + 5 * store["stride"]
            assert h["frequency"] == pytest.approx(profile["frequencies"][layer][5], rel=1e-6)
    model = ExecuTorchModel(out, expert_cache=16 * store["stride"])
    model(torch.arange(40)[None], cache=model.new_cache())
    s = model.expert_cache_stats()
    assert s["pinned"] > 0 and s["pinned"] <= 16 - 2  # pinned by frequency, LRU slots left


def test_bad_profiles_are_refused(tmp_path: Path) -> None:
    from ossedge.assets import default_model_dir

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "ossedge-expert-profile", "frequencies": [[0.5, 0.5]]}))
    p = run("convert", str(default_model_dir()), "-o", str(tmp_path / "x"), "--expert-profile",
            str(bad))  # fmt: skip
    assert_one_line_error(p, "4 layers × 8 experts")
    p = invoke("profile-experts", "-o", str(tmp_path / "p.json"), "--text", str(tmp_path / "none"))
    assert p.returncode == 2 and not (tmp_path / "p.json").exists()
    assert not (tmp_path / "x").exists()


def test_router_skew_concentrates_routing(tmp_path: Path) -> None:
    from ossedge.runtime.synth import synthesize

    shares = {}
    for skew in (False, True):
        ckpt = synthesize(tmp_path / f"s{skew}", router_skew=skew)
        prof = tmp_path / f"p{skew}.json"
        p = run("profile-experts", str(ckpt), "-o", str(prof), "--max-tokens", "1024")
        assert p.returncode == 0, p.stderr
        shares[skew] = json.loads(prof.read_text())["top_quarter_share"]
    # tiny: 4 experts, top-2, so the top quarter (one expert) takes at most half
    assert min(shares[True]) > 0.45 and max(shares[False]) < min(shares[True])
