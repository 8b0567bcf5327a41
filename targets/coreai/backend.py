"""coreai-core and coreai-torch, imported quietly, or a one-line error naming the extra that
installs them."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from functools import cache

from ossedge.runtime.errors import OssedgeError
from ossedge.targets.base import stderr_to
from ossedge.targets.coreai import INSTALL_HINT


class CoreAIUnavailable(OssedgeError):
    """coreai-core (or coreai-torch, to convert) is not installed."""


@cache
def coreai():
    """The coreai package (authoring and runtime), or CoreAIUnavailable."""
    try:
        import coreai.authoring  # noqa: F401  (first: it sets up the compiler's dialects)
        import coreai.runtime  # noqa: F401
    except ImportError as e:
        raise CoreAIUnavailable(f"Core AI artifacts need coreai-core ({e}); run: "
                                f"{INSTALL_HINT}") from None  # fmt: skip
    import coreai as module

    return module


@cache
def coreai_torch():
    """The coreai_torch converter package, or CoreAIUnavailable."""
    coreai()
    try:
        with warnings.catch_warnings():
            # it names the torch releases it was validated with, the pinned one among them
            warnings.simplefilter("ignore", UserWarning)
            import coreai_torch
    except ImportError as e:
        raise CoreAIUnavailable(f"converting to Core AI needs coreai-torch ({e}); run: "
                                f"{INSTALL_HINT}") from None  # fmt: skip
    return coreai_torch


@contextlib.contextmanager
def quiet(*, native: bool = False) -> Iterator[None]:
    """Without the converter's progress lines (Python's stdout) and, with `native`, the runtime's
    load notes (the process's stderr)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if native:
            with stderr_to("/dev/null"):
                yield
        else:
            yield
