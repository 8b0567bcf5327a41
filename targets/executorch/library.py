"""The ossedge ExecuTorch kernel library from Python. `load_kernels()` puts the ossedge operator
kernels (`libossedge_kernels.so`, built by `make install`) into this process's ExecuTorch
registry; a program that calls `ossedge::moe_*` fails with "Missing operator" without them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from ossedge.runtime import expert_cache as cache_api
from ossedge.runtime import routing
from ossedge.runtime.errors import KernelError

LIBRARY = "libossedge_kernels.so"


@contextlib.contextmanager
def _no_memory_lock() -> Iterator[None]:
    """Without the memory-lock capability while inside (Linux): the pybindings load model.ptd with
    mlock, which, for a root process, would read and pin every expert the cache is there to keep
    on disk. Unprivileged processes (and apps) are held to RLIMIT_MEMLOCK anyway."""
    if not sys.platform.startswith("linux"):
        yield
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]  # fmt: skip

    libc = ctypes.CDLL(None, use_errno=True)
    head, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    ipc_lock = 1 << 14  # CAP_IPC_LOCK
    if libc.capget(ctypes.byref(head), data) != 0 or not data[0].effective & ipc_lock:
        yield
        return
    saved = data[0].effective
    data[0].effective &= ~ipc_lock
    dropped = libc.capset(ctypes.byref(head), data) == 0
    try:
        yield
    finally:
        if dropped:
            data[0].effective = saved
            libc.capset(ctypes.byref(head), data)


ENV_VAR = "OSSEDGE_KERNELS"
ISAS = ("avx512vnni", "avx512", "avx2", "neon", "scalar")


def kernel_library() -> Path:
    """Where the kernel library is: $OSSEDGE_KERNELS, or beside the executorch target package."""
    given = os.environ.get(ENV_VAR)
    if given:
        return Path(given)
    return Path(__file__).parent / "lib" / LIBRARY


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
    if not hasattr(lib, "ossedge_expert_cache_open"):
        raise KernelError(f"{path}: an older kernel library without the expert cache; rebuild it "
                          "with `make install`")  # fmt: skip
    cache_api.bind(lib)
    if not hasattr(lib, "ossedge_routing_trace"):
        raise KernelError(f"{path}: an older kernel library without the routing record; rebuild "
                          "it with `make install`")  # fmt: skip
    routing.bind(lib)
    return lib, path


def load_kernels() -> Path:
    """Load the ossedge ExecuTorch kernels into this process (once); return the library's path."""
    return _loaded()[1]


def kernel_isa() -> str:
    """The SIMD path the kernels use: "avx512vnni", "avx512", "avx2", "neon" or "scalar" — the best this CPU
    has, unless $OSSEDGE_KERNEL_ISA (read at the first call) or `set_kernel_isa` chose another."""
    return _loaded()[0].ossedge_moe_isa().decode()


def set_kernel_isa(isa: str) -> None:
    """Make the kernels use `isa` from now on (to compare paths on one machine)."""
    if isa not in ISAS:
        raise KernelError(f"unknown kernel ISA {isa!r}; expected one of {', '.join(ISAS)}")
    if not _loaded()[0].ossedge_moe_set_isa(isa.encode()):
        raise KernelError(f"the {isa} kernel path is not available on this CPU or build")
