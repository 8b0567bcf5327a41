"""The ExecuTorch target: gpt-oss as `.pte` + `.ptd`, experts through the `ossedge::` MoE ops.

Its contract, defined here once: the manifest format, the contract version written and those read,
the files every artifact has, and verify's tolerances. `TARGET` registers it (ossedge.targets)."""

from __future__ import annotations

from ossedge.targets.base import Target, by_linears, conversion_hooks

FORMAT = "ossedge-executorch"
# 1: four stacked expert tensors per layer; 2: one packed tensor per layer (an expert cache can
# read each expert with one pread). Conversions write 2; both run.
CONTRACT_VERSION = 2
READS = (1, 2)
FILES = ("model.pte", "model.ptd", "tokenizer.json")
# The relative logits error |Δ|₂/|ref|₂ allowed at 90% of the steps against the reference with
# the same recipe, routed as the artifact routed and rounding what its kernels round (see
# convert/verify.py). Float linear layers (recipe native): the program computes what that reference
# does (measured ~1e-6). XNNPACK's int8 linears: matched too, but a value on a rounding boundary in
# one and not the other moves a token, and attention carries it on (p90 ≤ 0.036 measured over 20
# random-weight checkpoints per recipe: benchmarks/results/verify-sweep).
TOLERANCE_FLOAT = 1e-3
TOLERANCE_QUANTIZED = 8e-2


TARGET = Target(
    name="executorch", title="ExecuTorch", format=FORMAT, contract=CONTRACT_VERSION, reads=READS,
    files=FILES, platforms=("android", "ios"),
    hooks={**conversion_hooks("ossedge.targets.executorch.export"),
           "open": "ossedge.targets.executorch.runner:ExecuTorchModel",
           "footprint": "ossedge.targets.executorch.memory:executorch_footprint",
           "weights": "ossedge.targets.executorch.memory:weights",
           "kv_bytes": "ossedge.targets.executorch.memory:kv_bytes",
           "check_structure": "ossedge.targets.executorch.checks:check_structure"},
    tolerance=by_linears(TOLERANCE_FLOAT, TOLERANCE_QUANTIZED),
    # ossedge::moe_* round the experts' inputs to int8 per block of 32
    expert_activations=lambda manifest: "int8-b32",
    # XNNPACK's quantized linears take int8 inputs per token
    linear_activations=lambda manifest, model: "float" if manifest.get("recipe") == "native"
    else "int8-asym-token",
    open_options=frozenset({"expert_cache", "cache_aware_routing", "routing_pool", "threads"}),
    runners=("pybindings", "native"),
    convert_options=frozenset({"max_prefill", "profile", "lookahead", "contract"}),
    streams=True,
)  # fmt: skip
