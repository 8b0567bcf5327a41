"""The structure check of a Core AI artifact, read from its assets: each function's signature and
states, each state written once per call, no float copy of the experts, and every expert tensor
stored byte for byte as the checkpoint (with the recipe applied) stores it."""

from __future__ import annotations

from typing import Any

from ossedge.targets.coreai.backend import coreai
from ossedge.targets.coreai.convert import expert_tensors
from ossedge.targets.coreai.runner import CoreAIModel
from ossedge.targets.memory import decode_weight_bytes

FLOATS = ("Float32", "Float16", "BFloat16")


def expected_functions(cfg, layers: range, context: int, max_prefill: int) -> dict[str, Any]:
    """What a chunk of `layers` must take, return and keep, as the runtime describes it."""
    h, kv, d, k = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts_per_tok

    def nd(dtype: str, *dims) -> str:
        return f"NDArray ({dtype}, {' × '.join(map(str, dims))})"

    states = {}
    for n in layers:
        slots = cfg.sliding_window if cfg.is_sliding(n) else context
        states |= {f"k_{n}": nd("Float32", slots, kv, d), f"v_{n}": nd("Float32", slots, kv, d)}
    out = {}
    for fn, t in (("decode", 1), ("prefill", "?")):
        if fn == "prefill" and max_prefill < 2:
            continue
        outputs = {"h": nd("Float32", t, h)}
        for n in layers:
            outputs |= {f"ids_{n}": nd("Int32", t, k), f"w_{n}": nd("Float32", t, k)}
        out[fn] = {"inputs": {"x": nd("Float32", t, h), "pos": nd("Int32", 1)},
                   "outputs": outputs, "states": states}  # fmt: skip
    return out


def _expert_values(cfg, layers: range) -> int:
    return len(layers) * cfg.num_local_experts * 3 * cfg.intermediate_size * cfg.hidden_size


def check_structure(model: CoreAIModel, source) -> dict[str, Any]:
    """Structural invariants of a Core AI artifact against the checkpoint with the artifact's
    recipe applied (`source`)."""
    authoring = coreai().authoring
    cfg, manifest, root = model.cfg, model.manifest, model.root
    problems: list[str] = []
    storage: dict[str, dict[str, int]] = {}
    for name, chunk in manifest["chunks"].items():
        s = authoring.AIModelAsset.load(root / name).summary(include_statistics=True)
        storage[name] = dict(s.storage_types)
        if chunk["layers"] is None:
            want = {"head": {"inputs": {"x": f"NDArray (Float32, 1 × {cfg.hidden_size})"},
                             "outputs": {"logits": f"NDArray (Float32, 1 × {cfg.vocab_size})"},
                             "states": {}}}  # fmt: skip
        else:
            layers = range(*chunk["layers"])
            want = expected_functions(cfg, layers, model.max_context, model.max_prefill)
            floats = sum(storage[name].get(t, 0) for t in FLOATS)
            if floats >= _expert_values(cfg, layers):
                problems.append(f"{name}: {floats} float constants, as many as its experts' "
                                "weights: the experts are stored decoded")  # fmt: skip
            writes = dict(s.operation_distribution).get("write_handle", 0)
            states = sum(len(f["states"]) for f in want.values())
            if writes != states:
                problems.append(f"{name}: {writes} state writes in its functions, not one per "
                                f"state and call ({states})")  # fmt: skip
        if sorted(s.function_names) != sorted(want):
            problems.append(f"{name}: functions {sorted(s.function_names)}, expected "
                            f"{sorted(want)}")  # fmt: skip
            continue
        for fn, spec in want.items():
            got = {kind: dict(getattr(s, f"function_{kind}")(fn)) for kind in spec}
            if got != spec:
                problems.append(f"{name} {fn}: signature {got} differs from the expected {spec}")
    checked = exact = stored = 0
    layout = manifest["experts"].get("layout", {})
    for layer in range(cfg.num_hidden_layers):
        entries = layout.get(str(layer), {})
        for n, part, t in expert_tensors(source, layer):
            checked += 1
            where = entries.get(f"{n}.{part}")
            want_bytes = t.numpy().tobytes()
            if where is None or where["bytes"] != len(want_bytes):
                problems.append(f"layer {layer} {n}.{part}: not where the manifest says")
                continue
            with open(root / where["file"], "rb") as f:
                f.seek(where["offset"])
                same = f.read(where["bytes"]) == want_bytes
            exact += same
            stored += len(want_bytes)
            if not same:
                problems.append(f"layer {layer} {n}.{part}: the stored bytes differ from the "
                                "checkpoint's")  # fmt: skip
    values = cfg.num_hidden_layers * cfg.num_local_experts * 3 * cfg.intermediate_size * cfg.hidden_size
    return {
        "ok": not problems,
        "problems": problems[:20],
        "functions": sum(len(c["functions"]) for c in manifest["chunks"].values()),
        "expert_weights_checked": checked,
        "expert_weights_exact": exact,
        "expert_bits_per_weight": stored * 8 / values if values else None,
        "decode_weight_bytes": decode_weight_bytes(cfg, "coreai", manifest["recipe"]),
        "storage_types": storage,
    }
