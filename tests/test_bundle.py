"""App bundles: round trip, contents, and tamper detection by `ossedge verify BUNDLE`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clitools import assert_one_line_error, invoke, run

from ossedge.runtime.errors import ArtifactError
from ossedge.targets.bundle import make_bundle, verify_bundle


@pytest.fixture(scope="module")
def android(tmp_path_factory, et_artifact: Path) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "android"
    p = run("bundle", str(et_artifact), "--platform", "android", "--device", "pixel-9-pro",
            "-o", str(out))
    assert p.returncode == 0, p.stderr
    return out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_android_bundle_lists_and_checks_every_file(android: Path, et_artifact: Path) -> None:
    m = json.loads((android / "manifest.json").read_text())
    assert m["format"] == "ossedge-bundle" and m["contract_version"] == 1
    assert set(m["files"]) == _files(android) - {"manifest.json"}
    for name in ("model.pte", "model.ptd", "tokenizer.json", "manifest.json"):
        assert f"models/tiny-et/{name}" in m["files"]
    art = json.loads((et_artifact / "manifest.json").read_text())
    assert m["files"]["models/tiny-et/model.ptd"]["sha256"] == art["files"]["model.ptd"]["sha256"]
    assert {"android/OssedgeLlm.kt", "android/CMakeLists.txt", "android/README.md",
            "android/ossedge_kernels/moe_et.cpp", "android/ossedge_kernels/CMakeLists.txt"} <= set(
        m["files"])
    kt = (android / "android/OssedgeLlm.kt").read_text()
    assert "{{" not in kt and "LlmModule(" in kt and "model.ptd" in kt
    tokens = m["harmony_tokens"]
    assert tokens["<|start|>"] != tokens["<|end|>"] and tokens["<|return|>"] in m["generation"][
        "eos_token_ids"]
    assert m["generation"]["max_context"] == 2048
    plan = m["device_plan"]
    assert plan["device"]["name"] == "pixel-9-pro"
    assert plan["models"]["tiny-et"]["fits"] == "resident"
    p = run("verify", str(android), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["passed"] and r["files_checked"] == len(m["files"])


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("flip", "sha256 differs"),
        ("truncate", "bytes, the bundle manifest records"),
        ("delete", "missing from the bundle"),
    ],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_tampered_bundle_fails_naming_the_file(android: Path, tmp_path: Path, damage, needle):
    bad = tmp_path / "bad"
    shutil.copytree(android, bad)
    target = bad / "models/tiny-et/model.ptd"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:
        target.unlink()
    p = run("verify", str(bad))
    assert_one_line_error(p, "models/tiny-et/model.ptd", needle, code=1)


def test_unknown_contract_version_is_refused(android: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(android, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["contract_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="bundle contract version 99"):
        verify_bundle(bad)


def test_ios_bundle_holds_coreml_and_executorch(
    tmp_path: Path, coreml_artifact: Path, et_artifact: Path
) -> None:
    m = make_bundle([coreml_artifact, et_artifact], tmp_path / "ios", platform="ios")
    assert [x["target"] for x in m["models"]] == ["coreml", "executorch"]
    assert {"ios/Package.swift", "ios/Sources/OssedgeCoreML/OssedgeCoreML.swift",
            "ios/README.md"} <= set(m["files"])
    assert "models/tiny-coreml/embedding.safetensors" in m["files"]
    assert verify_bundle(tmp_path / "ios")["passed"]


def test_bad_bundle_inputs_are_one_line_errors(
    tmp_path: Path, coreml_artifact: Path, et_artifact: Path
) -> None:
    p = run("bundle", str(coreml_artifact), "--platform", "android", "-o", str(tmp_path / "a"))
    assert_one_line_error(p, "a coreml artifact does not run on android")
    p = run("bundle", str(tmp_path), "--platform", "ios", "-o", str(tmp_path / "b"))
    assert_one_line_error(p, "not an ossedge artifact")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(et_artifact, corrupt)
    data = bytearray((corrupt / "model.pte").read_bytes())
    data[-10] ^= 0xFF
    (corrupt / "model.pte").write_bytes(bytes(data))
    p = run("bundle", str(corrupt), "--platform", "android", "-o", str(tmp_path / "c"))
    assert_one_line_error(p, "model.pte: sha256 differs from its artifact's manifest")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["corrupt"]  # nothing half-written
    p = invoke("verify", str(et_artifact))
    assert p.returncode == 2 and "--reference CKPT is required" in p.stderr
