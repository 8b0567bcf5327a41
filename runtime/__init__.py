"""The reference runtime: config, checkpoints, the torch model, generation and chat."""

__all__ = ["GptOssModel", "load_model"]


def __getattr__(name: str):
    # Lazy, so importing a light submodule (errors, config) does not load torch and the model.
    if name in __all__:
        from ossedge.runtime import model

        return getattr(model, name)
    raise AttributeError(f"module 'ossedge.runtime' has no attribute {name!r}")
