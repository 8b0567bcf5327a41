"""The command line on good and broken inputs: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_one_line_error, invoke, run
from safetensors.torch import load_file, save_file

from ossedge.runtime.synth import synthesize


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return synthesize(tmp_path / "tiny", preset_name="tiny", seed=3)


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_path(tmp_path: Path) -> None:
    p = run("inspect", str(tmp_path / "nope"))
    assert_one_line_error(p, "nope", "no such file")


def test_truncated_safetensors(tiny: Path) -> None:
    f = tiny / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    p = run("inspect", str(tiny))
    assert_one_line_error(p, "model.safetensors")


def test_missing_tensor(tiny: Path) -> None:
    name = "model.layers.1.self_attn.sinks"
    _rewrite(tiny / "model.safetensors", lambda t: t.pop(name))
    p = run("generate", str(tiny), "--prompt", "hi", "--max-new-tokens", "2")
    assert_one_line_error(p, name, "missing")


def test_misshaped_tensor(tiny: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(t):
        t[name] = t[name][:-1].clone()

    _rewrite(tiny / "model.safetensors", edit)
    p = run("inspect", str(tiny))
    assert_one_line_error(p, name, "shape")


def test_unknown_config_key(tiny: Path) -> None:
    """A key gpt-oss does not use (here a typo beside the real key) is named in one warning, as
    transformers ignores it; --strict-config refuses it."""
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["num_hiden_layers"] = 4
    (tiny / "config.json").write_text(json.dumps(cfg))
    p = run("inspect", str(tiny))
    assert p.returncode == 0 and p.stderr.count("warning: ") == 1 and "num_hiden_layers" in p.stderr
    p = run("--strict-config", "inspect", str(tiny))
    assert_one_line_error(p, "num_hiden_layers", "config.json")


def test_corrupt_generation_config_prints_nothing(tiny: Path) -> None:
    (tiny / "generation_config.json").write_text("{")
    p = run("generate", str(tiny), "--prompt", "hi", "--max-new-tokens", "2")
    assert_one_line_error(p, "generation_config.json")
    assert p.stdout == ""


def test_debug_shows_traceback(tmp_path: Path) -> None:
    p = run("--debug", "inspect", str(tmp_path / "nope"))
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_synth_refuses_to_overwrite_and_keeps_old(tiny: Path) -> None:
    before = (tiny / "model.safetensors").read_bytes()
    p = run("synth", str(tiny), "--preset", "tiny", "--seed", "9")
    assert_one_line_error(p, "already exists", "--force")
    assert (tiny / "model.safetensors").read_bytes() == before
    assert not list(tiny.parent.glob(".*partial"))


def test_usage_error_exit_code(tmp_path: Path) -> None:
    p = invoke("synth", str(tmp_path / "x"), "--preset", "70b")
    assert p.returncode == 2 and "70b" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()


def test_bad_sampling_argument(tiny: Path) -> None:
    p = invoke("generate", str(tiny), "--prompt", "hi", "--top-p", "1.5")
    assert p.returncode == 2 and "top" in p.stderr.lower() and "Traceback" not in p.stderr


def test_synth_inspect_generate_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert run("synth", str(out), "--preset", "tiny", "--layout", "original").returncode == 0
    p = run("inspect", str(out), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["layout"] == "original" and s["experts"] == "mxfp4"
    assert s["validation"].startswith("ok")
    # tiny: 4 layers × 4 experts × (128·64 + 128 + 64·64 + 64) expert weights, the rest dense.
    expert = 4 * 4 * (128 * 64 + 128 + 64 * 64 + 64)
    assert s["parameters"]["total"] > expert > s["parameters"]["active"] - expert
    p = run("generate", str(out), "--prompt", "The fox", "--max-new-tokens", "5", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("The fox")
    again = run("generate", str(out), "--prompt", "The fox", "--max-new-tokens", "5", "--seed", "1")
    assert again.stdout == p.stdout


def test_chat_reads_stdin(tiny: Path) -> None:
    p = run("chat", str(tiny), "--max-new-tokens", "4", "--seed", "0", stdin="hello\nagain\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    # Random weights rarely write a final channel; each of the two turns must report either an
    # answer on stdout or its missing answer on stderr, with at most 4 tokens.
    notes = [line for line in p.stderr.splitlines() if line.startswith("[no final answer")]
    answers = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(notes) + len(answers) == 2, (p.stdout, p.stderr)
    assert all(int(n.split(":")[1].split()[0]) <= 4 for n in notes)


def test_inspect_counts_the_20b_preset() -> None:
    from ossedge.runtime.checkpoint import expected_tensors
    from ossedge.runtime.config import preset

    cfg = preset("20b")
    total = 0
    for spec in expected_tensors(cfg):
        if spec.name.endswith("_scales"):
            continue
        total += torch.Size(spec.shape).numel() * (2 if spec.name.endswith("_blocks") else 1)
    assert 20.8e9 < total < 21.0e9  # "21 B parameters"
