"""The structure check of an ExecuTorch artifact: what `ossedge verify` reads straight from
model.ptd."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ossedge.runtime.model import rope_allowance, rope_tables
from ossedge.targets.executorch.pack import Layout, unpack_expert
from ossedge.targets.executorch.ptd import read_index


def check_structure(model, source) -> dict | None:
    """What verify reads straight from model.ptd and holds against `source` (the checkpoint with
    the artifact's recipe): the rotary tables (YaRN, for every position of the context), the
    norms and the attention sinks exactly, and each layer's first and last packed expert byte for
    byte. Errors too small for the logits to show at a few dozen tokens (a rotary table slightly
    off grows with the position) are caught here. Returns ok, problems and counts; None for
    contract 1 (stacked expert tensors: nothing packed to read back)."""
    root, manifest = model.root, model.manifest
    if manifest.get("contract_version") != 2:
        return None
    path = Path(root) / "model.ptd"
    entries = read_index(path).entries()
    cfg = source.config
    problems: list[str] = []

    def read(key: str, dtype=np.float32, part: tuple[int, int] | None = None) -> np.ndarray | None:
        """Tensor `key` (or bytes [start, start + size) of it) from model.ptd."""
        if key not in entries:
            problems.append(f"model.ptd has no {key}")
            return None
        offset, size = entries[key]
        start, size = part or (0, size)
        return np.fromfile(path, dtype=np.uint8, count=size, offset=offset + start).view(dtype)

    def same(key: str, want: torch.Tensor, within: np.ndarray | None = None) -> None:
        """Tensor `key` equals `want` to fp32 rounding, or each entry to within `within`."""
        got = read(key)
        want = want.float().reshape(-1).numpy()
        if got is None:
            return
        if got.shape != want.shape:
            problems.append(f"{key} differs from the checkpoint's (largest difference its shape)")
        elif not (np.allclose(got, want, rtol=1e-6, atol=1e-7) if within is None
                  else np.all(np.abs(got - want) <= within)):  # fmt: skip
            problems.append(f"{key} differs from the checkpoint's "
                            f"(largest difference {np.abs(got - want).max():.3g})")  # fmt: skip

    positions = torch.arange(int(manifest["max_context"]))
    allowance = rope_allowance(cfg, positions).reshape(-1).numpy()
    cos, sin = rope_tables(cfg, positions)
    same("rope_cos", cos, allowance)
    same("rope_sin", sin, allowance)
    same("norm", source.weight("model.norm.weight"))
    checked = exact = 0
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        same(f"blocks.{n}.attn.sinks", source.weight(p + "self_attn.sinks"))
        same(f"blocks.{n}.attn_norm", source.weight(p + "input_layernorm.weight"))
        same(f"blocks.{n}.mlp_norm", source.weight(p + "post_attention_layernorm.weight"))
        gate_up, down = (source.weight(p + f"mlp.experts.{w}") for w in ("gate_up_proj", "down_proj"))
        layout = Layout(gate_up.fmt, cfg.hidden_size, cfg.intermediate_size)
        codes, scales = ("blocks", "scales") if gate_up.fmt == "mxfp4" else ("q", "scale")
        for e in sorted({0, cfg.num_local_experts - 1}):
            extent = read(f"blocks.{n}.mlp.experts", np.uint8, (e * layout.stride, layout.stride))
            if extent is None:
                break
            got = unpack_expert(layout, torch.from_numpy(extent.copy()))
            want = {"gate_up_codes": gate_up.parts[codes][e], "gate_up_scales": gate_up.parts[scales][e],
                    "gate_up_bias": source.weight(p + "mlp.experts.gate_up_proj_bias")[e].float(),
                    "down_codes": down.parts[codes][e], "down_scales": down.parts[scales][e],
                    "down_bias": source.weight(p + "mlp.experts.down_proj_bias")[e].float()}  # fmt: skip
            checked += 1
            bad = [k for k, v in want.items() if not torch.equal(got[k], v.reshape(got[k].shape))]
            exact += not bad
            if bad:
                problems.append(f"layer {n} expert {e}: {', '.join(bad)} differ from the checkpoint")
    return {"ok": not problems, "problems": problems, "expert_weights_checked": checked,
            "expert_weights_exact": exact}  # fmt: skip
