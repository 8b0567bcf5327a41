"""The Core ML target: gpt-oss as chunked multifunction `.mlpackage`s (attention, experts, head).

Its contract, defined here once; `TARGET` registers it (ossedge.targets)."""

from __future__ import annotations

from ossedge.runtime.errors import ArtifactError
from ossedge.targets.base import Target, conversion_hooks

FORMAT = "ossedge-coreml"
CONTRACT_VERSION = 1
READS = (1,)
TOLERANCE_FP16 = 2e-2  # verify's rel_err bound: Core ML computes in fp16


class CoreMLArtifactError(ArtifactError):
    """A Core ML artifact is incomplete, corrupt, or cannot run here."""


def plan_recipes(device, preference: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(recipe, deployment target) pairs a device runs, best first: its newest deployment
    target; iOS 18 cannot store MXFP4 experts compactly, so int4 experts only there."""
    dt = device.targets.coreml
    if dt is None:
        return []
    return [(r, dt) for r in preference if dt == "ios26" or r == "int4"]


TARGET = Target(
    name="coreml", title="Core ML", format=FORMAT, contract=CONTRACT_VERSION, reads=READS,
    files=None, platforms=("ios",),
    hooks={**conversion_hooks("ossedge.targets.coreml.convert"),
           "open": "ossedge.targets.coreml.runner:CoreMLModel",
           "footprint": "ossedge.targets.coreml.memory:coreml_footprint",
           "weights": "ossedge.targets.coreml.memory:weights",
           "kv_bytes": "ossedge.targets.coreml.memory:kv_bytes",
           "check_structure": "ossedge.targets.coreml.checks:check_structure",
           "plan_recipes": "ossedge.targets.coreml:plan_recipes"},
    tolerance=lambda manifest, linears: TOLERANCE_FP16,
    expert_activations=lambda manifest: "float", linear_activations=lambda manifest, model: "float",
    error=CoreMLArtifactError, open_options=frozenset({"engine"}),
    convert_options=frozenset({"deployment_target", "chunk_mb"}),
    runners=("coremltools",), predicts_on="Darwin",
)  # fmt: skip
