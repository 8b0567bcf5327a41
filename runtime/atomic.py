"""Files on disk: an output directory written atomically (built beside the target, then renamed
into place), JSON written atomically, and a file's sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ossedge.runtime.errors import OssedgeError, OutputExistsError


def check_output(out: Path, *, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it or choose a new path")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `out`, on any error it vanishes."""
    out = Path(out)
    check_output(out, force=force)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OssedgeError(f"cannot create {parent} ({e.strerror}); choose a writable path") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise OssedgeError(f"cannot write in {parent} ({e.strerror}); choose a writable path") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, data) -> None:
    """Write `data` as indented JSON to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """The file's sha256, read in 16 MiB chunks (bounded memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()
