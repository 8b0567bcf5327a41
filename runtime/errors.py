"""Typed errors: each maps to a CLI exit code and carries a one-line message saying the fix."""


class OssedgeError(Exception):
    """Base class; the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1


class ConfigError(OssedgeError):
    """A config.json is missing, malformed, or has values gpt-oss cannot run (or, under
    --strict-config, keys it does not use)."""


class CheckpointError(OssedgeError):
    """A checkpoint is missing, truncated, or a tensor is absent or misshaped."""


class TokenizerError(OssedgeError):
    """tokenizer.json is missing or lacks a required special token."""


class HarmonyError(OssedgeError):
    """Text does not follow the harmony chat format."""


class OutputExistsError(OssedgeError):
    """The output path exists and --force was not given."""


class ArtifactError(OssedgeError):
    """An artifact directory (of any target) is incomplete, corrupt or inconsistent."""


class ParityError(OssedgeError):
    """An artifact's outputs differ from the reference beyond the named threshold."""

    exit_code = 3


class BudgetError(OssedgeError):
    """An artifact does not fit the device's memory budget."""

    exit_code = 4


class KernelError(OssedgeError):
    """The native kernel library is missing or cannot be loaded."""


class BenchError(OssedgeError):
    """A benchmark cannot run with these inputs."""
