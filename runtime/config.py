"""gpt-oss configuration, read from an HF `config.json` or an OpenAI `original/config.json`.

As transformers does, keys that change nothing are accepted: transformers' generic
`PretrainedConfig` attributes (`id2label`, `chunk_size_feed_forward`, …) and keys written by other
tools (`unsloth_version`, …), named in one `ConfigWarning` per file (`strict(True)`, the CLI's
`--strict-config`, makes them errors). Missing keys and values that would change the model's math
(rope type, activation, biases, tied embeddings, pruned heads, layer-type lengths, …) raise
`ConfigError` naming the key, its value and what gpt-oss needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ossedge.runtime.errors import ConfigError

# The KV cache length conversions and plans take when none is given (at most the model's).
DEFAULT_CONTEXT = 4096
SLIDING = "sliding_attention"
FULL = "full_attention"

# HF keys that carry no information the model needs; accepted and ignored.
HF_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "initializer_range",
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "use_cache",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "_name_or_path",
    }
)
# transformers' generic PretrainedConfig attributes (and what its save_pretrained writes) that do
# not change a decoder-only model's outputs: generation defaults, labels, export flags, ids.
PRETRAINED_KEYS = frozenset(
    {
        "return_dict", "output_hidden_states", "output_attentions", "torchscript",
        "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward", "is_decoder",
        "cross_attention_hidden_size", "max_length", "min_length", "do_sample",
        "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
        "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "finetuning_task", "id2label", "label2id", "num_labels", "tokenizer_class", "prefix",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
        "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
    }
)  # fmt: skip
# Generic attributes accepted only at the value that leaves a decoder-only model unchanged.
PRETRAINED_NEUTRAL = {
    "pruned_heads": {},
    "is_encoder_decoder": False,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
}
# HF keys that must hold one fixed value for a gpt-oss model.
HF_FIXED_KEYS = {
    "model_type": "gpt_oss",
    "attention_bias": True,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    # Written by transformers 5 (`save_pretrained`); the model hard-codes this SwiGLU alpha.
    "swiglu_alpha": 1.702,
}
ORIGINAL_KEYS = frozenset(
    {
        "num_hidden_layers",
        "num_experts",
        "experts_per_token",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "swiglu_limit",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "sliding_window",
        "initial_context_length",
        "rope_theta",
        "rope_scaling_factor",
        "rope_ntk_alpha",
        "rope_ntk_beta",
    }
)
YARN_KEYS = frozenset(
    {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"}
)


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    truncate: bool

    @property
    def attention_factor(self) -> float:
        """cos and sin are both scaled by this (YaRN 'mscale')."""
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1.0 else 1.0


@dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnScaling
    swiglu_limit: float
    max_position_embeddings: int
    initial_context_length: int
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # -- validation ----------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key} {why}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "sliding_window",
            "max_position_embeddings",
            "initial_context_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                "num_attention_heads",
                f"({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})",
            )
        if self.head_dim % 2:
            raise bad("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_size % 32:
            raise bad("hidden_size", f"must be a multiple of 32 (MXFP4 blocks), got {self.hidden_size}")
        if self.intermediate_size % 32:
            raise bad(
                "intermediate_size",
                f"must be a multiple of 32 (MXFP4 blocks), got {self.intermediate_size}",
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise bad(
                "num_experts_per_tok",
                f"({self.num_experts_per_tok}) exceeds num_local_experts ({self.num_local_experts})",
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad(
                "layer_types",
                f"has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}",
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise bad(f"layer_types[{i}]", f"is {kind!r}; expected {SLIDING!r} or {FULL!r}")
        if not self.rms_norm_eps > 0:
            raise bad("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 1:
            raise bad("rope_theta", f"must be > 1, got {self.rope_theta}")
        if not self.swiglu_limit > 0:
            raise bad("swiglu_limit", f"must be positive, got {self.swiglu_limit}")
        y = self.rope_scaling
        if not y.factor >= 1 or y.beta_fast <= 0 or y.beta_slow <= 0:
            raise bad("rope_scaling", f"has invalid YaRN parameters {y}")

    # -- serialization -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        y = self.rope_scaling
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "experts_per_token": self.num_experts_per_tok,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "rope_type": "yarn",
                "truncate": y.truncate,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config
        return out

    def to_original_dict(self) -> dict[str, Any]:
        y = self.rope_scaling
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": y.factor,
            "rope_ntk_alpha": y.beta_slow,
            "rope_ntk_beta": y.beta_fast,
        }

    def replace(self, **changes: Any) -> GptOssConfig:
        return dataclasses.replace(self, **changes)


class ConfigWarning(UserWarning):
    """A config.json carries keys ossedge ignores (they change nothing)."""


_STRICT = [False]


def strict(on: bool) -> None:
    """Make ignored keys errors (the CLI's --strict-config) or, again, warnings."""
    _STRICT[0] = on


def _ignore(keys: list[str], source: str, known: str) -> None:
    """Accept keys that change nothing: one ConfigWarning naming them, or with strict(True) a
    ConfigError."""
    if not keys:
        return
    generic = [k for k in keys if k in PRETRAINED_KEYS]
    other = [k for k in keys if k not in PRETRAINED_KEYS]
    parts = ([f"generic transformers keys {', '.join(generic)}"] if generic else []) + (
        [f"keys that are not {known}: {', '.join(other)}"] if other else [])
    what = " and ".join(parts)
    if _STRICT[0]:
        raise ConfigError(f"{source}: {what} (--strict-config refuses them); remove them or load "
                          "without --strict-config")  # fmt: skip
    warnings.warn(f"{source}: ignoring {what}; they change nothing", ConfigWarning, stacklevel=3)


def _require(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d:
        raise ConfigError(f"{source}: missing required key {key!r}")
    return d[key]


def _yarn_from_hf(d: dict[str, Any], source: str) -> tuple[YarnScaling, float]:
    """Accept the released `rope_scaling` + `rope_theta` form and transformers 5's `rope_parameters`."""
    if "rope_parameters" in d and "rope_scaling" in d:
        raise ConfigError(f"{source}: give either rope_scaling or rope_parameters, not both")
    key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
    rs = dict(_require(d, key, source) or {})
    theta = rs.pop("rope_theta", None) if key == "rope_parameters" else None
    theta = theta if theta is not None else _require(d, "rope_theta", source)
    unknown = sorted(set(rs) - YARN_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key {key}.{unknown[0]!r} (expected {sorted(YARN_KEYS)})")
    if rs.get("rope_type", "yarn") != "yarn":
        raise ConfigError(f"{source}: {key}.rope_type is {rs['rope_type']!r}; gpt-oss uses 'yarn'")
    for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        _require(rs, k, f"{source} ({key})")
    # transformers defaults `truncate` to true when absent; the released config sets it false.
    yarn = YarnScaling(
        factor=float(rs["factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        beta_fast=float(rs["beta_fast"]),
        beta_slow=float(rs["beta_slow"]),
        truncate=bool(rs.get("truncate", True)),
    )
    return yarn, float(theta)


def config_from_hf_dict(d: dict[str, Any], source: str = "config.json") -> GptOssConfig:
    if "model_type" in d and d["model_type"] != "gpt_oss":
        raise ConfigError(f"{source}: model_type is {d['model_type']!r}; gpt-oss requires "
                          "'gpt_oss' (is this a gpt-oss config.json?)")  # fmt: skip
    for key, want in (*HF_FIXED_KEYS.items(), *PRETRAINED_NEUTRAL.items()):
        if key in d and d[key] != want:
            raise ConfigError(f"{source}: {key} is {d[key]!r}; gpt-oss requires {want!r}")
    if "model_type" not in d:
        raise ConfigError(f"{source}: missing required key 'model_type' (expected 'gpt_oss')")
    known = (
        HF_IGNORED_KEYS
        | set(HF_FIXED_KEYS)
        | set(PRETRAINED_NEUTRAL)
        | {f.name for f in dataclasses.fields(GptOssConfig)}
        | {"experts_per_token", "rope_parameters"}
    )
    _ignore(sorted(set(d) - known), source, "gpt-oss settings")
    k = _require(d, "num_experts_per_tok", source)
    if "experts_per_token" in d and d["experts_per_token"] != k:
        raise ConfigError(
            f"{source}: experts_per_token ({d['experts_per_token']}) disagrees with "
            f"num_experts_per_tok ({k})"
        )
    yarn, theta = _yarn_from_hf(d, source)
    cfg_args = {
        name: _require(d, name, source)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "sliding_window",
            "rms_norm_eps",
            "swiglu_limit",
            "max_position_embeddings",
        )
    }
    layer_types = _require(d, "layer_types", source)
    if not isinstance(layer_types, list):
        raise ConfigError(f"{source}: layer_types must be a list, got {type(layer_types).__name__}")
    quant = d.get("quantization_config")
    if quant is not None and quant.get("quant_method") != "mxfp4":
        raise ConfigError(
            f"{source}: quantization_config.quant_method is {quant.get('quant_method')!r}; "
            "only 'mxfp4' checkpoints are gpt-oss releases"
        )
    try:
        cfg = GptOssConfig(
            **cfg_args,
            num_experts_per_tok=k,
            layer_types=tuple(layer_types),
            rope_theta=theta,
            rope_scaling=yarn,
            initial_context_length=d.get(
                "initial_context_length", yarn.original_max_position_embeddings
            ),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            quantization_config=quant,
        )
    except ConfigError as e:
        raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
    return cfg


def config_from_original_dict(d: dict[str, Any], source: str = "original/config.json") -> GptOssConfig:
    missing = sorted(ORIGINAL_KEYS - set(d))
    if missing:
        raise ConfigError(f"{source}: missing required key {missing[0]!r}; is this a gpt-oss "
                          "original config?")  # fmt: skip
    _ignore(sorted(set(d) - ORIGINAL_KEYS), source, "gpt-oss original settings")
    n = d["num_hidden_layers"]
    ctx = d["initial_context_length"]
    factor = float(d["rope_scaling_factor"])
    # OpenAI's reference: sliding window on even layers, eps 1e-5, untruncated YaRN range.
    try:
        return GptOssConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=d["head_dim"],
            num_local_experts=d["num_experts"],
            num_experts_per_tok=d["experts_per_token"],
            sliding_window=d["sliding_window"],
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(n)),
            rms_norm_eps=1e-5,
            rope_theta=float(d["rope_theta"]),
            rope_scaling=YarnScaling(
                factor=factor,
                original_max_position_embeddings=ctx,
                beta_fast=float(d["rope_ntk_beta"]),
                beta_slow=float(d["rope_ntk_alpha"]),
                truncate=False,
            ),
            swiglu_limit=float(d["swiglu_limit"]),
            max_position_embeddings=int(ctx * factor),
            initial_context_length=ctx,
        )
    except ConfigError as e:
        raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; a checkpoint directory needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


# The quantization_config of the released checkpoint: experts MXFP4, everything else bf16.
MXFP4_QUANTIZATION_CONFIG: dict[str, Any] = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def load_config(path: str | Path) -> GptOssConfig:
    """Read an HF or OpenAI-original config.json (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    d = _read_json(path)
    if "model_type" in d or "layer_types" in d:
        return config_from_hf_dict(d, str(path))
    return config_from_original_dict(d, str(path))


def preset(name: str) -> GptOssConfig:
    """`20b`: the released gpt-oss-20b config. `tiny`: 4 layers, hidden 64, for tests and demos."""
    text = resources.files("ossedge.runtime").joinpath("data/gpt-oss-20b.config.json").read_text()
    big = config_from_hf_dict(json.loads(text), "preset 20b")
    if name == "20b":
        return big
    if name == "tiny":
        # Same rope, clamp and layer pattern as the 20b; small everything else.
        return big.replace(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=big.layer_types[:4],
            eos_token_id=None,
            pad_token_id=None,
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of {PRESETS}")


PRESETS = ("tiny", "20b")
