"""Recipes cover every tensor of gpt-oss exactly as documented, and nothing else."""

from __future__ import annotations

from collections import Counter

import pytest

from ossedge.quantize.recipes import DEFAULT_RECIPE, RECIPES, RecipeError, get_recipe
from ossedge.runtime.checkpoint import expected_tensors
from ossedge.runtime.config import preset


def _tensors(expert_format: str = "mxfp4") -> dict[str, tuple[int, ...]]:
    return {s.name: s.shape for s in expected_tensors(preset("20b"), expert_format=expert_format)}


@pytest.mark.parametrize("name", sorted(RECIPES), ids=sorted(RECIPES))
@pytest.mark.parametrize("experts", ["mxfp4", "dense"], ids=["mxfp4-ckpt", "dense-ckpt"])
def test_every_tensor_of_the_20b_is_covered(name: str, experts: str) -> None:
    plan = get_recipe(name).plan(_tensors(experts))
    assert len(plan) == len(_tensors(experts))


def test_mobile_formats_per_tensor() -> None:
    plan = get_recipe("mobile").plan(_tensors())
    assert plan["model.layers.3.mlp.experts.gate_up_proj_blocks"] == "mxfp4"
    assert plan["model.layers.3.mlp.experts.down_proj_scales"] == "mxfp4"
    assert plan["model.layers.3.self_attn.q_proj.weight"] == "int4-g32"
    assert plan["model.layers.3.self_attn.o_proj.weight"] == "int4-g32"
    assert plan["lm_head.weight"] == "int4-g32"
    assert plan["model.embed_tokens.weight"] == "int8-ch"
    for small in (
        "model.layers.3.mlp.router.weight",
        "model.layers.3.self_attn.sinks",
        "model.layers.3.self_attn.q_proj.bias",
        "model.layers.3.mlp.experts.down_proj_bias",
        "model.layers.3.input_layernorm.weight",
        "model.norm.weight",
    ):
        assert plan[small] == "keep", small


def test_recipes_differ_where_documented() -> None:
    counts = {n: Counter(r.plan(_tensors()).values()) for n, r in RECIPES.items()}
    assert set(counts["native"]) == {"mxfp4", "keep"}
    assert counts["mobile-int8"]["int8-ch"] == 24 * 4 + 2  # attention, embed and unembed
    assert counts["int4"]["mxfp4"] == 0
    assert counts["int4"]["int4-g32"] == counts["mobile"]["int4-g32"] + 24 * 4  # + expert tensors
    assert DEFAULT_RECIPE in RECIPES


def test_uncovered_tensor_is_an_error() -> None:
    with pytest.raises(RecipeError, match="no rule for tensor model.layers.0.mlp.shared_expert"):
        get_recipe("mobile").format_for("model.layers.0.mlp.shared_expert.weight", (64, 64))


def test_unknown_recipe_names_the_choices() -> None:
    with pytest.raises(RecipeError, match="mobile-int8"):
        get_recipe("mobile-int3")


def test_int4_needs_inputs_divisible_by_32() -> None:
    with pytest.raises(RecipeError, match="groups of 32"):
        get_recipe("mobile").format_for("model.layers.0.self_attn.q_proj.weight", (64, 48))
