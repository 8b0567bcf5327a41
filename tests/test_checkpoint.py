"""Checkpoint reading: shards, both layouts, and broken checkpoints rejected with errors naming
the tensor and the file."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossedge.runtime.checkpoint import (
    INDEX_FILE,
    detect_layout,
    expected_tensors,
    open_checkpoint,
    original_name,
)
from ossedge.runtime.config import preset
from ossedge.runtime.errors import CheckpointError
from ossedge.runtime.model import load_model

SHARD_BYTES = 60_000  # the tiny checkpoint is ~0.3 MB: several shards


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """(absolute start, end) of a tensor's data in a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


# -- good checkpoints ---------------------------------------------------------------------------


def test_expected_tensor_count_and_names() -> None:
    cfg = preset("tiny")
    mx = expected_tensors(cfg, expert_format="mxfp4")
    dense = expected_tensors(cfg, expert_format="dense")
    assert len(mx) == 3 + cfg.num_hidden_layers * 19
    assert len(dense) == 3 + cfg.num_hidden_layers * 17
    assert len({s.name for s in mx}) == len(mx)
    by = {s.name: s for s in mx}
    assert by["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 128, 2, 16)
    assert by["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 64, 2)
    dense_by = {s.name: s for s in dense}
    assert dense_by["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 128)


def test_20b_expected_shapes_match_design() -> None:
    by = {s.name: s for s in expected_tensors(preset("20b"))}
    p = "model.layers.23."
    assert by[p + "mlp.experts.gate_up_proj_blocks"].shape == (32, 5760, 90, 16)
    assert by[p + "mlp.experts.gate_up_proj_scales"].shape == (32, 5760, 90)
    assert by[p + "mlp.experts.down_proj_blocks"].shape == (32, 2880, 90, 16)
    assert by[p + "self_attn.q_proj.weight"].shape == (4096, 2880)
    assert by[p + "self_attn.k_proj.weight"].shape == (512, 2880)
    assert by[p + "self_attn.sinks"].shape == (64,)
    assert by["lm_head.weight"].shape == (201088, 2880)


def test_original_names_round_trip() -> None:
    names = {s.name: original_name(s.name) for s in expected_tensors(preset("tiny"))}
    assert names["model.embed_tokens.weight"] == "embedding.weight"
    assert names["model.norm.weight"] == "norm.scale"
    assert names["lm_head.weight"] == "unembedding.weight"
    assert names["model.layers.3.self_attn.k_proj.bias"] == "block.3.attn.qkv.bias"
    assert names["model.layers.2.post_attention_layernorm.weight"] == "block.2.mlp.norm.scale"
    assert names["model.layers.1.mlp.router.weight"] == "block.1.mlp.gate.weight"
    assert names["model.layers.0.mlp.experts.down_proj_scales"] == "block.0.mlp.mlp2_weight.scales"
    # Every canonical name but q/k/v has its own original name.
    assert len(set(names.values())) == len(names) - 4 * 4


def test_sharded_checkpoint_equals_single_file(synth, tiny_ckpt: Path) -> None:
    sharded = synth(shard_bytes=SHARD_BYTES)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3 and (sharded / INDEX_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(files)
    a, b = open_checkpoint(sharded), open_checkpoint(tiny_ckpt)
    assert len(a.files) == len(files) and len(b.files) == 1
    assert a.names() == b.names()
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_model(sharded)(ids), load_model(tiny_ckpt)(ids))


def test_index_is_authoritative(synth, tmp_path: Path) -> None:
    """A stray *.safetensors beside an index is not read (the index names the shards)."""
    d = copy(synth(shard_bytes=SHARD_BYTES), tmp_path / "c")
    save_file({"junk": torch.zeros(3)}, d / "consolidated.safetensors")
    assert "junk" not in open_checkpoint(d).names()


def test_original_layout_holds_same_weights(tiny_ckpt: Path, tiny_original_ckpt: Path) -> None:
    hf, orig = open_checkpoint(tiny_ckpt), open_checkpoint(tiny_original_ckpt)
    assert (hf.layout, orig.layout) == ("hf", "original")
    assert hf.config == orig.config.replace(
        eos_token_id=hf.config.eos_token_id, pad_token_id=hf.config.pad_token_id
    )
    assert hf.names() == orig.names()
    for name in hf.names():
        assert torch.equal(hf.get(name), orig.get(name)), name
    raw = load_file(tiny_original_ckpt / "model.safetensors")
    assert "block.0.attn.qkv.weight" in raw and raw["block.0.attn.qkv.weight"].shape == (128, 64)
    assert "model.embed_tokens.weight" not in raw


def test_dense_checkpoint_detected(tiny_dense_ckpt: Path, tiny_ckpt: Path) -> None:
    dense, mx = open_checkpoint(tiny_dense_ckpt), open_checkpoint(tiny_ckpt)
    assert (dense.expert_format, mx.expert_format) == ("dense", "mxfp4")
    assert "model.layers.0.mlp.experts.gate_up_proj" in dense.names()
    from ossedge.quantize import mxfp4

    p = "model.layers.1.mlp.experts."
    w = mxfp4.dequantize(mx.get(p + "gate_up_proj_blocks"), mx.get(p + "gate_up_proj_scales"))
    assert torch.equal(dense.get(p + "gate_up_proj").float(), w.transpose(1, 2))


@pytest.mark.parametrize(
    ("where", "want"),
    [("root", "hf"), ("file", "hf"), ("original", "original"), ("original-file", "original")],
    ids=["root", "file", "original-dir", "original-file"],
)
def test_layout_detection_with_both_layouts(
    tmp_path: Path, tiny_ckpt: Path, tiny_original_ckpt: Path, where: str, want: str
) -> None:
    """A released repo: HF files at the root and OpenAI's files under original/."""
    root = copy(tiny_ckpt, tmp_path / "repo")
    shutil.copytree(tiny_original_ckpt, root / "original")
    path = {
        "root": root,
        "file": root / "model.safetensors",
        "original": root / "original",
        "original-file": root / "original" / "model.safetensors",
    }[where]
    directory, layout = detect_layout(path)
    assert layout == want
    assert directory == (root if want == "hf" else root / "original")
    assert open_checkpoint(path).layout == want


def test_original_detected_from_parent_directory(tmp_path: Path, tiny_original_ckpt: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(tiny_original_ckpt, root / "original")
    ck = open_checkpoint(root)
    assert ck.layout == "original" and ck.root == root / "original"


def test_get_reads_lazily_at_call_time(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Opening validates headers only; data is read when `get` is called (so bytes changed on
    disk after opening are what `get` returns)."""
    d = copy(tiny_ckpt, tmp_path / "c")
    path = d / "model.safetensors"
    ck = open_checkpoint(d)
    start, end = tensor_bytes(path, "model.norm.weight")
    new = torch.arange(64, dtype=torch.bfloat16)
    assert end - start == new.numel() * 2
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(new.view(torch.uint8).numpy().tobytes())
    assert torch.equal(ck.get("model.norm.weight"), new)


def test_get_is_memory_mapped(tmp_path: Path, tiny_ckpt: Path) -> None:
    """`get` returns a view of the mapped file, not a copy (what keeps the 20b's 13 GB off the
    heap): a tensor handed out earlier sees bytes written to the file later."""
    d = copy(tiny_ckpt, tmp_path / "c")
    path = d / "model.safetensors"
    ck = open_checkpoint(d)
    name = "model.layers.0.mlp.experts.down_proj_scales"
    before = ck.get(name)
    start, end = tensor_bytes(path, name)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes([7]) * (end - start))
    assert torch.all(before == 7)


def test_get_unknown_name_raises_key_error(tiny_ckpt: Path) -> None:
    with pytest.raises(KeyError):
        open_checkpoint(tiny_ckpt).get("model.layers.99.self_attn.sinks")


# -- broken checkpoints -------------------------------------------------------------------------


def drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.pop(name)


def put(name: str, value: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
    return lambda t: t.__setitem__(name, value(t))


S = "model.layers.1.self_attn.sinks"
BLOCKS = "model.layers.0.mlp.experts.gate_up_proj_blocks"
SCALES = "model.layers.2.mlp.experts.down_proj_scales"
K = "model.layers.0.self_attn.k_proj.weight"  # [32, 64] in the tiny preset
BROKEN_HF = [
    ("missing-sinks", drop(S), S, "missing"),
    ("missing-lm_head", drop("lm_head.weight"), "lm_head.weight", "missing"),
    ("missing-expert-scales", drop(SCALES), SCALES, "missing"),
    ("misshaped-sinks", put(S, lambda t: torch.zeros(5, dtype=torch.bfloat16)), S, "shape"),
    ("misshaped-blocks", put(BLOCKS, lambda t: t[BLOCKS][:, :, :1].contiguous()), BLOCKS, "shape"),
    ("transposed-k", put(K, lambda t: t[K].t().contiguous()), K, "shape"),
    ("float-scales", put(SCALES, lambda t: t[SCALES].float()), SCALES, "dtype"),
    ("int-norm", put("model.norm.weight", lambda t: t["model.norm.weight"].to(torch.int32)),
     "model.norm.weight", "dtype"),
    ("extra-tensor", put("model.layers.0.mlp.shared_expert.weight", lambda t: torch.zeros(4)),
     "model.layers.0.mlp.shared_expert.weight", "unexpected"),
    ("extra-layer", put("model.layers.4.self_attn.sinks", lambda t: t[S].clone()),
     "model.layers.4.self_attn.sinks", "unexpected"),
]


@pytest.mark.parametrize(
    ("edit", "tensor", "what"), [c[1:] for c in BROKEN_HF], ids=[c[0] for c in BROKEN_HF]
)
def test_broken_hf_checkpoint(
    tmp_path: Path, tiny_ckpt: Path, edit, tensor: str, what: str
) -> None:
    d = copy(tiny_ckpt, tmp_path / "c")
    rewrite(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    msg = str(err.value)
    assert tensor in msg and what in msg and str(d) in msg, msg


BROKEN_ORIGINAL = [
    ("missing-sinks", drop("block.1.attn.sinks"), "block.1.attn.sinks", "missing"),
    ("missing-qkv-bias", drop("block.0.attn.qkv.bias"), "block.0.attn.qkv.bias", "missing"),
    ("misshaped-qkv", put("block.2.attn.qkv.weight", lambda t: t["block.2.attn.qkv.weight"][:96]),
     "block.2.attn.qkv.weight", "shape"),
    ("misshaped-mlp1", put("block.0.mlp.mlp1_weight.blocks",
                           lambda t: t["block.0.mlp.mlp1_weight.blocks"][:3].contiguous()),
     "block.0.mlp.mlp1_weight.blocks", "shape"),
    ("hf-name-inside", put("model.norm.weight", lambda t: t["norm.scale"].clone()),
     "model.norm.weight", "unexpected"),
]


@pytest.mark.parametrize(
    ("edit", "tensor", "what"),
    [c[1:] for c in BROKEN_ORIGINAL],
    ids=[c[0] for c in BROKEN_ORIGINAL],
)
def test_broken_original_checkpoint(
    tmp_path: Path, tiny_original_ckpt: Path, edit, tensor: str, what: str
) -> None:
    d = copy(tiny_original_ckpt, tmp_path / "c")
    rewrite(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    msg = str(err.value)
    assert tensor in msg and what in msg and str(d) in msg, msg


TRUNCATIONS = {  # file size → size after truncation
    "half": lambda n: n // 2,
    "last-bytes": lambda n: n - 8,
    "inside-header": lambda n: 20,
}


@pytest.mark.parametrize("cut", list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
def test_truncated_file(tmp_path: Path, tiny_ckpt: Path, cut) -> None:
    d = copy(tiny_ckpt, tmp_path / "c")
    path = d / "model.safetensors"
    os.truncate(path, cut(path.stat().st_size))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    assert str(path) in str(err.value)


def test_truncated_shard(tmp_path: Path, synth) -> None:
    d = copy(synth(shard_bytes=SHARD_BYTES), tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 8)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    assert shard.name in str(err.value)


def test_shard_named_by_index_missing(tmp_path: Path, synth) -> None:
    d = copy(synth(shard_bytes=SHARD_BYTES), tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    msg = str(err.value)
    assert shard.name in msg and INDEX_FILE in msg and "missing" in msg, msg


def test_tensor_in_two_shards(tmp_path: Path, synth) -> None:
    d = copy(synth(shard_bytes=SHARD_BYTES), tmp_path / "c")
    first, second = sorted(d.glob("model-*.safetensors"))[:2]
    rewrite(second, put("model.embed_tokens.weight", lambda t: torch.zeros(512, 64)))
    assert "model.embed_tokens.weight" in load_file(first)
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        open_checkpoint(d)


def test_index_not_json(tmp_path: Path, synth) -> None:
    d = copy(synth(shard_bytes=SHARD_BYTES), tmp_path / "c")
    (d / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        open_checkpoint(d)


def test_config_for_another_model(tmp_path: Path, tiny_ckpt: Path) -> None:
    """The right tensors with a config.json of a different size: shapes are checked."""
    d = copy(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        open_checkpoint(d)


@pytest.mark.parametrize("case", ["no-dir", "no-config", "no-weights"])
def test_not_a_checkpoint(tmp_path: Path, tiny_ckpt: Path, case: str) -> None:
    d = tmp_path / "c"
    if case == "no-config":
        copy(tiny_ckpt, d)
        (d / "config.json").unlink()
    elif case == "no-weights":
        copy(tiny_ckpt, d)
        (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    assert str(d) in str(err.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"truncate": True}, "rope_scaling"),
        ({"layer_types": ("full_attention", "sliding_attention", "full_attention")}, "layer_types"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
    ],
    ids=["truncate", "layer-pattern", "eps"],
)
def test_synth_refuses_configs_the_original_layout_drops(
    tmp_path: Path, tiny_config, changes: dict, field: str
) -> None:
    """OpenAI's config.json has no such keys: writing it would silently load another model."""
    from ossedge.runtime.synth import synthesize

    changes = dict(changes)
    truncate = changes.pop("truncate", False)
    cfg = tiny_config(truncate=truncate, num_layers=3).replace(**changes)
    with pytest.raises(ValueError, match=field):
        synthesize(tmp_path / "c", config=cfg, layout="original")
    assert not (tmp_path / "c").exists()
    assert synthesize(tmp_path / "hf", config=cfg, layout="hf").exists()
