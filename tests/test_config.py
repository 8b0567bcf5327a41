"""Config loading: the 20b preset is the released config, errors name the key and the file, keys that
change nothing (fine-tuning tools' stamps) load with one warning (errors under --strict-config), the
OpenAI original form and transformers 5's `rope_parameters` form load to the same config."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from clitools import assert_one_line_error, run

from ossedge.assets import default_model_dir
from ossedge.runtime import config
from ossedge.runtime.config import (
    FULL,
    SLIDING,
    GptOssConfig,
    config_from_hf_dict,
    config_from_original_dict,
    load_config,
    preset,
)
from ossedge.runtime.errors import ConfigError

OFFICIAL = Path(__file__).resolve().parents[1] / "runtime" / "data" / "gpt-oss-20b.config.json"
# openai/gpt-oss-20b original/config.json as released.
OFFICIAL_ORIGINAL = {
    "num_hidden_layers": 24,
    "num_experts": 32,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1,
    "rope_ntk_beta": 32,
}


def official() -> dict[str, Any]:
    return json.loads(OFFICIAL.read_text())


def write(tmp_path: Path, d: dict[str, Any], name: str = "config.json") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    return path


# -- the 20b preset -----------------------------------------------------------------------------


def test_packaged_config_is_the_released_one() -> None:
    packaged = resources.files("ossedge.runtime").joinpath("data/gpt-oss-20b.config.json")
    assert json.loads(packaged.read_text()) == official()


def test_20b_preset_matches_official_config_json() -> None:
    got = preset("20b").to_hf_dict()
    want = official()
    want.pop("transformers_version")
    assert got == want


def test_20b_preset_has_the_published_shape() -> None:
    c = preset("20b")
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (
        24, 2880, 2880, 201088,
    )
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 8, 64)
    assert (c.q_size, c.kv_size) == (4096, 512)
    assert (c.num_local_experts, c.num_experts_per_tok) == (32, 4)
    assert (c.sliding_window, c.rms_norm_eps, c.swiglu_limit) == (128, 1e-5, 7.0)
    assert c.layer_types == tuple(SLIDING if n % 2 == 0 else FULL for n in range(24))
    assert [c.is_sliding(n) for n in (0, 1, 22, 23)] == [True, False, True, False]
    assert c.rope_theta == 150000.0 and c.max_position_embeddings == 131072
    y = c.rope_scaling
    assert (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow) == (
        32.0, 4096, 32.0, 1.0,
    )
    assert y.truncate is False
    assert y.attention_factor == pytest.approx(1.3465735902799727, rel=1e-12)
    assert (c.eos_token_id, c.pad_token_id) == (200002, 199999)
    assert c.quantization_config["quant_method"] == "mxfp4"


def test_tiny_preset_keeps_the_20b_rope_and_layer_pattern() -> None:
    tiny, big = preset("tiny"), preset("20b")
    assert tiny.rope_scaling == big.rope_scaling and tiny.rope_theta == big.rope_theta
    assert tiny.layer_types == big.layer_types[:4] and tiny.swiglu_limit == big.swiglu_limit
    assert (tiny.hidden_size, tiny.num_local_experts, tiny.num_experts_per_tok) == (64, 4, 2)


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ConfigError, match="'40b'"):
        preset("40b")


def test_load_config_accepts_file_or_directory(tmp_path: Path) -> None:
    path = write(tmp_path, official())
    assert load_config(path) == load_config(tmp_path) == preset("20b")


# -- errors name the key and the file -----------------------------------------------------------


def mutated(**edits: Any) -> dict[str, Any]:
    """The official config with keys replaced (value `...` deletes the key)."""
    d = official()
    for key, value in edits.items():
        if value is ...:
            del d[key]
        else:
            d[key] = value
    return d


def with_layer_types(types: list[str]) -> dict[str, Any]:
    return mutated(layer_types=types)


BAD_CONFIGS = [
    ("pruned-heads", mutated(pruned_heads={"0": [1]}), "pruned_heads"),
    ("encoder-decoder", mutated(is_encoder_decoder=True), "is_encoder_decoder"),
    ("no-attention-bias", mutated(attention_bias=False), "attention_bias"),
    ("gelu", mutated(hidden_act="gelu"), "hidden_act"),
    ("missing-hidden_size", mutated(hidden_size=...), "hidden_size"),
    ("missing-vocab_size", mutated(vocab_size=...), "vocab_size"),
    ("missing-layer_types", mutated(layer_types=...), "layer_types"),
    ("missing-rope_scaling", mutated(rope_scaling=...), "rope_scaling"),
    ("missing-rope_theta", mutated(rope_theta=...), "rope_theta"),
    ("missing-model_type", mutated(model_type=...), "model_type"),
    ("missing-num_experts_per_tok", mutated(num_experts_per_tok=...), "num_experts_per_tok"),
    ("heads-not-multiple-of-kv", mutated(num_key_value_heads=7), "num_attention_heads"),
    ("layer_types-too-short", with_layer_types([SLIDING, FULL] * 11), "layer_types"),
    ("bad-layer-type", with_layer_types([SLIDING, FULL, SLIDING, "local"] + [FULL] * 20),
     "layer_types[3]"),
    ("layer_types-not-list", mutated(layer_types="sliding_attention"), "layer_types"),
    ("zero-experts", mutated(num_local_experts=0), "num_local_experts"),
    ("top-k-exceeds-experts", mutated(num_experts_per_tok=33), "num_experts_per_tok"),
    ("experts_per_token-disagrees", mutated(experts_per_token=2), "experts_per_token"),
    ("odd-head_dim", mutated(head_dim=63), "head_dim"),
    ("hidden-not-mxfp4-blocks", mutated(hidden_size=2881), "hidden_size"),
    ("wrong-model_type", mutated(model_type="llama"), "model_type"),
    ("tied-embeddings", mutated(tie_word_embeddings=True), "tie_word_embeddings"),
    ("wrong-swiglu_alpha", mutated(swiglu_alpha=1.0), "swiglu_alpha"),
    ("not-mxfp4", mutated(quantization_config={"quant_method": "gptq"}), "quant_method"),
    ("rope-not-yarn", mutated(rope_scaling={**official()["rope_scaling"], "rope_type": "linear"}),
     "rope_type"),
    ("rope-unknown-key", mutated(rope_scaling={**official()["rope_scaling"], "alpha": 1}), "alpha"),
    ("rope-missing-factor",
     mutated(rope_scaling={k: v for k, v in official()["rope_scaling"].items() if k != "factor"}),
     "factor"),
    ("negative-eps", mutated(rms_norm_eps=-1e-5), "rms_norm_eps"),
    ("float-vocab", mutated(vocab_size=201088.0), "vocab_size"),
    ("both-rope-forms", mutated(rope_parameters={**official()["rope_scaling"], "rope_theta": 1e4}),
     "rope_parameters"),
]


@pytest.mark.parametrize(
    ("d", "key"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_hf_config_names_key_and_file(tmp_path: Path, d: dict[str, Any], key: str) -> None:
    path = write(tmp_path, d)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert key in msg and str(path) in msg, msg


ORIGINAL_BAD = [
    ("missing-key", {k: v for k, v in OFFICIAL_ORIGINAL.items() if k != "rope_ntk_beta"},
     "rope_ntk_beta"),
    ("heads-not-multiple-of-kv", {**OFFICIAL_ORIGINAL, "num_key_value_heads": 7},
     "num_attention_heads"),
]


@pytest.mark.parametrize(
    ("d", "key"), [c[1:] for c in ORIGINAL_BAD], ids=[c[0] for c in ORIGINAL_BAD]
)
def test_bad_original_config_names_key_and_file(
    tmp_path: Path, d: dict[str, Any], key: str
) -> None:
    path = write(tmp_path, d, "original/config.json")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert key in msg and str(path) in msg, msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")],
    ids=["invalid-json", "not-an-object"],
)
def test_unreadable_config_names_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_config_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json") as err:
        load_config(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match="layer_types"):
        preset("tiny").replace(num_hidden_layers=3)


# -- other forms --------------------------------------------------------------------------------


def test_original_20b_config_equals_preset(tmp_path: Path) -> None:
    got = load_config(write(tmp_path, OFFICIAL_ORIGINAL, "original/config.json"))
    # The original config carries neither token ids nor a quantization block.
    assert got == preset("20b").replace(eos_token_id=None, pad_token_id=None)


@pytest.mark.parametrize("name", ["tiny", "20b"])
def test_original_round_trip(tmp_path: Path, name: str) -> None:
    cfg = preset(name).replace(eos_token_id=None, pad_token_id=None)
    d = cfg.to_original_dict()
    assert set(d) == set(OFFICIAL_ORIGINAL)
    assert load_config(write(tmp_path, d, "original/config.json")) == cfg
    assert config_from_original_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("name", ["tiny", "20b"])
def test_hf_round_trip(tmp_path: Path, name: str) -> None:
    cfg = preset(name)
    assert load_config(write(tmp_path, cfg.to_hf_dict())) == cfg


def test_transformers5_rope_parameters_form() -> None:
    d = official()
    rope = d.pop("rope_scaling")
    d["rope_parameters"] = {**rope, "rope_theta": d.pop("rope_theta")}
    assert config_from_hf_dict(d) == preset("20b")


def test_config_saved_by_transformers5_loads(tmp_path: Path) -> None:
    """`save_pretrained` in transformers 5 writes `rope_parameters`, `swiglu_alpha` and more."""
    import transformers

    hf = transformers.GptOssConfig(**copy.deepcopy(official()))
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved  # the form under test
    assert load_config(tmp_path) == preset("20b")


@pytest.mark.parametrize(
    ("rope_edit", "truncate"),
    [({"truncate": False}, False), ({"truncate": True}, True), ({}, True)],
    ids=["false", "true", "absent-defaults-true"],
)
@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_truncate_flag(rope_edit: dict[str, Any], truncate: bool, form: str) -> None:
    d = official()
    rope = {k: v for k, v in d.pop("rope_scaling").items() if k != "truncate"} | rope_edit
    if form == "rope_parameters":
        rope["rope_theta"] = d.pop("rope_theta")
    d[form] = rope
    assert config_from_hf_dict(d).rope_scaling.truncate is truncate


# What fine-tuning tools write into a gpt-oss config.json (transformers' generic attributes and
# their own stamps): transformers loads it, and so must ossedge.
FINE_TUNED = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
              "chunk_size_feed_forward": 0, "pruned_heads": {}, "is_encoder_decoder": False,
              "return_dict": True, "unsloth_fixed": True, "unsloth_version": "2025.8.1",
              "moe_impl": "fast"}  # fmt: skip


def test_fine_tuned_config_loads_with_one_warning(tmp_path: Path) -> None:
    path = write(tmp_path, mutated(**FINE_TUNED))
    with pytest.warns(config.ConfigWarning) as caught:
        assert load_config(path) == preset("20b")
    assert len(caught) == 1
    msg = str(caught[0].message)
    for key in ("id2label", "label2id", "chunk_size_feed_forward", "return_dict",
                "unsloth_fixed", "unsloth_version", "moe_impl"):  # fmt: skip
        assert key in msg, msg
    assert "pruned_heads" not in msg and str(path) in msg  # at their neutral values: silent
    config.strict(True)
    try:
        with pytest.raises(ConfigError, match="--strict-config refuses") as err:
            load_config(path)
        assert "unsloth_version" in str(err.value)
    finally:
        config.strict(False)


def test_original_config_extra_keys_are_warned(tmp_path: Path) -> None:
    path = write(tmp_path, {**OFFICIAL_ORIGINAL, "notes": "fine-tuned"}, "original/config.json")
    with pytest.warns(config.ConfigWarning, match="notes"):
        assert load_config(path) == load_config(write(tmp_path / "o", OFFICIAL_ORIGINAL,
                                                      "original/config.json"))  # fmt: skip


def test_cli_warns_in_one_line_and_strict_refuses(tmp_path: Path) -> None:
    ckpt = tmp_path / "ft"
    shutil.copytree(default_model_dir(), ckpt)
    d = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**d, **FINE_TUNED}))
    p = run("inspect", str(ckpt))
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "unsloth_fixed" in lines[0]
    assert_one_line_error(run("--strict-config", "inspect", str(ckpt)), "unsloth_fixed")
    (ckpt / "config.json").write_text(json.dumps({**d, "tie_word_embeddings": True}))
    assert_one_line_error(run("inspect", str(ckpt)), "tie_word_embeddings is True",
                          "requires False")  # fmt: skip


def test_ignored_hf_keys_do_not_change_the_config() -> None:
    d = mutated(use_cache=False, torch_dtype="bfloat16", initializer_range=0.5, bos_token_id=1)
    assert config_from_hf_dict(d) == preset("20b")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("tiny").hidden_size = 128  # type: ignore[misc]
    assert isinstance(preset("tiny"), GptOssConfig)
