"""Synthetic gpt-oss checkpoints: random weights in the exact released format.

Each tensor is drawn from its own generator seeded by (seed, canonical name), so the HF and the
original layouts of one seed hold identical weights. Tensors are produced in row chunks of at most
`CHUNK_BYTES` and written as they are made: the 20b (~13 GB) streams with bounded memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ossedge.quantize import mxfp4
from ossedge.runtime.atomic import atomic_dir, write_json
from ossedge.runtime.checkpoint import INDEX_FILE, TensorSpec, expected_tensors, original_name
from ossedge.runtime.config import (
    MXFP4_QUANTIZATION_CONFIG,
    GptOssConfig,
    config_from_original_dict,
    preset,
)
from ossedge.runtime.safetensors_stream import write_streaming
from ossedge.runtime.tokenizer import build_synthetic_tokenizer, special_ids
from ossedge.runtime.tokenizer_o200k import O200K_VOCAB_SIZE, build_o200k_harmony
from tqdm import tqdm

if TYPE_CHECKING:
    import tokenizers

CHUNK_BYTES = 64 << 20
HF_SHARD_BYTES = 5 << 30
LAYOUTS = ("hf", "original")


def _init_std(name: str, cfg: GptOssConfig) -> tuple[float, float]:
    """(mean, std) per tensor, chosen so activations look like a trained model's: attention that
    is peaked but not one-hot, sinks that absorb real mass, decisive routing, and expert
    pre-activations that cross the SwiGLU clamp (±swiglu_limit) a few percent of the time."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    rules = (
        (r".*embed_tokens\.weight", 0.0, 1.0),
        (r".*(layernorm|norm)\.weight", 1.0, 0.1),
        (r".*[qk]_proj\.weight", 0.0, 2.0 / math.sqrt(h)),
        (r".*v_proj\.weight", 0.0, 1.0 / math.sqrt(h)),
        (r".*o_proj\.weight", 0.0, 0.5 / math.sqrt(cfg.q_size)),
        (r".*sinks", 1.0, 1.0),
        (r".*router\.weight", 0.0, 2.0 / math.sqrt(h)),
        (r".*router\.bias", 0.0, 0.5),
        (r".*gate_up_proj(_blocks)?", 0.0, 4.0 / math.sqrt(h)),
        (r".*gate_up_proj_bias", 0.0, 0.5),
        (r".*down_proj(_blocks)?", 0.0, 0.25 / math.sqrt(i)),
        (r".*_bias|.*\.bias", 0.0, 0.1),
        (r"lm_head\.weight", 0.0, 2.0 / math.sqrt(h)),
    )
    for pattern, mean, std in rules:
        if re.fullmatch(pattern, name):
            return mean, std
    raise KeyError(f"no init rule for {name}")


def _generator(seed: int, name: str, part: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}#{part}".encode())) % (2**63))
    return g


# Published routing profiles of gpt-oss-20b: per layer, the 8 most selected of 32 experts take
# 43-79% of the selections (median ~60%); uniform routing gives 25%.
SKEW_TOP_QUARTER = (0.43, 0.79)


