"""What every registered target's artifact must do, parametrized over the registry: a target gets
these checks by registering (its conversion: the shared `artifact_of` fixture). The contract
(format, versions, the files with their sizes and sha256, the verify record), `ossedge verify`'s
JSON and its failure exit, and the one-line errors for a missing, truncated or tampered file and
a tampered manifest — nothing written, nothing half-read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clitools import assert_one_line_error, run
from shared_artifacts import VERIFY_TOKENS

from ossedge.assets import default_model_dir
from ossedge.benchmarks import structure
from ossedge.targets import TARGETS, artifact_format, open_artifact, target_of

NAMES = list(TARGETS)


@pytest.fixture(params=NAMES)
def target(request) -> str:
    return request.param


@pytest.fixture
def artifact(artifact_of, target) -> Path:
    return artifact_of(target)


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _largest(manifest: dict) -> str:
    """The artifact's largest file (the weights)."""
    return max(manifest["files"], key=lambda n: manifest["files"][n]["bytes"])


def _verify(art: Path, *extra: str):
    return run("verify", str(art), "--reference", str(default_model_dir()), "--tokens", "40",
               *extra)  # fmt: skip


def test_contract(artifact: Path, target: str) -> None:
    t = TARGETS[target]
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format"] == t.format and m["contract_version"] == t.contract in t.reads
    assert target_of(artifact) is t and artifact_format(artifact) == target
    assert set(t.files or ()) <= set(m["files"]) and "tokenizer.json" in m["files"]
    listed = {str(p.relative_to(artifact)) for p in artifact.rglob("*") if p.is_file()}
    assert listed == set(m["files"]) | {"manifest.json"}  # every file, and only those, listed
    for name, f in m["files"].items():
        assert (artifact / name).stat().st_size == f["bytes"]
    assert m["total_bytes"] == sum(f["bytes"] for f in m["files"].values())
    assert t.read_manifest(artifact, checksums=True) == m
    v = m["verify"]  # the conversion verified it, into its manifest
    assert v["passed"] and v["tokens"] == VERIFY_TOKENS and v["target"] == target
    assert v["tolerance"] == t.tolerance(m, v["linear_activations"])


def test_opens_behind_the_generation_contract(artifact: Path, target: str) -> None:
    import torch

    # engine: Core ML's interpreter where Core ML cannot predict (the other targets take no engine)
    model = open_artifact(artifact, engine="interpreter")
    assert model.manifest["format"] == TARGETS[target].format
    cache = model.new_cache()
    logits = model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert logits.shape == (1, 1, model.config.vocab_size) and cache.position == 3


def test_verify_json_and_failure_exit(artifact: Path, target: str) -> None:
    p = _verify(artifact, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("max_abs_err", "rel_err", "rel_err_p90", "top1_same", "routing", "kl_mean",
                "top1", "tokens", "tolerance", "linear_activations", "recipe", "passed"):
        assert key in r, key
    assert r["passed"] and r["tokens"] == 40 and r["target"] == target
    assert r["routing"]["decisions"] == 40 * 4 and r["routing"]["inconsistent"] == 0
    p = _verify(artifact, "--tolerance", "1e-12")
    assert_one_line_error(p, "at the 90th percentile of steps", code=3)


def test_a_missing_file_is_named(artifact: Path, tmp_path: Path) -> None:
    broken = _copy(artifact, tmp_path)
    name = _largest(json.loads((broken / "manifest.json").read_text()))
    (broken / name).unlink()
    assert_one_line_error(_verify(broken), f"{name}: missing")


def test_a_truncated_file_is_named(artifact: Path, tmp_path: Path) -> None:
    broken = _copy(artifact, tmp_path)
    name = _largest(json.loads((broken / "manifest.json").read_text()))
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 2])
    assert_one_line_error(_verify(broken), name, "truncated")


def _tampered(artifact: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the artifact with one byte of its largest file flipped, and that file's name."""
    broken = _copy(artifact, tmp_path)
    name = _largest(json.loads((broken / "manifest.json").read_text()))
    raw = bytearray((broken / name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (broken / name).write_bytes(bytes(raw))
    return broken, name


def test_a_tampered_file_is_caught_by_its_checksum(artifact: Path, tmp_path: Path) -> None:
    broken, name = _tampered(artifact, tmp_path)
    assert_one_line_error(_verify(broken), name, "sha256 differs")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(contract_version=99), "contract version 99"),
    (lambda m: m.update(format="ossedge-something-else"), "not an ossedge"),
])  # fmt: skip
def test_a_tampered_manifest_is_refused(artifact: Path, tmp_path: Path, edit, needle) -> None:
    broken = _copy(artifact, tmp_path)
    m = json.loads((broken / "manifest.json").read_text())
    edit(m)
    (broken / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(_verify(broken), needle)


def test_an_unreadable_manifest_is_refused(artifact: Path, tmp_path: Path) -> None:
    broken = _copy(artifact, tmp_path)
    (broken / "manifest.json").write_text("{not json")
    assert_one_line_error(_verify(broken), "manifest.json")


def test_the_benchmarks_structure_check(artifact: Path, target: str, tmp_path: Path) -> None:
    """benchmarks/structure.py runs the target's structure check over the whole artifact, every
    file hashed, in a child process with its own time and peak RSS; a tampered file fails it in
    one line naming the file, and a target without a check or a directory that is no artifact is
    refused."""
    ckpt = str(default_model_dir())
    with pytest.raises(SystemExit, match="not an artifact of a target with a structure check"):
        structure.check(str(tmp_path), ckpt)
    if TARGETS[target].hook("check_structure") is None:
        with pytest.raises(SystemExit, match="not an artifact of a target with a structure check"):
            structure.check(str(artifact), ckpt)
        return
    r = structure.in_child(str(artifact), ckpt)
    assert r["ok"] and r["problems"] == []
    assert r["wall_s"] >= r["seconds"] >= 0 and r["peak_rss_gb"] > 0
    broken, name = _tampered(artifact, tmp_path)
    with pytest.raises(SystemExit) as e:
        structure.in_child(str(broken), ckpt)
    assert "the structure check failed" in str(e.value) and "sha256 differs" in str(e.value)
    assert name in str(e.value) and "Traceback" not in str(e.value)
