"""The gate every conversion ends with (convert/verify.py) against both kinds of error: it must
refuse deliberately wrong exports (exit 3, nothing written) and accept valid ones whose int8
noise flips a router's choice (the seed sweep, benchmarks/verify_sweep.py, covers many seeds)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

import ossedge.convert.pipeline as pipeline_module
import ossedge.targets.executorch.model as et_model
import ossedge.targets.source as source_module
from ossedge.cli.main import main
from ossedge.quantize.qtensor import QTensor
from ossedge.convert import verify
from ossedge.runtime.routing import Routing


class Mutated:
    """A weight source whose weights (`fix(name, weight)`) or config the exporter sees altered."""

    def __init__(self, inner, fix=None, config=None) -> None:
        self._inner, self._fix = inner, fix
        self.config = config or inner.config

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def weight(self, name: str):
        w = self._inner.weight(name)
        return self._fix(name, w) if self._fix else w


def _parts(w: QTensor, fn) -> QTensor:
    return QTensor(w.fmt, w.shape, {k: fn(v) for k, v in w.parts.items()})


def gate_up_swapped(name, w):
    """Gate and up de-interleaved the wrong way round (rows 2j and 2j+1 exchanged)."""
    if not name.endswith(("gate_up_proj", "gate_up_proj_bias")):
        return w
    rows = torch.arange(w.shape[1]).view(-1, 2).flip(-1).reshape(-1)
    swap = lambda t: t.index_select(1, rows)
    return _parts(w, swap) if isinstance(w, QTensor) else swap(w)


def sinks_dropped(name, w):
    return torch.full_like(w, -1e4) if name.endswith("self_attn.sinks") else w


def expert_bias_dropped(name, w):
    return torch.zeros_like(w) if name.endswith("mlp.experts.down_proj_bias") else w


def int4_scales_transposed(name, w):
    """A linear layer's int4 group scales [N, K/32] written in [K/32, N] order."""
    if not (isinstance(w, QTensor) and w.fmt == "int4-g32" and len(w.shape) == 2):
        return w
    scale = w.parts["scale"]
    return QTensor(w.fmt, w.shape, {**w.parts, "scale": scale.t().contiguous().view(scale.shape)})


def lying(cfg, **changes):
    """The config computed with `changes` while it still names the original in the manifest."""
    real = cfg.to_hf_dict()
    bent = dataclasses.replace(cfg, **changes)

    class Bent(type(cfg)):
        def to_hf_dict(self):
            return real

    out = object.__new__(Bent)
    for f in dataclasses.fields(cfg):
        object.__setattr__(out, f.name, getattr(bent, f.name))
    return out


def yarn_truncate_flipped(cfg):
    return lying(cfg, rope_scaling=dataclasses.replace(
        cfg.rope_scaling, truncate=not cfg.rope_scaling.truncate))  # fmt: skip


def window_off_by_one(cfg):
    return lying(cfg, sliding_window=cfg.sliding_window + 1)


WEIGHTS = {"gate-up-swapped": gate_up_swapped, "sinks-dropped": sinks_dropped,
           "expert-bias-dropped": expert_bias_dropped,
           "int4-scales-transposed": int4_scales_transposed}  # fmt: skip
CONFIGS = {"yarn-truncate-flipped": yarn_truncate_flipped, "window-off-by-one": window_off_by_one}


def _mutate_source(monkeypatch, fix=None, bend=None) -> None:
    real = source_module.weight_source

    def mutated(*args, **kwargs):
        src, recipe = real(*args, **kwargs)
        return Mutated(src, fix, bend(src.config) if bend else None), recipe

    # where the conversion pipeline reads its weights
    monkeypatch.setattr(pipeline_module, "weight_source", mutated)


def _position_off_by_one(monkeypatch) -> None:
    """The attention masks built for the position after the real one (a token sees the empty
    slot ahead of it)."""
    real = et_model.ExportableGptOss.masks
    monkeypatch.setattr(et_model.ExportableGptOss, "masks",
                        lambda self, start, pos: real(self, start, pos + 1))  # fmt: skip


MUTATIONS = [(t, m) for t in ("executorch", "onnx", "coreml") for m in (*WEIGHTS, *CONFIGS)]
# ONNX Runtime's GroupQueryAttention and Core ML's host derive positions themselves
MUTATIONS.append(("executorch", "position-off-by-one"))


