"""The Core ML target: gpt-oss as chunked multifunction `.mlpackage`s (attention, experts, head).

Its contract, defined here once; `TARGET` registers it (ossedge.targets)."""

from __future__ import annotations

from ossedge.runtime.errors import ArtifactError
from ossedge.targets.base import Target

FORMAT = "ossedge-coreml"
CONTRACT_VERSION = 1
READS = (1,)
TOLERANCE_FP16 = 2e-2  # verify's rel_err bound: Core ML computes in fp16


class CoreMLArtifactError(ArtifactError):
    """A Core ML artifact is incomplete, corrupt, or cannot run here."""


def _convert(ckpt, out, **options) -> dict:
    from ossedge.targets.coreml.convert import convert

    return convert(ckpt, out, **options)


def _open(root, **options):
    from ossedge.targets.coreml.runner import CoreMLModel

    return CoreMLModel(root, **options)


def _footprint(cfg, recipe: str, context: int, **kw):
    from ossedge.targets.memory import coreml_footprint

    kw.pop("max_prefill", None)
    return coreml_footprint(cfg, recipe, context, **kw)


def _check_structure(model, source) -> dict:
    from ossedge.targets.coreml.checks import check_structure

    return check_structure(model, source)


TARGET = Target(
    name="coreml", title="Core ML", format=FORMAT, contract=CONTRACT_VERSION, reads=READS,
    files=None, platforms=("ios",), convert=_convert, open=_open, footprint=_footprint,
    tolerance=lambda manifest, linears: TOLERANCE_FP16,
    expert_activations=lambda manifest: "float", linear_activations=lambda manifest, model: "float",
    check_structure=_check_structure, error=CoreMLArtifactError, open_options=frozenset({"engine"}),
)  # fmt: skip