def skew_targets(cfg: GptOssConfig, seed: int) -> list[float]:
    """Each layer's target share of selections taken by its top quarter of experts: spread
    evenly over SKEW_TOP_QUARTER, in a seeded order of the layers."""
    lo, hi = SKEW_TOP_QUARTER
    n = cfg.num_hidden_layers
    shares = [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
    order = torch.randperm(n, generator=_generator(seed, "router-skew")).tolist()
    return [shares[i] for i in order]


def _zipf(experts: int, top_quarter: float) -> torch.Tensor:
    """Frequencies ∝ rank^-a with the top quarter's share `top_quarter` (a found by bisection)."""
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    q = max(1, experts // 4)
    lo, hi = 0.0, 8.0
    for _ in range(60):
        a = (lo + hi) / 2
        f = ranks**-a
        lo, hi = (a, hi) if (f[:q].sum() / f.sum()) < top_quarter else (lo, a)
    f = ranks**-lo
    return f / f.sum()


def router_skew_offsets(cfg: GptOssConfig, seed: int, layer: int, bias: torch.Tensor,
                        logit_std: float) -> torch.Tensor:  # fmt: skip
    """Offsets added to layer `layer`'s router bias so that, for router logits modelled as
    independent normals of std `logit_std` around `bias`, top-k routing selects the experts with
    Zipf frequencies whose top quarter takes `skew_targets(...)[layer]` (experts ranked in a seeded
    order). Calibrated by iterating on sampled logits."""
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    g = _generator(seed, "router-skew", layer + 1)
    target = _zipf(e, skew_targets(cfg, seed)[layer])[torch.randperm(e, generator=g)]
    z = torch.randn(8192, e, generator=g, dtype=torch.float64) * logit_std + bias.double()
    delta = torch.zeros(e, dtype=torch.float64)
    for _ in range(80):
        top = torch.topk(z + delta, k, dim=-1).indices
        freq = torch.bincount(top.reshape(-1), minlength=e).double() / top.numel()
        delta += 0.5 * torch.log(target / freq.clamp(min=1e-6))
    return delta.float()


class _Source:
    """Produces each canonical tensor's values in row chunks, deterministically."""

    def __init__(self, cfg: GptOssConfig, seed: int, dtype: torch.dtype = torch.bfloat16,
                 router_skew: bool = False) -> None:  # fmt: skip
        self.cfg = cfg
        self.seed = seed
        self.dtype = dtype
        self.router_skew = router_skew
        self._scales: dict[str, torch.Tensor] = {}

    def dense_chunks(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        mean, std = _init_std(spec.name, self.cfg)
        row = math.prod(spec.shape[1:]) * 4
        rows = max(1, CHUNK_BYTES // max(row, 1))
        for part, start in enumerate(range(0, spec.shape[0], rows)):
            n = min(rows, spec.shape[0] - start)
            t = torch.randn((n, *spec.shape[1:]), generator=_generator(self.seed, spec.name, part))
            t = t * std + mean
            if self.router_skew and spec.name.endswith("mlp.router.bias"):
                layer = int(spec.name.split(".layers.")[1].split(".")[0])
                # router logits: weights of std 2/sqrt(h) against RMS-normed inputs (rms ~1)
                w_std = _init_std(spec.name.replace(".bias", ".weight"), self.cfg)[1]
                t = t + router_skew_offsets(self.cfg, self.seed, layer, t,
                                            w_std * math.sqrt(self.cfg.hidden_size))
            yield t.to(self.dtype)

    def expert_chunks(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        """MXFP4 blocks one expert at a time; the scales are kept for the `_scales` tensor that
        follows in file order."""
        if spec.name.endswith("_scales"):
            yield self._scales.pop(spec.name)
            return
        weight = spec.name.removesuffix("_blocks")
        _, std = _init_std(spec.name, self.cfg)
        e, out_features, groups, _ = spec.shape
        scales = []
        for expert in range(e):
            g = _generator(self.seed, weight, expert)
            w = torch.randn((out_features, groups * mxfp4.BLOCK), generator=g) * std
            blocks, sc = mxfp4.quantize(w)
            scales.append(sc)
            yield blocks.unsqueeze(0)
        self._scales[weight + "_scales"] = torch.stack(scales)

    def dense_expert_chunks(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        """Dequantized HF experts [E, in, out]: the transposed decode of the same MXFP4 weights."""
        _, std = _init_std(spec.name, self.cfg)
        e, in_features, out_features = spec.shape
        for expert in range(e):
            g = _generator(self.seed, spec.name, expert)
            w = torch.randn((out_features, in_features), generator=g) * std
            yield mxfp4.dequantize(*mxfp4.quantize(w)).t().contiguous().to(self.dtype).unsqueeze(0)

    def chunks(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        if spec.name.endswith(("_blocks", "_scales")):
            return self.expert_chunks(spec)
        if spec.name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return self.dense_expert_chunks(spec)
        return self.dense_chunks(spec)


def _plan_shards(specs: list[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.dtypes[0].itemsize * math.prod(s.shape)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def generation_config(eos_ids: list[int], pad_id: int, bos_id: int) -> dict:
    return {"bos_token_id": bos_id, "do_sample": True, "eos_token_id": eos_ids, "pad_token_id": pad_id}


def synthesize(
    out: str | Path,
    *,
    preset_name: str = "tiny",
    seed: int = 0,
    layout: str = "hf",
    expert_format: str = "mxfp4",
    config: GptOssConfig | None = None,
    shard_bytes: int = HF_SHARD_BYTES,
    router_skew: bool = False,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write a random-weight gpt-oss checkpoint to `out` atomically; return its path. A vocabulary
    of 201088 gets gpt-oss's real tokenizer (see `checkpoint_tokenizer`). With `router_skew`,
    router biases are offset so that expert usage per layer is skewed like gpt-oss-20b's
    published profiles (SKEW_TOP_QUARTER) instead of near uniform."""

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "original" and expert_format != "mxfp4":
        raise ValueError("the original layout stores experts only as MXFP4")
    cfg = config or preset(preset_name)
    if layout == "original":
        _check_original_expressible(cfg)
    tok = checkpoint_tokenizer(cfg.vocab_size)
    ids = special_ids(tok)
    cfg = cfg.replace(
        eos_token_id=ids["<|return|>"],
        pad_token_id=ids["<|endoftext|>"],
        quantization_config=MXFP4_QUANTIZATION_CONFIG if expert_format == "mxfp4" else None,
    )
    specs = expected_tensors(cfg, expert_format=expert_format)
    source = _Source(cfg, seed, router_skew=router_skew)
    total = sum(s.dtypes[0].itemsize * math.prod(s.shape) for s in specs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)

    def counted(spec: TensorSpec) -> Iterator[torch.Tensor]:
        for c in source.chunks(spec):
            bar.update(c.numel() * c.element_size())
            yield c

    with atomic_dir(out, force=force) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        gen = generation_config(
            [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
            ids["<|endoftext|>"],
            ids["<|startoftext|>"],
        )
        write_json(tmp / "generation_config.json", gen)
        if layout == "hf":
            _write_hf(tmp, cfg, specs, counted, shard_bytes)
        else:
            _write_original(tmp, cfg, specs, counted)
    bar.close()
    return Path(out)


def checkpoint_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """The tokenizer a synthetic checkpoint ships: gpt-oss's own (o200k_harmony, which needs the
    `tokenizer` extra) for its vocabulary of 201088, a small trained one of the same form for any
    other size."""

    if vocab_size == O200K_VOCAB_SIZE:
        return build_o200k_harmony()
    return build_synthetic_tokenizer(vocab_size)


def _check_original_expressible(cfg: GptOssConfig) -> None:
    """OpenAI's config has no truncate, eps or layer_types: refuse what it would silently drop."""
    want = cfg.replace(eos_token_id=None, pad_token_id=None)
    back = config_from_original_dict(want.to_original_dict())
    lost = [
        f.name
        for f in dataclasses.fields(want)
        if f.compare and getattr(back, f.name) != getattr(want, f.name)
    ]
    if lost:
        raise ValueError(
            f"the original layout cannot express this config ({', '.join(lost)} would change); "
            "use layout='hf'"
        )


def _write_hf(tmp: Path, cfg: GptOssConfig, specs, counted, shard_bytes: int) -> None:
    write_json(tmp / "config.json", cfg.to_hf_dict())
    by_name = {s.name: s for s in specs}
    shards = _plan_shards(specs, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else (
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        items = [(s.name, s.shape, s.dtypes[0]) for s in shard]
        total += write_streaming(tmp / fname, items, lambda n: counted(by_name[n]))
        weight_map.update({s.name: fname for s in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(tmp / INDEX_FILE, index)


def _write_original(tmp: Path, cfg: GptOssConfig, specs, counted) -> None:
    write_json(tmp / "config.json", cfg.to_original_dict())
    by_name = {s.name: s for s in specs}
    items: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    parts: dict[str, list[TensorSpec]] = {}
    for s in specs:
        oname = original_name(s.name)
        if oname in parts:
            parts[oname].append(s)
            continue
        parts[oname] = [s]
        items.append((oname, s.shape, s.dtypes[0]))
    # A fused qkv is the concatenation of q, k and v along the output dimension.
    items = [
        (n, (sum(p.shape[0] for p in parts[n]), *shape[1:]), dt) for n, shape, dt in items
    ]

    def chunks(oname: str) -> Iterator[torch.Tensor]:
        for s in parts[oname]:
            yield from counted(by_name[s.name])

    write_streaming(tmp / "model.safetensors", items, chunks)
