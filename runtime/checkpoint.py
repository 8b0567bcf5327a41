"""gpt-oss checkpoints: HF layout (single file or shards; MXFP4 or dequantized experts) and the
OpenAI `original/` layout (fused qkv). Tensors are memory-mapped and read one at a time; every
tensor's presence, dtype and shape is checked against the config when the checkpoint is opened.

Canonical tensor names are the HF names; `ORIGINAL_RENAMES` maps the OpenAI names onto them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ossedge.quantize import mxfp4
from ossedge.quantize.qtensor import QTensor, part_name, part_specs
from ossedge.runtime.atomic import sha256_file
from ossedge.runtime.config import GptOssConfig, load_config
from ossedge.runtime.errors import CheckpointError, ConfigError

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
U8 = (torch.uint8,)
INDEX_FILE = "model.safetensors.index.json"
# an ossedge quantized checkpoint (`ossedge quantize`): its manifest and the version read
MANIFEST = "manifest.json"
FORMAT = "ossedge-quantized-checkpoint"
FORMAT_VERSION = 1
EXPERT_FORMATS = ("mxfp4", "dense")

# OpenAI original name (regex) → canonical HF name. `qkv` is split by `_split_qkv`.
ORIGINAL_RENAMES: tuple[tuple[str, str], ...] = (
    (r"embedding\.weight", "model.embed_tokens.weight"),
    (r"norm\.scale", "model.norm.weight"),
    (r"unembedding\.weight", "lm_head.weight"),
    (r"block\.(\d+)\.attn\.norm\.scale", r"model.layers.\1.input_layernorm.weight"),
    (r"block\.(\d+)\.attn\.out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"block\.(\d+)\.attn\.out\.bias", r"model.layers.\1.self_attn.o_proj.bias"),
    (r"block\.(\d+)\.attn\.sinks", r"model.layers.\1.self_attn.sinks"),
    (r"block\.(\d+)\.mlp\.norm\.scale", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"block\.(\d+)\.mlp\.gate\.weight", r"model.layers.\1.mlp.router.weight"),
    (r"block\.(\d+)\.mlp\.gate\.bias", r"model.layers.\1.mlp.router.bias"),
    (r"block\.(\d+)\.mlp\.mlp1_weight\.blocks", r"model.layers.\1.mlp.experts.gate_up_proj_blocks"),
    (r"block\.(\d+)\.mlp\.mlp1_weight\.scales", r"model.layers.\1.mlp.experts.gate_up_proj_scales"),
    (r"block\.(\d+)\.mlp\.mlp1_bias", r"model.layers.\1.mlp.experts.gate_up_proj_bias"),
    (r"block\.(\d+)\.mlp\.mlp2_weight\.blocks", r"model.layers.\1.mlp.experts.down_proj_blocks"),
    (r"block\.(\d+)\.mlp\.mlp2_weight\.scales", r"model.layers.\1.mlp.experts.down_proj_scales"),
    (r"block\.(\d+)\.mlp\.mlp2_bias", r"model.layers.\1.mlp.experts.down_proj_bias"),
)
# Each layer's weights under "model.layers.{n}.", by the short names the models (the reference,
# the exportable ExecuTorch one, the trainer) give them.
ATTENTION_WEIGHTS = {
    "q_w": "self_attn.q_proj.weight",
    "q_b": "self_attn.q_proj.bias",
    "k_w": "self_attn.k_proj.weight",
    "k_b": "self_attn.k_proj.bias",
    "v_w": "self_attn.v_proj.weight",
    "v_b": "self_attn.v_proj.bias",
    "o_w": "self_attn.o_proj.weight",
    "o_b": "self_attn.o_proj.bias",
    "sinks": "self_attn.sinks",
}
MLP_WEIGHTS = {
    "router_w": "mlp.router.weight",
    "router_b": "mlp.router.bias",
    "gate_up": "mlp.experts.gate_up_proj",
    "gate_up_b": "mlp.experts.gate_up_proj_bias",
    "down": "mlp.experts.down_proj",
    "down_b": "mlp.experts.down_proj_bias",
}
NORM_WEIGHTS = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}

QKV_RE = re.compile(r"block\.(\d+)\.attn\.qkv\.(weight|bias)")
EXPERT_WEIGHT_RE = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]


def expected_tensors(cfg: GptOssConfig, *, expert_format: str = "mxfp4") -> list[TensorSpec]:
    """Every tensor of a gpt-oss checkpoint in canonical (HF) names, in file order."""
    h, v, e, i = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), FLOAT_DTYPES)]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.q_proj.weight", (q, h), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.q_proj.bias", (q,), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.k_proj.bias", (kv,), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.v_proj.bias", (kv,), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.o_proj.weight", (h, q), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.o_proj.bias", (h,), FLOAT_DTYPES),
            TensorSpec(p + "self_attn.sinks", (cfg.num_attention_heads,), FLOAT_DTYPES),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), FLOAT_DTYPES),
            TensorSpec(p + "mlp.router.weight", (e, h), FLOAT_DTYPES),
            TensorSpec(p + "mlp.router.bias", (e,), FLOAT_DTYPES),
        ]
        x = p + "mlp.experts."
        if expert_format == "mxfp4":
            specs += [
                TensorSpec(x + "gate_up_proj_blocks", (e, 2 * i, h // 32, 16), U8),
                TensorSpec(x + "gate_up_proj_scales", (e, 2 * i, h // 32), U8),
                TensorSpec(x + "gate_up_proj_bias", (e, 2 * i), FLOAT_DTYPES),
                TensorSpec(x + "down_proj_blocks", (e, h, i // 32, 16), U8),
                TensorSpec(x + "down_proj_scales", (e, h, i // 32), U8),
                TensorSpec(x + "down_proj_bias", (e, h), FLOAT_DTYPES),
            ]
        else:  # dequantized HF experts are stored transposed: [E, in, out]
            specs += [
                TensorSpec(x + "gate_up_proj", (e, h, 2 * i), FLOAT_DTYPES),
                TensorSpec(x + "gate_up_proj_bias", (e, 2 * i), FLOAT_DTYPES),
                TensorSpec(x + "down_proj", (e, i, h), FLOAT_DTYPES),
                TensorSpec(x + "down_proj_bias", (e, h), FLOAT_DTYPES),
            ]
    specs += [
        TensorSpec("model.norm.weight", (h,), FLOAT_DTYPES),
        TensorSpec("lm_head.weight", (v, h), FLOAT_DTYPES),
    ]
    return specs


def logical_tensors(cfg: GptOssConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the model as (logical name, shape), whatever its storage: canonical names,
    except that each expert weight is one entry `...experts.gate_up_proj` [E, N, K] (outputs,
    inputs), however the file holds it (MXFP4 parts, or HF's dense [E, K, N])."""
    out = []
    for spec in expected_tensors(cfg, expert_format="dense"):
        shape = spec.shape
        if EXPERT_WEIGHT_RE.fullmatch(spec.name):
            shape = (shape[0], shape[2], shape[1])
        out.append((spec.name, shape))
    return out


