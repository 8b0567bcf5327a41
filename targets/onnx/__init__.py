"""The ONNX target: gpt-oss as model.onnx + external data for ONNX Runtime (and onnxruntime-genai).

Its contract, defined here once; `TARGET` registers it (ossedge.targets)."""

from __future__ import annotations

from ossedge.targets.base import Target, by_linears, conversion_hooks

FORMAT = "ossedge-onnx"
CONTRACT_VERSION = 1
READS = (1,)
FILES = ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
         "genai_config.json")  # fmt: skip
PREFILL_CHUNK = 128  # tokens per call the runner feeds a long prompt in (bounds the logits)
# verify's rel_err bound at the 90th percentile: ONNX Runtime's float MatMulNBits computes what the
# reference does (measured ≤ 3e-6 over 21 checkpoints per recipe); with prepacked int8 inputs a
# rounding boundary moves a token now and then, as on ExecuTorch.
TOLERANCE_FLOAT = 1e-3
TOLERANCE_QUANTIZED = 8e-2


def _linear_activations(manifest: dict, model) -> str:
    """MatMulNBits rounds its inputs to int8 per block of 32 once it may prepack its weights
    (`OnnxModel.prepack`), float without; float wherever the recipe keeps the linears float."""
    if manifest.get("recipe") != "native" and getattr(model, "prepack", False):
        return "int8-b32"
    return "float"


TARGET = Target(
    name="onnx", title="ONNX", format=FORMAT, contract=CONTRACT_VERSION, reads=READS, files=FILES,
    platforms=("android", "ios"),
    hooks={**conversion_hooks("ossedge.targets.onnx.export"),
           "open": "ossedge.targets.onnx.runner:OnnxModel",
           "footprint": "ossedge.targets.onnx.memory:onnx_footprint",
           "weights": "ossedge.targets.onnx.memory:weights",
           "kv_bytes": "ossedge.targets.onnx.memory:kv_bytes"},
    tolerance=by_linears(TOLERANCE_FLOAT, TOLERANCE_QUANTIZED),
    expert_activations=lambda manifest: "float", linear_activations=_linear_activations,
    device_plans=False, open_options=frozenset({"threads"}), runners=("onnxruntime",),
)  # fmt: skip