@pytest.mark.parametrize(("target", "mutation"), MUTATIONS)
def test_a_wrong_export_is_refused(tiny_ckpt, tmp_path, monkeypatch, capsys, target,
                                   mutation) -> None:  # fmt: skip
    if mutation == "position-off-by-one":
        _position_off_by_one(monkeypatch)
    elif mutation in WEIGHTS:
        _mutate_source(monkeypatch, fix=WEIGHTS[mutation])
    else:
        _mutate_source(monkeypatch, bend=CONFIGS[mutation])
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["ossedge", "convert", str(tiny_ckpt), "--target", target,
                                      "-o", str(out)])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main()
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (in-process: library warnings too)
    assert e.value.code == 3, last
    assert last.startswith("error: the converted artifact does not match the reference"), last
    assert not out.exists()  # nothing written


def _routing(ids, logits=None, weights=None) -> Routing:
    ids = torch.tensor(ids)
    w = torch.full(ids.shape, 0.5) if weights is None else torch.tensor(weights)
    return Routing(ids, w, None if logits is None else torch.tensor(logits))


def test_routing_agreement_counts_flips_and_inconsistent_choices() -> None:
    ref = [torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 2.0, 2.01, 3.0]])]
    # token 1: the artifact's logits tip the 2.0 / 2.01 tie the other way: a flip, consistent
    art = [_routing([[0, 1], [3, 1]], [[3.0, 2.0, 1.0, 0.0], [0.0, 2.02, 2.0, 3.0]])]
    r = verify.routing_agreement(art, ref, 2)
    assert (r["decisions"], r["flips"], r["inconsistent"]) == (2, 1, 0)
    assert 0 < r["router_err"] < 0.01
    # choosing experts that are not the top-k of its own logits is a kernel bug
    art = [_routing([[0, 3], [2, 3]], ref[0].tolist())]
    assert verify.routing_agreement(art, ref, 2)["inconsistent"] == 1
    # without logits (Core ML), the weights are held against the reference's softmax
    want = torch.softmax(torch.tensor([3.0, 2.0]), 0).tolist()
    art = [_routing([[0, 1], [2, 3]], weights=[want, [0.9, 0.1]])]
    r = verify.routing_agreement(art, ref, 2)
    assert r["router_logits"] is False
    assert r["router_err"] == pytest.approx(0.9 - torch.softmax(torch.tensor([2.01, 3.0]), 0)[0])


def test_failure_names_what_is_off() -> None:
    ok = {"tolerance": 0.08, "rel_err": 0.3, "rel_err_p90": 0.05,
          "routing": {"router_err_p90": 0.01, "router_logits": True, "inconsistent": 0,
                      "decisions": 10}}  # fmt: skip
    assert verify.failure(ok) is None  # one far-off step (a flip's wake) is not a failure
    assert "90th percentile of steps" in verify.failure({**ok, "rel_err_p90": 0.2})
    bad_router = {**ok, "routing": {**ok["routing"], "router_err_p90": 0.5}}
    assert "router logits off" in verify.failure(bad_router)
    bad_choice = {**ok, "routing": {**ok["routing"], "inconsistent": 2}}
    assert "2 of 10 expert choices" in verify.failure(bad_choice)
    assert verify.failure({**ok, "structure": {"problems": ["expert 3 differs"]}}) == (
        "expert 3 differs")


def test_a_valid_conversion_that_was_refused_passes(synth, tmp_path, monkeypatch) -> None:
    """`synth --preset tiny --seed 2` with the default recipe: against a reference routed on its
    own and with float linear inputs, 90% of the steps were within 0.24 (> 0.08); routed and
    rounded as the artifact, it passes with a wide margin."""
    ckpt, out = synth(seed=2), tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["ossedge", "convert", str(ckpt), "--target", "executorch",
                                      "-o", str(out)])  # fmt: skip
    main()
    v = json.loads((out / "manifest.json").read_text())["verify"]
    assert v["passed"] and v["rel_err_p90"] < v["tolerance"] / 2, v
    assert v["structure"]["ok"] and v["routing"]["inconsistent"] == 0
