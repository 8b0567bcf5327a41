"""The structure check of a Core ML artifact: each function's signature, its state discipline, no
gather over a compressed tensor, the rotary tables, and the expert weights decoded byte for byte."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ossedge.quantize.qtensor import QTensor
from ossedge.runtime.model import rope_allowance, rope_tables
from ossedge.targets.coreml import CoreMLArtifactError
from ossedge.targets.coreml.interpreter import _DTYPES, _Type
from ossedge.targets.coreml.runner import CoreMLModel


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

    positions = torch.arange(context)
    want = [t.numpy() for t in rope_tables(cfg, positions)]
    allowance = rope_allowance(cfg, positions).numpy()
    found = [pkg._value(op.attributes["val"]) for op in ops if op.type == "const"]
    found = [v for v in found if isinstance(v, np.ndarray) and v.shape == want[0].shape]
    if len(found) != 2:
        return [f"{fn_name}: {len(found)} rotary tables of shape {list(want[0].shape)}, not 2"]
    # each table against the nearer of cos and sin, in units of what rounding allows
    diffs = [min((np.abs(f.astype(np.float32) - w) for w in want),
                 key=lambda e: (e / allowance).max()) for f in found]  # fmt: skip
    if all((e <= allowance).all() for e in diffs):
        return []
    worst = max(e.max() for e in diffs)
    return [f"{fn_name}: the rotary tables differ from the reference's "
            f"(largest difference {worst:.3g})"]  # fmt: skip


def _decode_weight(pkg, fn_name: str, output: str) -> tuple[np.ndarray, int]:
    """A weight's dense value as the program defines it, and the bits its constexpr chain stores."""

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
