"""The Core AI target: gpt-oss as `.aimodel` assets (Apple's Core AI), layer chunks with a
prefill and a decode function each, a head, and a host-read embedding file. Converted with
coreai-torch and run — on Linux too — by coreai-core's own runtime (`pip install
'ossedge[coreai]'`).

Its contract, defined here once; `TARGET` registers it (ossedge.targets)."""

from __future__ import annotations

from ossedge.runtime.errors import ArtifactError
from ossedge.targets.base import Target, conversion_hooks

FORMAT = "ossedge-coreai"
CONTRACT_VERSION = 1
READS = (1,)
# verify's rel_err bound: the programs compute in fp32 from the recipe's stored weights, as the
# reference does (measured on the bundled model: ~6e-7)
TOLERANCE = 1e-4
INSTALL_HINT = "pip install 'ossedge[coreai]'"
# rows of a linear layer a program decodes at once: the unembedding of the 20b in 8 pieces
PIECE_ELEMENTS = 1 << 26
OS_VERSION = "v27"  # the OS release coreai-core serializes assets for (iOS / macOS 27)


class CoreAIArtifactError(ArtifactError):
    """A Core AI artifact is incomplete, corrupt, or cannot run here."""


def plan_recipes(device, preference: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(recipe, OS) pairs a device runs: Apple devices (those with Core ML), every recipe, on the
    OS release Core AI assets are made for."""
    return [(r, f"os{OS_VERSION[1:]}") for r in preference] if device.targets.coreml else []


TARGET = Target(
    name="coreai", title="Core AI", format=FORMAT, contract=CONTRACT_VERSION, reads=READS,
    files=None, platforms=("ios",),
    hooks={**conversion_hooks("ossedge.targets.coreai.convert"),
           "open": "ossedge.targets.coreai.runner:CoreAIModel",
           "footprint": "ossedge.targets.coreai.memory:coreai_footprint",
           "weights": "ossedge.targets.coreai.memory:weights",
           "kv_bytes": "ossedge.targets.coreai.memory:kv_bytes",
           "check_structure": "ossedge.targets.coreai.checks:check_structure",
           "plan_recipes": "ossedge.targets.coreai:plan_recipes"},
    tolerance=lambda manifest, linears: TOLERANCE,
    expert_activations=lambda manifest: "float", linear_activations=lambda manifest, model: "float",
    error=CoreAIArtifactError, open_options=frozenset({"load"}),
    convert_options=frozenset({"chunk_mb"}),
    runners=("coreai",),
)  # fmt: skip
