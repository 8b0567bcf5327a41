"""`ossedge verify`, which every conversion also runs before it keeps anything: an artifact against
the reference runtime applying the same recipe, on the packaged evaluation text, teacher-forced.

The reference is routed as the artifact routed. Each MoE layer's choice of experts is recorded in
the artifact (the ExecuTorch kernels, ONNX QMoE's router logits, Core ML's attention functions)
and imposed on the reference, so the logits are compared with the same experts in both:

  logits   |Δlogits|₂ / |logits|₂ at every decode step (and the prefill's last token): its 90th
           percentile rel_err_p90 within the tolerance (rel_err: the largest)
  routing  the artifact's router logits against the reference's for the same hidden states (or,
           where the artifact returns only ids and weights, its weights against the reference's
           softmax over the same experts): the 90th percentile over tokens × layers within the
           tolerance; and the experts it chose must be the top-k of its own router logits

The reference also rounds what the artifact's kernels round: the experts' inputs to int8 per
block of 32 (ossedge::moe_*), the quantized linears' inputs to int8 per token with bf16 group
scales (XNNPACK) or per block of 32 (ONNX Runtime's MatMulNBits). Most tokens then match to float
rounding; a value on a rounding boundary in one and not the other still moves a token's hidden
state, and attention carries that to later tokens, hence percentiles rather than the largest.

A wrong export (swapped gate/up, dropped sinks or biases, a wrong window, position or rotary
table) is off at every step whatever the routing. A router flip — two experts nearly tied and
the artifact's int8 or fp16 noise tipping the choice — is a change of routing, not an error: it is
counted (`routing.flips`) and shows only as a router-logit difference within the noise. Judging
the logits against a reference routed on its own (`free_routing`) makes each flip look like a
bug; that was the rule before, and it refused valid conversions of random-weight checkpoints.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from ossedge.runtime.checkpoint import open_checkpoint
from ossedge.runtime.errors import ArtifactError, ParityError
from ossedge.runtime.evaluate import default_text, token_metrics
from ossedge.runtime.model import GptOssModel, build_model
from ossedge.runtime.checkpoint import QuantizedCheckpoint
from ossedge.runtime.quantized import QuantizedView
from ossedge.runtime.routing import Routing
from ossedge.runtime.tokenizer import Tokenizer
from ossedge.targets import open_artifact, target_for_format
from tqdm import tqdm


def _target(manifest: dict):
    t = target_for_format(manifest.get("format"))
    if t is None:
        raise ArtifactError(f"not an ossedge artifact manifest (format {manifest.get('format')!r})")
    return t


def default_tolerance(manifest: dict, linears: str = "float") -> float:
    """The rel_err allowed against the reference with the same recipe, which rounds what the
    artifact rounds (`linears`: the linear layers' activations): the target's bound (float linears
    and the int8 expert inputs are matched to float rounding; int8 linear inputs, matched too,
    still land differently on a rounding boundary now and then; Core ML computes in fp16)."""
    return _target(manifest).tolerance(manifest, linears)


def expert_activations(manifest: dict) -> str:
    """How the artifact's expert kernels take their inputs, as its manifest records it, else as
    its target rounds them (ExecuTorch's ossedge::moe_* to int8 per block of 32: "int8-b32")."""
    experts = manifest.get("experts")
    if isinstance(experts, dict) and "activations" in experts:
        return experts["activations"]
    return _target(manifest).expert_activations(manifest)


def linear_activations(manifest: dict, model=None) -> str:
    """How the artifact's quantized linear layers take their inputs (model.linear_rounding):
    XNNPACK's int8 per token ("int8-asym-token"); ONNX Runtime's MatMulNBits int8 per block of 32
    ("int8-b32") once it may prepack its weights, float without; float in Core ML and wherever the
    recipe keeps the linears float."""
    return _target(manifest).linear_activations(manifest, model)


def verify_into_manifest(root: Path, ckpt_path, manifest: dict, write, *, tokens, progress):
    """Run `verify_artifact` on a freshly converted artifact, record the result in its manifest
    (`write(root, manifest)`), and raise ParityError when it failed (so nothing is kept)."""
    result = verify_artifact(root, ckpt_path, tokens=tokens, progress=progress)
    manifest["verify"] = result
    write(root, manifest)
    if not result["passed"]:
        raise ParityError(f"the converted artifact does not match the reference: "
                          f"{failure(result)}; nothing written")  # fmt: skip


def failure(result: dict) -> str | None:
    """Why a verify result failed, in a phrase (None when it passed)."""
    tol, r = result["tolerance"], result["routing"]
    if result["rel_err_p90"] > tol:
        return (f"rel_err {result['rel_err_p90']:.4g} at the 90th percentile of steps > tolerance "
                f"{tol:g}, with the same experts routed in both")
    if r["router_err_p90"] > tol:
        what = "router logits" if r["router_logits"] else "routing weights"
        return (f"{what} off by {r['router_err_p90']:.4g} at the 90th percentile of tokens × "
                f"layers > tolerance {tol:g}")
    if r["inconsistent"]:
        return (f"{r['inconsistent']} of {r['decisions']} expert choices are not the top-k of the "
                "artifact's own router logits")
    problems = (result.get("structure") or {}).get("problems") or []
    return problems[0] if problems else None


def _check_pair(root, reference, tok_art: Tokenizer, tok_ref: Tokenizer, ckpt, manifest) -> None:
    if tok_art.vocab_size != tok_ref.vocab_size or tok_art.encode("def f(x):\n") != tok_ref.encode(
        "def f(x):\n"
    ):
        raise ArtifactError(f"{root} and {reference} use different tokenizers; not comparable")
    if ckpt.config.to_hf_dict() != manifest["config"]:
        raise ArtifactError(f"{root} was not converted from a model with {reference}'s config")


def _run_artifact(model, x: torch.Tensor, prefill: int, progress: bool):
    """Teacher-forced logits of steps prefill-1 .. n-1 [S, V] and the routing of all n tokens."""
    n = x.shape[1]
    cache = model.new_cache()
    model.trace_routing()
    try:
        got = [model(x[:, :prefill], cache=cache)[0, 0]]
        for i in tqdm(range(prefill, n), desc="verify", unit="tok", disable=not progress):
            got.append(model(x[:, i : i + 1], cache=cache)[0, 0])
        routes = model.routing_trace()
    finally:
        model.trace_routing(False)
    return torch.stack(got).float(), routes


def _reference(model: GptOssModel, x: torch.Tensor, forced: list[torch.Tensor] | None):
    """Logits [n, V] of the reference, routed by `forced` (per layer [n, K]) or by its own router,
    and its router logits per layer [n, E]."""
    seen = []
    for n, block in enumerate(model.blocks):
        block.mlp.forced = None if forced is None else forced[n]
        block.mlp.seen = seen_n = []
        seen.append(seen_n)
    try:
        logits = model(x)[0].float()
    finally:
        for block in model.blocks:
            block.mlp.forced = block.mlp.seen = None
    return logits, [s[0] for s in seen]


def _rel_errors(art: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|Δ|₂/|ref|₂ per row, sorted."""
    return ((art - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).sort().values


def _p90(rels: torch.Tensor) -> float:
    return rels[max(0, math.ceil(0.9 * len(rels)) - 1)].item()


def routing_agreement(art: list[Routing], ref_logits: list[torch.Tensor], k: int) -> dict:
    """How the artifact's routing compares with the reference's router on the same hidden states:
    decisions (tokens × layers), flips (another set of experts than the reference's top-k),
    router_err (largest |Δ|₂/|ref|₂ of a token's router logits, or where the artifact gives no
    logits the largest weight difference over the same experts), inconsistent (choices that are
    not the top-k of the artifact's own logits)."""
    decisions = flips = inconsistent = 0
    errs, with_logits = [], all(r.logits is not None for r in art)
    for r, lg in zip(art, ref_logits, strict=True):
        chosen = r.ids.sort(dim=-1).values
        top = torch.topk(lg, k, dim=-1).indices.sort(dim=-1).values
        decisions += chosen.shape[0]
        flips += int((chosen != top).any(dim=-1).sum())
        if with_logits:
            own = torch.topk(r.logits, k, dim=-1).indices.sort(dim=-1).values
            inconsistent += int((chosen != own).any(dim=-1).sum())
            errs.append(_rel_errors(r.logits, lg))
        else:
            want = torch.softmax(lg.gather(1, r.ids), dim=-1)
            errs.append((r.weights - want).abs().amax(dim=-1))
    errs = torch.cat(errs).sort().values if errs else torch.zeros(1)
    return {"decisions": decisions, "flips": flips,
            "flip_rate": flips / decisions if decisions else 0.0, "router_logits": with_logits,
            "router_err": errs[-1].item(), "router_err_p90": _p90(errs),
            "inconsistent": inconsistent}  # fmt: skip


def verify_artifact(
    root: str | Path,
    reference: str | Path,
    *,
    tokens: int | None = None,
    tolerance: float | None = None,
    progress: bool = False,
    free_routing: bool = False,
) -> dict:
    """Teacher-forced decode of `tokens` tokens of the packaged evaluation text through the
    artifact (a prefill chunk, then one token per call, past the sliding window and the ring's
    wrap), judged against the reference with the same recipe routed as the artifact routed (see
    the module docstring; max_abs_err, rel_err, rel_err_p90, top1_same, routing; passed) and
    compared with the unquantized reference (kl_mean, top1). `free_routing` also reports the
    comparison with a reference routed on its own (the rule before routing was matched)."""
    t0 = time.perf_counter()
    model = open_artifact(root, checksums=True, engine="interpreter")
    manifest = model.manifest
    recipe = manifest["recipe"]
    ckpt = open_checkpoint(reference)
    tok_ref = Tokenizer.from_dir(reference)
    _check_pair(root, reference, Tokenizer.from_dir(root), tok_ref, ckpt, manifest)
    cfg = ckpt.config
    n = tokens or min(2 * cfg.sliding_window + 16, model.max_context)
    if not 2 <= n <= model.max_context:
        raise ValueError(f"--tokens must be 2..{model.max_context} (the artifact's context)")
    ids = tok_ref.encode(default_text()[0])[:n]
    if len(ids) < n:
        raise ValueError(f"the evaluation text has only {len(ids)} tokens; use --tokens ≤ that")
    plain = None
    if isinstance(ckpt, QuantizedCheckpoint):
        if ckpt.recipe != recipe:
            raise ArtifactError(
                f"{reference} is quantized with recipe {ckpt.recipe}, the artifact with {recipe}; "
                "give the original checkpoint as --reference"
            )
        same_source = ckpt
    else:
        same_source = QuantizedView(ckpt, recipe)
        plain = build_model(ckpt)
    linears = linear_activations(manifest, model)
    same = build_model(same_source, expert_activations=expert_activations(manifest),
                       linear_activations=linears)
    x = torch.tensor([ids], dtype=torch.long)
    prefill = min(model.max_prefill, max(1, n // 4))
    art, routes = _run_artifact(model, x, prefill, progress)
    steps = list(range(prefill - 1, n))
    ref_full, ref_router = _reference(same, x, [r.ids for r in routes])
    ref = ref_full[steps]
    rels = _rel_errors(art, ref)
    tol = tolerance if tolerance is not None else default_tolerance(manifest, linears)
    routing = routing_agreement(routes, ref_router, cfg.num_experts_per_tok)
    vs = plain(x)[0].float()[steps] if plain is not None else ref
    m = token_metrics(art, vs, torch.tensor(ids[prefill:] + [ids[-1]]))  # last target a dummy
    result = {
        "tokens": n,
        "prefill_tokens": prefill,
        "steps_compared": len(steps),
        "max_abs_err": (art - ref).abs().max().item(),
        "rel_err": rels[-1].item(),
        "rel_err_p90": _p90(rels),
        "top1_same": (art.argmax(-1) == ref.argmax(-1)).double().mean().item(),
        "routing": routing,
        "kl_mean": m["kl"].mean().item(),
        "top1": m["agree"].mean().item(),
        "unquantized_reference": plain is not None,
        "tolerance": tol,
        "linear_activations": linears,
        "recipe": recipe,
        "target": _target(manifest).name,
    }
    if free_routing:
        free = _rel_errors(art, _reference(same, x, None)[0][steps])
        result["free_routing"] = {"rel_err": free[-1].item(), "rel_err_p90": _p90(free),
                                  "passed": _p90(free) <= tol}  # fmt: skip
    structure = _target(manifest).check_structure(model, same_source)
    if structure is not None:
        result["structure"] = structure
    result["passed"] = failure(result) is None
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
