"""Shared fixtures: tiny synthetic gpt-oss checkpoints, written once per session.

With `--import-mode=importlib` test modules cannot import this file, so helpers are handed out as
fixtures (`tiny_config`, `synth`). Synthesizing a tiny checkpoint takes well under a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from ossedge.runtime.config import FULL, SLIDING, GptOssConfig, preset
from ossedge.runtime.synth import synthesize
from shared_artifacts import ARTIFACT_OPTIONS, VERIFY_TOKENS
from shared_artifacts import NAMES as ARTIFACT_NAMES

SEED = 0


def make_tiny_config(
    *, truncate: bool = False, num_layers: int = 3, window: int = 6, **changes
) -> GptOssConfig:
    """The tiny preset with `num_layers` alternating sliding/full layers, a sliding window of
    `window` and YaRN `truncate` as given; `changes` are passed to `GptOssConfig.replace`."""
    base = preset("tiny")
    return base.replace(
        num_hidden_layers=num_layers,
        layer_types=tuple(SLIDING if n % 2 == 0 else FULL for n in range(num_layers)),
        sliding_window=window,
        rope_scaling=dataclasses.replace(base.rope_scaling, truncate=truncate),
        **changes,
    )


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., GptOssConfig]:
    return make_tiny_config


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Callable[..., Path]:
    """`synth(layout=, expert_format=, seed=, config=, shard_bytes=)` → checkpoint directory.
    Identical requests share one directory: treat it as read-only (copy it to break it)."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("ckpt")

    def make(
        *,
        layout: str = "hf",
        expert_format: str = "mxfp4",
        seed: int = SEED,
        config: GptOssConfig | None = None,
        shard_bytes: int | None = None,
    ) -> Path:
        key = repr((layout, expert_format, seed, config, shard_bytes))
        if key not in made:
            kwargs = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
            made[key] = synthesize(
                root / f"c{len(made)}",
                preset_name="tiny",
                seed=seed,
                layout=layout,
                expert_format=expert_format,
                config=config,
                **kwargs,
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(synth) -> Path:
    """The tiny preset (4 layers, window 8) as users get it: HF layout, MXFP4 experts."""
    return synth()


@pytest.fixture(scope="session")
def tiny_dense_ckpt(synth) -> Path:
    return synth(expert_format="dense")


@pytest.fixture(scope="session")
def tiny_original_ckpt(synth) -> Path:
    return synth(layout="original")




@pytest.fixture(scope="session")
def artifact_of(tmp_path_factory):
    """target name → the bundled model converted to it (recipe: the target's default)."""
    from ossedge.assets import default_model_dir
    from ossedge.convert.pipeline import convert

    made: dict[str, Path] = {}

    def get(target: str) -> Path:
        if target not in made:
            out = tmp_path_factory.mktemp(target) / ARTIFACT_NAMES.get(target, f"tiny-{target}")
            convert(target, default_model_dir(), out, verify_tokens=VERIFY_TOKENS,
                    **ARTIFACT_OPTIONS.get(target, {}))  # fmt: skip
            made[target] = out
        return made[target]

    return get


@pytest.fixture(scope="session")
def et_artifact(artifact_of) -> Path:
    return artifact_of("executorch")


@pytest.fixture(scope="session")
def coreml_artifact(artifact_of) -> Path:
    return artifact_of("coreml")


@pytest.fixture(scope="session")
def onnx_artifact(artifact_of) -> Path:
    return artifact_of("onnx")