def original_name(canonical: str) -> str:
    """Inverse of the rename table (qkv parts map to the fused tensor's name)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", canonical)
    if m:
        return f"block.{m.group(1)}.attn.qkv.{m.group(2)}"
    for pattern, target in ORIGINAL_RENAMES:
        regex = re.escape(target).replace(re.escape(r"\1"), r"(\d+)")
        m = re.fullmatch(regex, canonical)
        if m:
            return pattern.replace(r"(\d+)", m.group(1) if m.groups() else "").replace("\\", "")
    raise KeyError(canonical)


def _rename_original(name: str) -> str | None:
    for pattern, target in ORIGINAL_RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(f"^{pattern}$", target, name)
    return None


@dataclass(frozen=True)
class _Entry:
    file: Path
    key: str  # name inside the file
    shape: tuple[int, ...]
    dtype: torch.dtype
    part: str | None = None  # "q" | "k" | "v" for a slice of a fused original qkv tensor


_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class Checkpoint:
    """A validated, lazily read gpt-oss checkpoint. Use `open_checkpoint(path)`."""

    def __init__(self, root: Path, layout: str, cfg: GptOssConfig, files: list[Path]) -> None:
        self.root = root
        self.layout = layout
        self.config = cfg
        self.files = files
        self._handles: dict[Path, object] = {}
        raw = self._read_headers()
        self._entries = self._canonicalize(raw)
        self.expert_format = self._expert_format()
        self.specs = {s.name: s for s in self._expected()}
        self._validate()

    def _expert_format(self) -> str:
        return "mxfp4" if any(k.endswith("gate_up_proj_blocks") for k in self._entries) else "dense"

    def _expected(self) -> list[TensorSpec]:
        return expected_tensors(self.config, expert_format=self.expert_format)

    # -- reading -------------------------------------------------------------------------------
    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return self._handles[path]

    def _read_headers(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        for path in self.files:
            f = self._handle(path)
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                if key in entries:
                    raise CheckpointError(f"tensor {key} appears in both {entries[key].file} and {path}")
                entries[key] = _Entry(path, key, tuple(sl.get_shape()), dtype)
        return entries

    def _canonicalize(self, raw: dict[str, _Entry]) -> dict[str, _Entry]:
        if self.layout != "original":
            return raw
        out: dict[str, _Entry] = {}
        cfg = self.config
        for key, entry in raw.items():
            m = QKV_RE.fullmatch(key)
            if m:
                layer, kind = m.groups()
                want = cfg.q_size + 2 * cfg.kv_size
                if entry.shape[0] != want:
                    raise CheckpointError(
                        f"{entry.file}: tensor {key} has shape {list(entry.shape)}; expected "
                        f"first dimension {want} (q {cfg.q_size} + k,v {cfg.kv_size} each)"
                    )
                for part, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
                    name = f"model.layers.{layer}.self_attn.{part}_proj.{kind}"
                    shape = (size, *entry.shape[1:])
                    out[name] = _Entry(entry.file, key, shape, entry.dtype, part)
                continue
            name = _rename_original(key)
            if name is None:
                raise CheckpointError(f"{entry.file}: unexpected tensor {key} in an original checkpoint")
            out[name] = _Entry(entry.file, key, entry.shape, entry.dtype)
        return out

    def _validate(self) -> None:
        for name, spec in self.specs.items():
            entry = self._entries.get(name)
            shown = original_name(name) if self.layout == "original" else name
            if entry is None:
                raise CheckpointError(
                    f"{self.root}: tensor {shown} is missing; the checkpoint is incomplete or not "
                    "gpt-oss"
                )
            if entry.shape != spec.shape:
                raise CheckpointError(
                    f"{entry.file}: tensor {shown} has shape {list(entry.shape)}, expected "
                    f"{list(spec.shape)} for this config.json"
                )
            if entry.dtype not in spec.dtypes:
                raise CheckpointError(
                    f"{entry.file}: tensor {shown} has dtype {entry.dtype}, expected one of "
                    f"{[str(d) for d in spec.dtypes]}"
                )
        extra = sorted(set(self._entries) - set(self.specs))
        if extra:
            raise CheckpointError(
                f"{self._entries[extra[0]].file}: unexpected tensor {extra[0]} "
                f"({len(extra)} unexpected in all); is the config.json the right one?"
            )

    def names(self) -> list[str]:
        return list(self.specs)

    def entry(self, name: str) -> _Entry:
        return self._entries[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped from its file (no copy for a plain tensor)."""
        if name not in self.specs:
            raise KeyError(name)
        e = self._entries[name]
        try:
            if e.part is None:
                return self._handle(e.file).get_tensor(e.key)
            cfg = self.config
            start = {"q": 0, "k": cfg.q_size, "v": cfg.q_size + cfg.kv_size}[e.part]
            return self._handle(e.file).get_slice(e.key)[start : start + e.shape[0]]
        except SafetensorError as err:
            raise CheckpointError(f"{e.file}: cannot read tensor {e.key} ({err})") from None

    def read(self, name: str) -> torch.Tensor:
        """The tensor read into fresh memory with plain file reads. Streaming a checkpoint through
        `read` keeps the RSS bounded: pages touched through `get`'s mapping stay resident."""
        if name not in self.specs:
            raise KeyError(name)
        e = self._entries[name]
        data_start, header = self._header(e.file)
        dtype, shape, (start, stop) = header[e.key]
        buf = np.empty(stop - start, dtype=np.uint8)
        with open(e.file, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(memoryview(buf)) != buf.nbytes:
                raise CheckpointError(f"{e.file}: tensor {e.key} is truncated; copy the file again")
        t = torch.from_numpy(buf).view(_DTYPES[dtype]).reshape(shape)
        if e.part is None:
            return t
        cfg = self.config
        start_row = {"q": 0, "k": cfg.q_size, "v": cfg.q_size + cfg.kv_size}[e.part]
        return t[start_row : start_row + e.shape[0]].clone()

    def _header(self, path: Path) -> tuple[int, dict[str, tuple[str, list[int], list[int]]]]:
        """(offset of the data, key → (dtype, shape, data offsets)) of one safetensors file."""
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = json.loads(f.read(n))
        raw.pop("__metadata__", None)
        return 8 + n, {k: (v["dtype"], v["shape"], v["data_offsets"]) for k, v in raw.items()}

    def weight(self, name: str, *, copy: bool = False) -> torch.Tensor | QTensor:
        """A weight by logical name (see `logical_tensors`): expert weights come as [E, N, K],
        a QTensor over the MXFP4 bytes or a transposed view of HF's dense [E, K, N].
        `copy` reads with `read` instead of mapping."""
        get = self.read if copy else self.get
        if not EXPERT_WEIGHT_RE.fullmatch(name):
            return get(name)
        if self.expert_format == "dense":
            return get(name).transpose(1, 2)
        blocks, scales = get(name + "_blocks"), get(name + "_scales")
        shape = (*scales.shape[:-1], scales.shape[-1] * mxfp4.BLOCK)
        return QTensor("mxfp4", tuple(shape), {"blocks": blocks, "scales": scales})

    def nbytes(self, name: str) -> int:
        e = self._entries[name]
        return e.dtype.itemsize * int(torch.Size(e.shape).numel())

    def close(self) -> None:
        self._handles.clear()


def _hf_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({root / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {root}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files; is this a checkpoint directory?")
    return files


def is_quantized(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    """The validated manifest of a quantized checkpoint; CheckpointError says what is wrong."""
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: not a readable manifest ({e}); re-run `ossedge quantize` to rebuild it"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ossedge quantized-checkpoint manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {m.get('format_version')!r}; this ossedge reads version "
            f"{FORMAT_VERSION} (re-run `ossedge quantize` with this version)"
        )
    for key, kind in (("recipe", dict), ("tensors", dict), ("files", dict)):
        if not isinstance(m.get(key), kind):
            raise CheckpointError(
                f"{path}: `{key}` is missing or malformed; re-run `ossedge quantize`"
            )
    for fname, f in m["files"].items():
        if not isinstance(f, dict) or not isinstance(f.get("bytes"), int) or "sha256" not in f:
            raise CheckpointError(f"{path}: entry for {fname} lacks bytes or sha256")
        p = root / fname
        if not p.is_file():
            raise CheckpointError(f"{p}: missing; the manifest lists it (copy the directory again)")
        size = p.stat().st_size
        if size != f["bytes"]:
            raise CheckpointError(
                f"{p}: {size} bytes where the manifest says {f['bytes']}; the file is truncated "
                "or was modified (copy it again or re-run `ossedge quantize`)"
            )
    return m


def verify_checksums(root: Path, manifest: dict[str, Any], *, progress: bool = False) -> int:
    """sha256 of every file against the manifest; returns the bytes hashed."""
    total = sum(f["bytes"] for f in manifest["files"].values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for fname, f in manifest["files"].items():
            if sha256_file(root / fname) != f["sha256"]:
                raise CheckpointError(
                    f"{root / fname}: sha256 does not match the manifest; the file is corrupt or "
                    "was modified (copy it again or re-run `ossedge quantize`)"
                )
            bar.update(f["bytes"])
    return total


class QuantizedCheckpoint(Checkpoint):
    """A validated quantized checkpoint: file sizes, every part's presence, shape and dtype are
    checked on open; `verify()` also checks every sha256. `weight(name)` gives the logical
    weight: a plain tensor or a `QTensor` over the mapped parts."""

    def __init__(self, root: Path, cfg: GptOssConfig, *, verify: bool = False) -> None:
        self.manifest = read_manifest(root)
        self.recipe = str(self.manifest["recipe"].get("name"))
        self.formats: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in logical_tensors(cfg):
            t = self.manifest["tensors"].get(name)
            if not isinstance(t, dict) or "format" not in t:
                raise CheckpointError(
                    f"{root / MANIFEST}: no format for tensor {name}; re-run `ossedge quantize`"
                )
            if t["format"] != "keep":
                try:
                    part_specs(t["format"], shape)
                except ValueError as e:
                    raise CheckpointError(f"{root / MANIFEST}: tensor {name}: {e}") from None
            self.formats[name] = t["format"]
            self.shapes[name] = shape
        files = sorted(root / f for f in self.manifest["files"] if f.endswith(".safetensors"))
        if verify:
            verify_checksums(root, self.manifest)
        super().__init__(root, "quantized", cfg, files)

    def _expert_format(self) -> str:
        return self.formats["model.layers.0.mlp.experts.gate_up_proj"]

    def _expected(self) -> list[TensorSpec]:
        specs = []
        for name, fmt in self.formats.items():
            if fmt == "keep":
                specs.append(TensorSpec(name, self.shapes[name], FLOAT_DTYPES))
                continue
            for part, (shape, dtype) in part_specs(fmt, self.shapes[name]).items():
                specs.append(TensorSpec(part_name(name, fmt, part), shape, (dtype,)))
        return specs

    def verify(self, *, progress: bool = False) -> int:
        return verify_checksums(self.root, self.manifest, progress=progress)

    def weight(self, name: str, *, copy: bool = False) -> torch.Tensor | QTensor:
        get = self.read if copy else self.get
        fmt = self.formats[name]
        if fmt == "keep":
            return get(name)
        parts = {p: get(part_name(name, fmt, p)) for p in part_specs(fmt, self.shapes[name])}
        return QTensor(fmt, self.shapes[name], parts)



def detect_layout(path: str | Path) -> tuple[Path, str]:
    """(directory, 'hf' | 'original' | 'quantized') for a checkpoint directory, its `original/`,
    or a file in it."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory; give a checkpoint directory")
    if root.is_file():
        root = root.parent
    if (root / "manifest.json").is_file() and (root / "config.json").is_file():
        return root, "quantized"
    if (root / "config.json").exists():
        try:
            d = json.loads((root / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{root / 'config.json'}: not valid JSON ({e})") from None
        if isinstance(d, dict) and "model_type" not in d and "num_experts" in d:
            return root, "original"
        if list(root.glob("*.safetensors")):
            return root, "hf"
    if (root / "original" / "config.json").exists():
        return root / "original", "original"
    if (root / "config.json").exists():
        return root, "hf"
    raise CheckpointError(f"{root}: no config.json; is this a gpt-oss checkpoint directory?")


def open_checkpoint(path: str | Path, *, verify: bool = False) -> Checkpoint:
    """Open and validate a checkpoint: HF, original, or ossedge-quantized (whose sha256 checksums
    are also checked when `verify`; sizes always are)."""
    root, layout = detect_layout(path)
    cfg = load_config(root / "config.json")
    if layout == "quantized":
        return QuantizedCheckpoint(root, cfg, verify=verify)
    files = _hf_files(root) if layout == "hf" else sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files; is this a checkpoint directory?")
    return Checkpoint(root, layout, cfg, files)
