"""Where a conversion reads its weights: a quantized checkpoint as it is, or a plain one with a
recipe applied weight by weight in memory."""

from __future__ import annotations

from pathlib import Path

from ossedge.quantize.recipes import DEFAULT_RECIPE
from ossedge.runtime.checkpoint import QuantizedCheckpoint, open_checkpoint
from ossedge.runtime.errors import OssedgeError
from ossedge.runtime.quantized import QuantizedView


class SourceError(OssedgeError):
    """The checkpoint and the requested recipe do not go together."""


def weight_source(ckpt_path: str | Path, recipe: str | None, *, default: str | None = None):
    """(source with `.config` and `.weight(name)`, recipe name). A quantized checkpoint keeps its
    recipe (asking for another is an error); a plain one gets `recipe`, else `default`, else the
    default recipe."""

    ckpt = open_checkpoint(ckpt_path)
    if isinstance(ckpt, QuantizedCheckpoint):
        if recipe is not None and recipe != ckpt.recipe:
            raise SourceError(
                f"{ckpt_path} is already quantized with recipe {ckpt.recipe}; convert the "
                f"original checkpoint for --recipe {recipe}, or drop --recipe"
            )
        return ckpt, ckpt.recipe
    name = recipe or default or DEFAULT_RECIPE
    return QuantizedView(ckpt, name), name
