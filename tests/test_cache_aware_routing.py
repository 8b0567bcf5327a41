"""Cache-aware routing (`--cache-aware-routing K`, lossy and off by default): the kernel's rule
against its definition; exact when every candidate is cached; on a small cache it reads fewer
experts at a measured cost (eval on the artifact, scored in decode calls); bad options fail in
one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_one_line_error, run
from hypothesis import given, settings
from hypothesis import strategies as st
from steps import greedy_steps

from ossedge.assets import default_model_dir
from ossedge.targets.executorch.runner import ExecuTorchModel
from ossedge.targets.executorch.library import _loaded
from ossedge.runtime.expert_cache import CacheOptionError, route, routing_pool, store_of


def expected(logits: np.ndarray, k: int, keep: int, pool: int, resident: np.ndarray):
    """The rule as documented: the router's top `keep`, then cached experts of its top `pool` in
    its order, then its next best; softmax over the chosen logits, highest first."""
    order = sorted(range(len(logits)), key=lambda e: (-logits[e], e))
    chosen = order[:keep]
    chosen += [e for e in order[keep:pool] if resident[e]][: k - len(chosen)]
    chosen += [e for e in order[keep:] if e not in chosen][: k - len(chosen)]
    chosen.sort(key=lambda e: (-logits[e], e))
    w = np.exp(logits[chosen].astype(np.float64) - logits[chosen[0]])
    return chosen, w / w.sum(), len(set(order[:k]) - set(chosen))


@st.composite
def cases(draw):
    e = draw(st.integers(2, 32))
    k = draw(st.integers(1, min(e, 8)))
    keep = draw(st.integers(0, k))
    pool = draw(st.integers(0, e))
    # few distinct values, so that ties (lower index first) are exercised
    logits = np.array(draw(st.lists(st.sampled_from([-1.5, 0.0, 0.25, 2.0, 3.5]), min_size=e,
                                    max_size=e)), dtype=np.float32)  # fmt: skip
    resident = np.array(draw(st.lists(st.booleans(), min_size=e, max_size=e)), dtype=np.uint8)
    return logits, k, keep, pool, resident


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_kernel_rule_is_the_documented_one(case) -> None:
    logits, k, keep, pool, resident = case
    lib = _loaded()[0]
    ids, weights, changed = route(lib, logits, k, keep, pool, resident)
    want, w, n = expected(logits, k, keep, pool, resident)
    assert ids == want and changed == n
    np.testing.assert_allclose(weights, w, rtol=1e-6)
    assert len(set(ids)) == k
    # the kept experts are always there; with everything cached the choice is the exact top-k
    assert set(ids) >= set(sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:keep])
    exact, _, none = route(lib, logits, k, keep, pool, np.ones_like(resident))
    assert none == 0 and exact == expected(logits, k, k, 0, resident)[0]


GEN = 8


def _stride(artifact: Path) -> int:
    return store_of(json.loads((artifact / "manifest.json").read_text())).stride


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 4000, (1, 40), generator=torch.Generator().manual_seed(5))


def test_routing_is_exact_when_every_expert_is_cached(et_artifact, prompt) -> None:
    exact = greedy_steps(ExecuTorchModel(et_artifact, expert_cache="off"), prompt, GEN)
    model = ExecuTorchModel(et_artifact, expert_cache=32 * _stride(et_artifact),
                            cache_aware_routing=1)  # fmt: skip
    for seed in range(8):  # prefills (routed exactly) until every expert has been read
        if model.expert_cache_stats()["resident"] == 32:
            break
        model(torch.randint(0, 4000, (1, 32), generator=torch.Generator().manual_seed(seed)),
              cache=model.new_cache())  # fmt: skip
    assert model.expert_cache_stats()["resident"] == 32
    assert torch.equal(greedy_steps(model, prompt, GEN), exact)
    assert model.expert_cache_stats()["rerouted"] == 0


def test_a_small_cache_reroutes_reads_less_and_changes_the_logits(et_artifact, prompt) -> None:
    budget = 6 * _stride(et_artifact)
    runs = {}
    for keep in (0, 1):
        model = ExecuTorchModel(et_artifact, expert_cache=budget, cache_aware_routing=keep)
        logits = greedy_steps(model, prompt, GEN)
        runs[keep] = (logits, model.expert_cache_stats())
    (exact, s0), (routed, s1) = runs[0], runs[1]
    assert s0["rerouted"] == 0 and s1["rerouted"] > 0
    assert s1["misses"] < s0["misses"]
    assert torch.equal(routed[0], exact[0])  # the prefill routes exactly
    assert not torch.equal(routed, exact)
    assert model.routing_pool == 4  # twice the 2 experts per token (of 8)


def test_eval_on_an_artifact_measures_what_routing_costs(et_artifact) -> None:
    out = {}
    for keep in ("0", "1"):
        p = run("eval", str(et_artifact), "--reference", str(default_model_dir()), "--max-tokens",
                "300", "--window", "150", "--expert-cache", str(8 * _stride(et_artifact)),
                "--cache-aware-routing", keep, "--json")  # fmt: skip
        assert p.returncode == 0, p.stderr
        out[keep] = json.loads(p.stdout)
    exact, routed = out["0"], out["1"]
    assert exact["model"]["layout"] == "executorch artifact" and exact["tokens_scored"] == 298
    # scored in decode calls: the quantized artifact stays close to its unquantized reference
    assert exact["kl_mean"] < 0.05 and exact["top1_agreement"] > 0.85
    assert exact["expert_cache"]["rerouted_share"] == 0
    assert routed["expert_cache"]["rerouted_share"] > 0
    assert routed["expert_cache"]["hit_rate"] > exact["expert_cache"]["hit_rate"]
    assert routed["kl_mean"] > exact["kl_mean"]


def test_bad_routing_options_fail_in_one_line(et_artifact, tmp_path: Path) -> None:
    small = str(4 * _stride(et_artifact))
    cases = [
        (["--cache-aware-routing", "1"], "needs the expert cache"),  # auto: off, it fits
        (["--expert-cache", small, "--cache-aware-routing", "2"], "below the model's 2"),
        (["--expert-cache", small, "--cache-aware-routing", "1", "--routing-pool", "9"],
         "at most the 8 experts"),
        (["--expert-cache", small, "--routing-pool", "4"], "needs --cache-aware-routing"),
    ]
    for extra, needle in cases:
        p = run("generate", str(et_artifact), "--prompt", "x", *extra)
        assert_one_line_error(p, needle, code=2)
    p = run("eval", str(et_artifact), "--reference", str(default_model_dir()), "--window", "4000")
    assert p.returncode == 2 and "context of 2048; give --window 2048 or less" in p.stderr
    p = run("generate", str(default_model_dir()), "--prompt", "x", "--cache-aware-routing", "1")
    assert_one_line_error(p, "applies to ExecuTorch artifacts", code=2)
    with pytest.raises(CacheOptionError, match="needs the expert cache"):
        routing_pool(store_of(json.loads((et_artifact / "manifest.json").read_text())), 1, None,
                     budget=0)  # fmt: skip


def test_native_runner_reroutes_and_refuses_bad_options(et_artifact) -> None:
    from ossedge.benchmarks.harness import native_runner

    base = [str(native_runner()), "--model", str(et_artifact), "--prompt-length", "40",
            "--gen-tokens", "8", "--runs", "1", "--warmup", "0"]  # fmt: skip
    p = subprocess.run([*base, "--expert-cache", str(6 * _stride(et_artifact)),
                        "--cache-aware-routing", "1"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["expert_cache"]["cache_aware_routing"] == 1 and r["expert_cache"]["routing_pool"] == 4
    assert r["runs"][0]["decode_io"]["rerouted"] > 0
    p = subprocess.run([*base, "--expert-cache", "off", "--cache-aware-routing", "1"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 1 and "needs the expert cache" in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("runner", ["pybindings", "native"])
def test_bench_passes_routing_to_its_runner(et_artifact, runner, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = run("bench", str(et_artifact), "--runner", runner, "--prompt-lengths", "16",
            "--gen-tokens", "4", "--runs", "1", "--warmup", "0", "--expert-cache",
            str(6 * _stride(et_artifact)), "--cache-aware-routing", "1", "-o", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["settings"]["cache_aware_routing"] == 1
    assert len(r["results"][0]["raw"]["runs"][0]["tokens"]) == 4
    p = run("bench", str(default_model_dir()), "--backend", "reference", "--cache-aware-routing",
            "1", "-o", str(tmp_path / "x.json"))  # fmt: skip
    assert_one_line_error(p, "is an ExecuTorch option")
