"""The reference runtime: config, checkpoints, the torch model, generation and chat."""

from ossedge.runtime.model import GptOssModel, load_model

__all__ = ["GptOssModel", "load_model"]
