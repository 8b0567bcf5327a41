"""Quantized checkpoints: what `quantize_checkpoint` writes equals the recipe applied in memory,
the manifest accounts for every tensor and byte, and broken ones fail loudly and cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from clitools import assert_one_line_error, invoke, run
from safetensors import safe_open

from ossedge.quantize.qtensor import QTensor
from ossedge.quantize.recipes import RECIPES
from ossedge.runtime.checkpoint import logical_tensors, open_checkpoint
from ossedge.runtime.errors import CheckpointError, ConfigError
from ossedge.runtime.model import build_model, load_model
from ossedge.runtime.checkpoint import MANIFEST
from ossedge.runtime.quantized import QuantizedView, quantize_checkpoint, recipe_bytes

IDS = torch.tensor([[5, 17, 300, 2, 99, 41, 7, 260, 511, 3, 18, 77]])


@pytest.fixture(scope="module")
def quantized(tiny_ckpt: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q")
    return {r: quantize_checkpoint(tiny_ckpt, root / r, recipe=r) for r in RECIPES}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_written_equals_recipe_applied_in_memory(
    recipe: str, quantized: dict[str, Path], tiny_ckpt: Path
) -> None:
    from_disk = load_model(quantized[recipe], verify=True)(IDS)
    in_memory = build_model(QuantizedView(open_checkpoint(tiny_ckpt), recipe))(IDS)
    assert torch.equal(from_disk, in_memory)


def test_native_is_the_source_exactly(quantized: dict[str, Path], tiny_ckpt: Path) -> None:
    assert torch.equal(load_model(quantized["native"])(IDS), load_model(tiny_ckpt)(IDS))


@pytest.mark.parametrize("recipe", ["native", "mobile", "mobile-int8"])
def test_mxfp4_expert_bytes_are_untouched(
    recipe: str, quantized: dict[str, Path], tiny_ckpt: Path
) -> None:
    src, q = open_checkpoint(tiny_ckpt), open_checkpoint(quantized[recipe])
    names = [n for n in src.names() if n.endswith(("_blocks", "_scales"))]
    assert names
    for n in names:
        assert torch.equal(src.get(n), q.get(n)), n


def test_formats_follow_the_recipe(quantized: dict[str, Path], tiny_ckpt: Path) -> None:
    cfg = open_checkpoint(tiny_ckpt).config
    for recipe, path in quantized.items():
        m = json.loads((path / MANIFEST).read_text())
        assert m["recipe"]["name"] == recipe
        for name, shape in logical_tensors(cfg):
            assert m["tensors"][name]["format"] == RECIPES[recipe].format_for(name, shape)
            assert m["tensors"][name]["shape"] == list(shape)


def test_int4_recipe_stores_int4_experts(quantized: dict[str, Path]) -> None:
    q = open_checkpoint(quantized["int4"])
    w = q.weight("model.layers.0.mlp.experts.gate_up_proj")
    assert isinstance(w, QTensor) and w.fmt == "int4-g32"
    assert not any(n.endswith("_blocks") for n in q.names())


def test_manifest_accounts_for_every_file_and_byte(
    quantized: dict[str, Path], tiny_ckpt: Path
) -> None:
    cfg = open_checkpoint(tiny_ckpt).config
    for recipe, path in quantized.items():
        m = json.loads((path / MANIFEST).read_text())
        on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
        assert set(m["files"]) == on_disk
        assert {"config.json", "tokenizer.json", "generation_config.json"} <= on_disk
        for fname, f in m["files"].items():
            data = (path / fname).read_bytes()
            assert f["bytes"] == len(data)
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert m["total_bytes"] == sum(f["bytes"] for f in m["files"].values())
        # tensor bytes add up, and match the size predicted from shapes alone
        predicted = recipe_bytes(cfg, recipe)
        assert m["bytes_by_format"] == {k: v for k, v in predicted.items() if k != "total"}
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            stored = sum(f.get_tensor(k).nbytes for k in f.keys())
        assert stored == predicted["total"]


def test_20b_sizes_are_ordered_sensibly() -> None:
    from ossedge.runtime.config import preset

    cfg = preset("20b")
    size = {r: recipe_bytes(cfg, r)["total"] for r in RECIPES}
    assert 12.5e9 < size["native"] < 14e9  # the released checkpoint is ~13 GB
    assert size["mobile"] < size["mobile-int8"] < size["native"]
    assert size["int4"] > size["mobile"]  # int4 g32 with fp16 scales: 4.5 bits vs MXFP4's 4.25


def test_dense_and_original_sources_give_the_same_weights(
    synth, tiny_ckpt: Path, tmp_path: Path
) -> None:
    ref = load_model(quantize_checkpoint(tiny_ckpt, tmp_path / "hf", recipe="mobile"))(IDS)
    orig = quantize_checkpoint(synth(layout="original"), tmp_path / "orig", recipe="mobile")
    assert torch.equal(load_model(orig)(IDS), ref)
    # dense experts are the decoded MXFP4 values: encoding them again gives the same values
    dense = quantize_checkpoint(synth(expert_format="dense"), tmp_path / "dense", recipe="mobile")
    assert torch.allclose(load_model(dense)(IDS), ref, atol=1e-5)


def test_sharded_output(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = quantize_checkpoint(tiny_ckpt, tmp_path / "s", recipe="mobile", shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    with_one = quantize_checkpoint(tiny_ckpt, tmp_path / "one", recipe="mobile")
    assert torch.equal(load_model(out)(IDS), load_model(with_one)(IDS))


# -- broken inputs ---------------------------------------------------------------------------


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_checksum_mismatch_names_the_file(quantized: dict[str, Path], tmp_path: Path) -> None:
    q = _copy(quantized["mobile"], tmp_path)
    f = q / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte changed
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        open_checkpoint(q, verify=True)
    assert_one_line_error(run("inspect", str(q)), "model.safetensors", "sha256")


def test_truncated_file_names_it(quantized: dict[str, Path], tmp_path: Path) -> None:
    q = _copy(quantized["mobile"], tmp_path)
    f = q / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_one_line_error(
        run("generate", str(q), "--prompt", "hi"), "model.safetensors", "truncated"
    )


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda text: text[: len(text) // 2], "manifest"),
        (
            lambda text: text.replace('"format_version": 1', '"format_version": 99'),
            "format_version",
        ),
        (lambda text: text.replace('"int4-g32"', '"int3"'), "int3"),
    ],
    ids=["truncated-json", "future-version", "unknown-format"],
)
def test_corrupt_manifest(quantized: dict[str, Path], tmp_path: Path, edit, needle: str) -> None:
    q = _copy(quantized["mobile"], tmp_path)
    m = q / MANIFEST
    m.write_text(edit(m.read_text()))
    assert_one_line_error(run("inspect", str(q)), needle)


def test_requantizing_is_refused(quantized: dict[str, Path], tmp_path: Path) -> None:
    p = run("quantize", str(quantized["mobile"]), "-o", str(tmp_path / "again"))
    assert_one_line_error(p, "already quantized", "original checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_incompatible_recipe_leaves_nothing(synth, tiny_config, tmp_path: Path) -> None:
    # o_proj takes 4 heads x 12 = 48 inputs: fine for bf16, not for int4 groups of 32
    ckpt = synth(config=tiny_config(head_dim=12))
    p = run("quantize", str(ckpt), "-o", str(tmp_path / "q"), "--recipe", "mobile")
    assert_one_line_error(p, "o_proj", "int4", "recipe mobile")
    assert list(tmp_path.iterdir()) == []
    assert (
        run("quantize", str(ckpt), "-o", str(tmp_path / "n"), "--recipe", "native").returncode == 0
    )
    with pytest.raises(ConfigError):
        quantize_checkpoint(ckpt, tmp_path / "api", recipe="int4")


def test_unknown_recipe_lists_the_choices(tiny_ckpt: Path, tmp_path: Path) -> None:
    p = invoke("quantize", str(tiny_ckpt), "-o", str(tmp_path / "q"), "--recipe", "int2")
    assert p.returncode == 2 and "mobile-int8" in p.stderr and "Traceback" not in p.stderr


def test_output_exists(quantized: dict[str, Path], tiny_ckpt: Path) -> None:
    before = (quantized["mobile"] / MANIFEST).read_bytes()
    p = run("quantize", str(tiny_ckpt), "-o", str(quantized["mobile"]), "--recipe", "int4")
    assert_one_line_error(p, "already exists", "--force")
    assert (quantized["mobile"] / MANIFEST).read_bytes() == before


def test_cli_quantize_then_inspect(tiny_ckpt: Path, tmp_path: Path) -> None:
    p = run("quantize", str(tiny_ckpt), "-o", str(tmp_path / "q"), "--recipe", "mobile-int8")
    assert p.returncode == 0, p.stderr
    assert "recipe mobile-int8" in p.stdout
    s = json.loads(run("inspect", str(tmp_path / "q"), "--json").stdout)
    assert s["layout"] == "quantized"
    assert s["quantization"]["recipe"] == "mobile-int8"
    assert "sha256" in s["validation"]
    src = json.loads(run("inspect", str(tiny_ckpt), "--json").stdout)
    assert s["parameters"] == src["parameters"]


def test_unwritable_output(tiny_ckpt: Path) -> None:
    assert_one_line_error(run("quantize", str(tiny_ckpt), "-o", "/proc/ossedge-q"), "cannot write")
