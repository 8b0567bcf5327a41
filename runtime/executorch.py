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
ISAS = ("avx512", "avx2", "neon", "scalar")


def kernel_library() -> Path:
    """Where the kernel library is: $OSSEDGE_KERNELS, or beside the executorch target package."""
    given = os.environ.get(ENV_VAR)
    if given:
        return Path(given)
    import ossedge.targets.executorch as target

    return Path(target.__file__).parent / "lib" / LIBRARY


@cache
def _loaded() -> tuple[ctypes.CDLL, Path]:
    path = kernel_library()
    if not path.is_file():
        raise KernelError(
            f"{path}: the ossedge ExecuTorch kernel library is missing; run `make install` "
            f"(or point {ENV_VAR} at a built {LIBRARY})"
        )
    # Global, and linked to the wheel's libexecutorch.so: its static initializers register the
    # kernels in the one operator registry that the executorch pybindings also use.
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise KernelError(
            f"{path}: cannot load the kernel library ({e}); rebuild it with `make install`"
        ) from None
    lib.ossedge_moe_isa.restype = ctypes.c_char_p
    lib.ossedge_moe_set_isa.argtypes = [ctypes.c_char_p]
    return lib, path


def load_kernels() -> Path:
    """Load the ossedge ExecuTorch kernels into this process (once); return the library's path."""
    return _loaded()[1]


def kernel_isa() -> str:
    """The SIMD path the kernels use: "avx512", "avx2", "neon" or "scalar" — the best this CPU
    has, unless $OSSEDGE_KERNEL_ISA (read at the first call) or `set_kernel_isa` chose another."""
    return _loaded()[0].ossedge_moe_isa().decode()


def set_kernel_isa(isa: str) -> None:
    """Make the kernels use `isa` from now on (to compare paths on one machine)."""
    if isa not in ISAS:
        raise KernelError(f"unknown kernel ISA {isa!r}; expected one of {', '.join(ISAS)}")
    if not _loaded()[0].ossedge_moe_set_isa(isa.encode()):
        raise KernelError(f"the {isa} kernel path is not available on this CPU or build")
