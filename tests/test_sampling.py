import math

import pytest
import torch

from ossedge.runtime.sampling import Sampler

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9, -1.0])  # ranks: 1, 4, 2, 0, 3, 5


def draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    return [sampler.sample(logits) for _ in range(n)]


@pytest.mark.parametrize("seed", [None, 0, 7], ids=["unseeded", "seed0", "seed7"])
def test_temperature_zero_is_argmax(seed):
    s = Sampler(temperature=0, seed=seed, top_k=3, top_p=0.5)
    assert s.greedy
    assert draws(s, LOGITS, 5) == [1] * 5
    assert s.sample(torch.tensor([2.0, 5.0, 5.0])) == 1  # first maximum on ties


def test_top_k_one_is_argmax_at_any_temperature():
    assert set(draws(Sampler(temperature=5.0, top_k=1, seed=0), LOGITS, 50)) == {1}


def test_top_k_keeps_only_the_k_best():
    got = draws(Sampler(temperature=3.0, top_k=3, seed=1), LOGITS, 600)
    assert set(got) == {1, 4, 2}


@pytest.mark.parametrize(
    "top_p,allowed",
    [(0.45, {0}), (0.55, {0, 1}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
    ids=["p0.45", "p0.55", "p0.7", "p0.85", "p1"],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, allowed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    got = set(draws(Sampler(top_p=top_p, seed=2), logits, 800))
    assert got == allowed


def test_top_k_then_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-2 renormalises to [4/7, 3/7]; top_p 0.5 then keeps only the first
    assert set(draws(Sampler(top_k=2, top_p=0.5, seed=0), logits, 300)) == {0}
    assert set(draws(Sampler(top_k=2, top_p=0.6, seed=0), logits, 300)) == {0, 1}


def test_same_seed_same_draws_different_seed_different_draws():
    a = draws(Sampler(temperature=1.5, seed=123), LOGITS, 60)
    assert a == draws(Sampler(temperature=1.5, seed=123), LOGITS, 60)
    assert a != draws(Sampler(temperature=1.5, seed=124), LOGITS, 60)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=["t0.5", "t1", "t2"])
def test_frequencies_follow_tempered_softmax(temperature):
    n = 6000
    got = draws(Sampler(temperature=temperature, seed=5), LOGITS, n)
    expected = torch.softmax(LOGITS / temperature, dim=0)
    for i, p in enumerate(expected.tolist()):
        freq = got.count(i) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (i, freq, p)


def test_accepts_batch_of_one_and_rejects_other_shapes():
    s = Sampler(temperature=0)
    assert s.sample(LOGITS[None]) == 1
    with pytest.raises(ValueError, match="shape"):
        s.sample(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="NaN"):
        s.sample(torch.tensor([0.0, float("nan")]))


def test_masked_logits():
    logits = torch.tensor([float("-inf"), 0.0, float("-inf")])
    assert set(draws(Sampler(seed=0), logits, 20)) == {1}
    with pytest.raises(ValueError, match="no valid probabilities"):
        Sampler(seed=0).sample(torch.full((3,), float("-inf")))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "finite"),
        ({"temperature": float("inf")}, "finite"),
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"seed": "42"}, "seed"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)
