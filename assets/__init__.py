"""Models shipped with ossedge: the small trained gpt-oss (`tiny-gpt-oss/`), the default model
of `ossedge generate`, `ossedge chat` and `make demo`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TINY_MODEL = "tiny-gpt-oss"


def default_model_dir() -> Path:
    """Directory of the embedded default model (HF layout, MXFP4 experts, tokenizer.json)."""
    return Path(str(resources.files("ossedge.assets").joinpath(TINY_MODEL)))
