"""The ONNX target: gpt-oss as model.onnx + external data for ONNX Runtime (and onnxruntime-genai).

Its contract, defined here once; `TARGET` registers it (ossedge.targets)."""

from __future__ import annotations

from ossedge.targets.base import Target

FORMAT = "ossedge-onnx"
CONTRACT_VERSION = 1
READS = (1,)
FILES = ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
         "genai_config.json")  # fmt: skip
# verify's rel_err bound at the 90th percentile: ONNX Runtime's float MatMulNBits computes what the
# reference does (measured ≤ 3e-6 over 21 checkpoints per recipe); with prepacked int8 inputs a
# rounding boundary moves a token now and then, as on ExecuTorch.
TOLERANCE_FLOAT = 1e-3
TOLERANCE_QUANTIZED = 8e-2


def _convert(ckpt, out, **options) -> dict:
    from ossedge.targets.onnx.export import convert

    return convert(ckpt, out, **options)


def _open(root, **options):
    from ossedge.targets.onnx.runner import OnnxModel

    return OnnxModel(root, **options)


def _footprint(cfg, recipe: str, context: int, **kw):
    from ossedge.targets.memory import onnx_footprint

    kw.pop("max_prefill", None)
    return onnx_footprint(cfg, recipe, context, **kw)


def _linear_activations(manifest: dict, model) -> str:
    """MatMulNBits rounds its inputs to int8 per block of 32 once it may prepack its weights
    (`OnnxModel.prepack`), float without; float wherever the recipe keeps the linears float."""
    if manifest.get("recipe") != "native" and getattr(model, "prepack", False):
        return "int8-b32"
    return "float"


TARGET = Target(
    name="onnx", title="ONNX", format=FORMAT, contract=CONTRACT_VERSION, reads=READS, files=FILES,
    platforms=("android", "ios"), convert=_convert, open=_open, footprint=_footprint,
    tolerance=lambda manifest, linears: TOLERANCE_FLOAT if linears == "float" else TOLERANCE_QUANTIZED,
    expert_activations=lambda manifest: "float", linear_activations=_linear_activations,
    check_structure=lambda model, source: None,
)  # fmt: skip
