"""Running ExecuTorch artifacts from Python. `load_kernels()` puts the ossedge operator kernels
(`libossedge_kernels.so`, built by `make install`) into this process's ExecuTorch registry; a
program that calls `ossedge::moe_*` fails with "Missing operator" without them."""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

from ossedge.runtime.errors import KernelError

LIBRARY = "libossedge_kernels.so"
ENV_VAR = "OSSEDGE_KERNELS"


def kernel_library() -> Path:
    """Where the kernel library is: $OSSEDGE_KERNELS, or beside the executorch target package."""
    given = os.environ.get(ENV_VAR)
    if given:
        return Path(given)
    import ossedge.targets.executorch as target

    return Path(target.__file__).parent / "lib" / LIBRARY


@cache
def load_kernels() -> Path:
    """Load the ossedge ExecuTorch kernels into this process (once); return the library's path."""
    import executorch.extension.pybindings.portable_lib  # noqa: F401  (the runtime's registry)

    path = kernel_library()
    if not path.is_file():
        raise KernelError(
            f"{path}: the ossedge ExecuTorch kernel library is missing; run `make install` "
            f"(or point {ENV_VAR} at a built {LIBRARY})"
        )
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise KernelError(f"{path}: cannot load the kernel library ({e}); rebuild it with "
                          "`make install`") from None
    return path


def kernel_isa() -> str:
    """The SIMD path the loaded kernels use on this CPU ("avx2", "neon" or "scalar")."""
    lib = ctypes.CDLL(str(load_kernels()))
    lib.ossedge_moe_isa.restype = ctypes.c_char_p
    return lib.ossedge_moe_isa().decode()
