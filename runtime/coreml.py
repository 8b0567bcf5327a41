"""Running a Core ML artifact (see `targets/coreml/convert.py` for its layout) behind the
reference runtime's generation contract.

The host side is the same on every engine: embedding rows from `embedding.safetensors`, then per
token and layer `attn_{l}` (with that function's KV-cache states), the k experts it picks, and
finally `head`. Engines:

- `coreml` (macOS): coremltools' `MLModel(package, function_name=…)` and `make_state()`;
- `interpreter` (anywhere): `runtime.mil`, the numpy MIL interpreter used by `ossedge verify`.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ossedge.runtime.errors import ArtifactError
from ossedge.runtime.routing import Routing, concat_calls

FORMAT = "ossedge-coreml"
SUPPORTED_CONTRACT = 1
ENGINES = ("auto", "coreml", "interpreter")
TOLERANCE_FP16 = 2e-2


class CoreMLArtifactError(ArtifactError):
    """A Core ML artifact is incomplete, corrupt, or cannot run here."""


def is_coreml_artifact(path: str | Path) -> bool:
    p = Path(path) / "manifest.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(root: Path, *, checksums: bool = False) -> dict[str, Any]:
    """The manifest, after checking every file it lists is there with its size (and sha256)."""
    from ossedge.runtime.artifacts import read_manifest as read

    return read(root, fmt=FORMAT, what="Core ML", contract=SUPPORTED_CONTRACT,
                checksums=checksums, error=CoreMLArtifactError)


class _InterpreterEngine:
    def __init__(self, root: Path, manifest: dict) -> None:
        from ossedge.runtime.mil import MilPackage

        self.packages = {name: MilPackage(root / name) for name in manifest["packages"]}
        self.where = {f: d["package"] for f, d in manifest["functions"].items()}

    def package(self, function: str):
        return self.packages[self.where[function]]

    def new_state(self, function: str) -> dict[str, np.ndarray]:
        sig = self.package(function).signature(function)["states"]
        return {n: np.zeros(d["shape"], dtype=np.float16) for n, d in sig.items()}

    def predict(self, function: str, inputs: dict, state=None) -> dict[str, np.ndarray]:
        return self.package(function).run(function, inputs, state)


class _CoreMLEngine:
    def __init__(self, root: Path, manifest: dict) -> None:
        import coremltools as ct

        self.models = {
            f: ct.models.MLModel(str(root / d["package"]), function_name=f)
            for f, d in manifest["functions"].items()
        }

    def new_state(self, function: str):
        return self.models[function].make_state()

    def predict(self, function: str, inputs: dict, state=None) -> dict[str, np.ndarray]:
        model = self.models[function]
        out = model.predict(inputs, state=state) if state is not None else model.predict(inputs)
        return {k: np.asarray(v) for k, v in out.items()}


@dataclass
class _Config:
    max_position_embeddings: int
    vocab_size: int


class CoreMLCache:
    """Position and the per-layer states of one sequence."""

    def __init__(self, engine, layers: int, limit: int) -> None:
        self.position = 0
        self.limit = limit
        self.states = [engine.new_state(f"attn_{layer}") for layer in range(layers)]


class CoreMLModel:
    """A Core ML artifact behind the reference runtime's contract: `cache = model.new_cache()`,
    `model(ids [1, T], cache=cache)` → logits [1, 1, V] of the last token (tokens are fed one
    prediction call per function, as the artifact's functions take one token)."""

    def __init__(self, root: str | Path, *, engine: str = "auto", checksums: bool = False) -> None:
        from ossedge.runtime.config import config_from_hf_dict
        from safetensors import safe_open

        self.root = Path(root)
        self.manifest = read_manifest(self.root, checksums=checksums)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine == "auto":
            engine = "coreml" if platform.system() == "Darwin" else "interpreter-refused"
        if engine == "interpreter-refused":
            raise CoreMLArtifactError(
                f"{self.root}: Core ML prediction needs macOS; on {platform.system()} check the "
                f"artifact with `ossedge verify {self.root} --reference CKPT` (it runs the "
                "artifact in ossedge's MIL interpreter)"
            )
        if engine == "coreml" and platform.system() != "Darwin":
            raise CoreMLArtifactError("the coreml engine needs macOS; use engine='interpreter'")
        self.engine_name = engine
        cls = _CoreMLEngine if engine == "coreml" else _InterpreterEngine
        self.engine = cls(self.root, self.manifest)
        self.cfg = config_from_hf_dict(self.manifest["config"])
        self.max_context = int(self.manifest["max_context"])
        self.max_prefill = self.max_context
        self.config = _Config(self.max_context, self.cfg.vocab_size)
        emb = self.manifest["embedding"]
        self._emb_file = safe_open(str(self.root / emb["file"]), "pt")
        self._emb_fmt, self._emb_shape = emb["format"], tuple(emb["shape"])
        self._trace: list[list[Routing]] | None = None

    def embed(self, token: int) -> np.ndarray:
        """fp32 [1, H] embedding row of `token`."""
        from ossedge.quantize.qtensor import QTensor

        if not 0 <= token < self._emb_shape[0]:
            raise ValueError(f"token id {token} outside the vocabulary of {self._emb_shape[0]}")
        f = self._emb_file
        if self._emb_fmt == "fp16":
            row = f.get_slice("embedding")[token : token + 1].float()
        else:
            parts = {k.split(".", 1)[1]: f.get_slice(k)[token : token + 1] for k in f.keys()}
            row = QTensor(self._emb_fmt, (1, self._emb_shape[1]), parts).dequantize(torch.float32)
        return row.numpy().astype(np.float32).reshape(1, -1)

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> CoreMLCache:
        if batch_size != 1:
            raise ValueError("a Core ML artifact runs one sequence (batch size 1)")
        limit = min(max_context or self.max_context, self.max_context)
        return CoreMLCache(self.engine, self.cfg.num_hidden_layers, limit)

    def step(self, token: int, cache: CoreMLCache) -> np.ndarray:
        """One token at the cache's position → logits fp32 [V]."""
        x = self.embed(token)
        pos = np.array([cache.position], dtype=np.int32)
        chosen = []
        for layer in range(self.cfg.num_hidden_layers):
            a = self.engine.predict(f"attn_{layer}", {"x": x, "pos": pos}, cache.states[layer])
            h = a["h"].astype(np.float32)
            chosen.append(Routing(torch.from_numpy(a["ids"].reshape(1, -1).astype(np.int64)),
                                  torch.from_numpy(a["w"].reshape(1, -1).astype(np.float32)),
                                  None))  # fmt: skip
            for j in range(a["ids"].shape[-1]):
                e = int(a["ids"].reshape(-1)[j])
                y = self.engine.predict(f"expert_{layer}_{e}", {"m": a["m"]})["y"]
                h = h + np.float32(a["w"].reshape(-1)[j]) * y.astype(np.float32)
            x = h
        cache.position += 1
        if self._trace is not None:
            self._trace.append(chosen)
        return self.engine.predict("head", {"h": x})["logits"].reshape(-1).astype(np.float32)

    def trace_routing(self, on: bool = True) -> None:
        """Start (or stop) recording the experts the attention functions choose (emptied)."""
        self._trace = [] if on else None

    def routing_trace(self) -> list[Routing]:
        """Per layer, the routing of every token run since `trace_routing()` (ids and weights)."""
        return concat_calls(self._trace or [])

    def __call__(
        self, input_ids: torch.Tensor, *, cache: CoreMLCache | None = None, last_only: bool = True
    ) -> torch.Tensor:
        from ossedge.runtime.artifacts import check_call

        check_call(input_ids, cache, "a Core ML")
        for tok in input_ids[0].tolist():
            logits = self.step(int(tok), cache)
        return torch.from_numpy(logits)[None, None]


def expected_signatures(cfg, context: int) -> dict[str, dict[str, Any]]:
    """What each function of an artifact for `cfg` must take and return."""
    h, kv, d, k = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts_per_tok

    def t(shape, dtype):
        return {"shape": list(shape), "dtype": dtype}

    out = {}
    for layer in range(cfg.num_hidden_layers):
        s = cfg.sliding_window if cfg.is_sliding(layer) else context
        out[f"attn_{layer}"] = {
            "inputs": {"x": t((1, h), "FLOAT32"), "pos": t((1,), "INT32")},
            "outputs": {"h": t((1, h), "FLOAT32"), "m": t((1, h), "FLOAT16"),
                        "ids": t((1, k), "INT32"), "w": t((1, k), "FLOAT32")},
            "states": {"k_cache": t((1, kv, s, d), "FLOAT16"),
                       "v_cache": t((1, kv, s, d), "FLOAT16")},
        }
        for e in range(cfg.num_local_experts):
            out[f"expert_{layer}_{e}"] = {"inputs": {"m": t((1, h), "FLOAT16")},
                                          "outputs": {"y": t((1, h), "FLOAT16")}, "states": {}}
    out["head"] = {"inputs": {"h": t((1, h), "FLOAT32")},
                   "outputs": {"logits": t((1, cfg.vocab_size), "FLOAT32")}, "states": {}}
    return out


_PASS_THROUGH = ("reshape", "identity", "transpose", "expand_dims", "squeeze", "cast")


def _state_discipline(fn_name: str, ops, states: list[str]) -> list[str]:
    """Each state written exactly once and never read after its write."""
    problems = []
    written: dict[str, int] = {}
    for op in ops:
        if op.type in ("write_state", "read_state"):
            name = op.inputs["input"].arguments[0].name
            if op.type == "write_state":
                written[name] = written.get(name, 0) + 1
            elif name in written:
                problems.append(f"{fn_name}: state {name} is read after it is written")
    for s in states:
        if written.get(s, 0) != 1:
            problems.append(f"{fn_name}: state {s} is written {written.get(s, 0)} times, not once")
    return problems


def _compressed_gathers(fn_name: str, ops) -> list[str]:
    compressed = set()
    problems = []
    for op in ops:
        ins = {k: [b.name for b in v.arguments if b.WhichOneof("binding") == "name"]
               for k, v in op.inputs.items()}
        if op.type.startswith("constexpr_") or op.type in _PASS_THROUGH and set(ins.get("x", [])) & compressed:
            compressed.update(o.name for o in op.outputs)
        elif op.type.startswith("gather") and set(ins.get("x", [])) & compressed:
            problems.append(f"{fn_name}: a compressed weight feeds {op.type} "
                            f"({op.outputs[0].name}); Core ML would expand all of it at load")
    return problems


def _rotary_tables(pkg, fn_name: str, ops, cfg, context: int) -> list[str]:
    """The attention function's cos and sin tables (the [context, D/2] constants it gathers a
    position's row from) must be the reference's YaRN tables: a table slightly off (a flipped
    `truncate`) moves the logits little at the first positions and much later on."""
    from ossedge.runtime.model import rope_tables

    want = [t.numpy() for t in rope_tables(cfg, torch.arange(context))]
    found = [pkg._value(op.attributes["val"]) for op in ops if op.type == "const"]
    found = [v for v in found if isinstance(v, np.ndarray) and v.shape == want[0].shape]
    if len(found) != 2:
        return [f"{fn_name}: {len(found)} rotary tables of shape {list(want[0].shape)}, not 2"]
    worst = max(min(np.abs(f.astype(np.float32) - w).max() for w in want) for f in found)
    why = f"{fn_name}: the rotary tables differ from the reference's (largest difference {worst:.3g})"
    return [] if worst <= 1e-5 else [why]


def _decode_weight(pkg, fn_name: str, output: str) -> tuple[np.ndarray, int]:
    """A weight's dense value as the program defines it, and the bits its constexpr chain stores."""
    from ossedge.runtime.mil import _DTYPES, _Type

    env: dict[str, Any] = {}
    bits: dict[str, int] = {}
    for op in pkg.ops(fn_name):
        if not op.type.startswith("constexpr_"):
            continue
        name = op.outputs[0].name
        env[name] = pkg.decoded(fn_name, op, env)
        bits[name] = 0
        for arg in op.inputs.values():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "value":
                    t = _Type(b.value.type)
                    bits[name] += int(np.prod(t.shape)) * _DTYPES[t.dtype][1]
                else:
                    bits[name] += bits.get(b.name, 0)
        if name == output:
            return env[output], bits[name]
    raise CoreMLArtifactError(f"{fn_name}: no compressed weight {output!r}")


def check_structure(model: CoreMLModel, source) -> dict[str, Any]:
    """Structural invariants of a Core ML artifact run by the interpreter (`model`), against the
    checkpoint with the artifact's recipe applied (`source`): function signatures, package
    contents, state writes, no compressed weight behind a gather, expert weights decoding exactly
    to the source's values, and their stored bits per weight."""
    from ossedge.quantize.qtensor import QTensor

    if model.engine_name != "interpreter":
        raise ValueError("check_structure needs the interpreter engine")
    cfg, manifest = model.cfg, model.manifest
    problems: list[str] = []
    want = expected_signatures(cfg, model.max_context)
    functions = manifest["functions"]
    missing = sorted(set(want) - set(functions))
    if missing:
        problems.append(f"functions missing from the manifest: {missing[:5]}")
    for pname, pkg in model.engine.packages.items():
        listed = set(manifest["packages"][pname]["functions"])
        if set(pkg.functions) != listed:
            gone = sorted(listed - set(pkg.functions))
            extra = sorted(set(pkg.functions) - listed)
            problems.append(f"{pname}: functions differ from the manifest (missing {gone[:5]}, "
                            f"unlisted {extra[:5]})")
    expert_bits = exact = checked = 0
    weights = 0
    layer_cache: dict = {}
    for name, spec in want.items():
        if name not in functions:
            continue
        pname = functions[name]["package"]
        pkg = model.engine.packages.get(pname)
        if pkg is None or name not in pkg.functions:
            problems.append(f"{name}: not in {pname}")
            continue
        sig = pkg.signature(name)
        if sig != spec:
            problems.append(f"{name}: signature {sig} differs from the expected {spec}")
        ops = pkg.ops(name)
        problems += _state_discipline(name, ops, list(spec["states"]))
        problems += _compressed_gathers(name, ops)
        if name.startswith("attn_"):
            problems += _rotary_tables(pkg, name, ops, cfg, model.max_context)
        if not name.startswith("expert_"):
            continue
        layer, e = (int(x) for x in name.split("_")[1:])
        if layer_cache.get("layer") != layer:
            p = f"model.layers.{layer}.mlp.experts."
            layer_cache = {"layer": layer, "gate_up_w": source.weight(p + "gate_up_proj"),
                           "down_w": source.weight(p + "down_proj")}
        for wname in ("gate_up_w", "down_w"):
            src = layer_cache[wname]
            if not isinstance(src, QTensor):
                continue
            dense, bits = _decode_weight(pkg, name, wname)
            ref = src[e].dequantize(torch.float32).numpy().astype(np.float16)
            checked += 1
            exact += int(dense.dtype == np.float16 and np.array_equal(
                dense.view(np.uint16), ref.view(np.uint16)))
            expert_bits += bits
            weights += ref.size
    if checked and exact != checked:
        problems.append(f"{checked - exact} of {checked} expert weights do not decode exactly to "
                        "the source's values")
    bits_per_weight = expert_bits / weights if weights else None
    if bits_per_weight is not None and bits_per_weight > 4.6:
        problems.append(f"expert weights take {bits_per_weight:.2f} bits per weight, not ~4.5")
    return {
        "ok": not problems,
        "problems": problems[:20],
        "functions": len(functions),
        "expert_weights_checked": checked,
        "expert_weights_exact": exact,
        "expert_bits_per_weight": bits_per_weight,
    }
