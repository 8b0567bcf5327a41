"""Quantization recipes: a recipe maps every tensor of a gpt-oss checkpoint (canonical HF name and
shape) to a storage format. A tensor no rule covers is an error, never silently kept.

Formats:
  keep       as stored in the checkpoint (bf16 for released non-expert tensors)
  mxfp4      MXFP4 blocks + scales (released expert bytes untouched, or encoded from dense)
  int8-ch    int8 per output channel (row), symmetric
  int4-g32   int4 groups of 32 inputs, symmetric
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = ("keep", "mxfp4", "int8-ch", "int4-g32")

_EXPERT_W = r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)(_blocks|_scales)?"
_ATTN_W = r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"
_EMBED = r"model\.embed_tokens\.weight"
_UNEMBED = r"lm_head\.weight"
# Small tensors whose precision matters far more than their bytes.
_SMALL = (
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias",
    r"model\.layers\.\d+\.self_attn\.sinks",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.mlp\.router\.(weight|bias)",
    r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)_bias",
    r"model\.norm\.weight",
)


class RecipeError(ValueError):
    """A tensor is not covered by the recipe, or the recipe name is unknown."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[tuple[str, str], ...]  # (full-match regex on the canonical name, format)

    def format_for(self, name: str, shape: tuple[int, ...]) -> str:
        """The storage format of tensor `name` with `shape`; RecipeError if no rule covers it."""
        for pattern, fmt in self.rules:
            if re.fullmatch(pattern, name):
                # MXFP4 parts ([.., G, 16] bytes, [.., G] scales) always hold G·32 inputs.
                packed = name.endswith(("_blocks", "_scales"))
                if fmt == "int4-g32" and not packed and shape[-1] % 32:
                    raise RecipeError(
                        f"recipe {self.name}: {name} {list(shape)} cannot use int4 groups of 32"
                    )
                return fmt
        raise RecipeError(
            f"recipe {self.name} has no rule for tensor {name} {list(shape)}; "
            "add one rather than keep it silently"
        )

    def plan(self, tensors: dict[str, tuple[int, ...]]) -> dict[str, str]:
        """Format of every tensor (name → shape) of a checkpoint."""
        return {name: self.format_for(name, shape) for name, shape in tensors.items()}

    def to_manifest(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description, "rules": list(self.rules)}


def _recipe(name: str, description: str, *, experts: str, attn: str, unembed: str, embed: str):
    return Recipe(
        name,
        description,
        (
            (_EXPERT_W, experts),
            (_ATTN_W, attn),
            (_UNEMBED, unembed),
            (_EMBED, embed),
            *((p, "keep") for p in _SMALL),
        ),
    )


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _recipe(
            "native",
            "the checkpoint as released: experts MXFP4, everything else as stored (bf16)",
            experts="mxfp4", attn="keep", unembed="keep", embed="keep",
        ),
        _recipe(
            "mobile",
            "experts MXFP4 untouched; attention and unembedding int4 g32; embedding int8 per row",
            experts="mxfp4", attn="int4-g32", unembed="int4-g32", embed="int8-ch",
        ),
        _recipe(
            "mobile-int8",
            "as mobile with attention and unembedding int8 per channel (quality first)",
            experts="mxfp4", attn="int8-ch", unembed="int8-ch", embed="int8-ch",
        ),
        _recipe(
            "int4",
            "as mobile with experts re-quantized to int4 g32, for backends without MXFP4",
            experts="int4-g32", attn="int4-g32", unembed="int4-g32", embed="int8-ch",
        ),
    )
}
DEFAULT_RECIPE = "mobile"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None
