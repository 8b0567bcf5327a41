"""Running a command the way a phone would: inside a memory cgroup of a given size (emulating an 8
or 12 GB device), unable to lock pages in memory (apps cannot: Android's RLIMIT_MEMLOCK is 64 KiB),
with the artifact's pages evicted from the page cache first so the run pays for its own reads."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ossedge.runtime.errors import OssedgeError

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")
APP_MEMLOCK = 64 * 1024


class LimitError(OssedgeError):
    """A memory limit cannot be applied on this machine."""


def parse_size(text: str) -> int:
    """'8G', '12GB', '512M', '1.5g' or a byte count → bytes (powers of 1024, as cgroups use)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise LimitError(f"memory limit {text!r} is not a size; write e.g. 8G, 12G or 512M")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " "))


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (posix_fadvise DONTNEED)."""
    for p in paths:
        for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cgroup_dir(name: str) -> tuple[Path, str, str]:
    """(directory to create, limit file, procs file) for a fresh memory cgroup."""
    if (CGROUP_V1 / "memory.limit_in_bytes").is_file():
        return CGROUP_V1 / name, "memory.limit_in_bytes", "cgroup.procs"
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split():
        return CGROUP_V2 / name, "memory.max", "cgroup.procs"
    raise LimitError("no memory cgroup controller here (cgroup v1 memory or v2 with memory); "
                     "run without --memory-limit")


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A new memory cgroup capped at `limit` bytes; yields the file a process writes its pid to
    (to join it). Removed afterwards."""
    d, limit_file, procs = _cgroup_dir(f"ossedge-{os.getpid()}-{limit}")
    try:
        d.mkdir()
        (d / limit_file).write_text(str(limit))
        if (d / "memory.swappiness").is_file():
            (d / "memory.swappiness").write_text("0")  # no swap on a phone
    except OSError as e:
        with contextlib.suppress(OSError):
            d.rmdir()
        raise LimitError(f"cannot create a memory cgroup in {d.parent} ({e.strerror}); "
                         "--memory-limit needs root") from None
    try:
        yield d / procs
    finally:
        with contextlib.suppress(OSError):
            d.rmdir()


def app_like(argv: list[str], *, procs: Path | None = None) -> list[str]:
    """`argv` run as an app would be: without the capability to lock memory (so RLIMIT_MEMLOCK,
    set to 64 KiB, applies) and, with `procs`, inside that cgroup."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise LimitError("setpriv (util-linux) is missing; it drops the memory-lock capability")
    inner = [setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", *argv]
    prelude = f"ulimit -l {APP_MEMLOCK // 1024}"
    if procs is not None:
        prelude += f" && echo $$ > {procs}"
    return ["sh", "-c", prelude + ' && exec "$@"', "sh", *inner]
