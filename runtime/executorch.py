"""Running ExecuTorch artifacts from Python. `load_kernels()` puts the ossedge operator kernels
(`libossedge_kernels.so`, built by `make install`) into this process's ExecuTorch registry; a
program that calls `ossedge::moe_*` fails with "Missing operator" without them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ossedge.runtime.errors import ArtifactError, KernelError

LIBRARY = "libossedge_kernels.so"


def quiet_imports() -> None:
    """Silence import-time chatter of torchao and torch (GPU libraries this CPU build cannot
    load, deprecation notes) and export-time warnings that are not the user's business."""
    import logging
    import warnings

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Mutation on a buffer", category=UserWarning)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send the process's stderr (file descriptor 2, where native code logs) to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
ENV_VAR = "OSSEDGE_KERNELS"
ISAS = ("avx512vnni", "avx512", "avx2", "neon", "scalar")


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
    """The SIMD path the kernels use: "avx512vnni", "avx512", "avx2", "neon" or "scalar" — the best this CPU
    has, unless $OSSEDGE_KERNEL_ISA (read at the first call) or `set_kernel_isa` chose another."""
    return _loaded()[0].ossedge_moe_isa().decode()


def set_kernel_isa(isa: str) -> None:
    """Make the kernels use `isa` from now on (to compare paths on one machine)."""
    if isa not in ISAS:
        raise KernelError(f"unknown kernel ISA {isa!r}; expected one of {', '.join(ISAS)}")
    if not _loaded()[0].ossedge_moe_set_isa(isa.encode()):
        raise KernelError(f"the {isa} kernel path is not available on this CPU or build")


# ---------------------------------------------------------------------------------------------
# Artifacts: model.pte + model.ptd + tokenizer.json + manifest.json (see README, "ExecuTorch").

ARTIFACT_FORMAT = "ossedge-executorch"
SUPPORTED_CONTRACT = 1
FILES = ("model.pte", "model.ptd", "tokenizer.json")
# Largest relative logits error |Δ|₂/|ref|₂ of any step, against the reference with the same
# recipe and the kernels' int8 expert inputs. With float linear layers (recipe native) the program
# computes what that reference does (measured ~1e-6). XNNPACK's quantized linear layers quantize
# activations to int8 per token and round group scales to bf16; the expert inputs' int8 rounding
# then no longer falls the same way in both: 1.6% on the trained model's text, a few percent on
# random-weight checkpoints and random tokens, more where a router flip moves a token to another
# expert.
TOLERANCE_FLOAT = 1e-3
TOLERANCE_QUANTIZED = 8e-2


def is_artifact(path: str | Path) -> bool:
    p = Path(path)
    return (p / "manifest.json").is_file() and (p / "model.pte").exists()


def read_artifact_manifest(root: Path, *, checksums: bool = False) -> dict:
    """The manifest of an ExecuTorch artifact, after checking that its files are all there with
    the recorded sizes (and, with `checksums`, sha256)."""
    from ossedge.runtime.artifacts import read_manifest

    return read_manifest(root, fmt=ARTIFACT_FORMAT, what="ExecuTorch",
                         contract=SUPPORTED_CONTRACT, files=FILES, checksums=checksums)


def _last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and "cpuinfo" not in ln]
    return lines[-1] if lines else ""


class _Cursor:
    """The position reached in the program's KV cache (which lives inside the program)."""

    def __init__(self, limit: int) -> None:
        self.position = 0
        self.limit = limit


@dataclass
class _Config:
    max_position_embeddings: int
    vocab_size: int


class ExecuTorchModel:
    """An ExecuTorch artifact behind the reference runtime's generation contract: `cache =
    model.new_cache()`, `model(ids [1, T], cache=cache)` → logits [1, 1, V] of the last token.
    Prompts longer than the program's prefill length are fed in chunks. One conversation at a
    time: `new_cache()` restarts at position 0 (the program's caches are overwritten in order)."""

    def __init__(self, root: str | Path, *, checksums: bool = False) -> None:
        quiet_imports()
        from ossedge.targets.executorch.ptd import read_index

        self.root = Path(root)
        self.manifest = read_artifact_manifest(self.root, checksums=checksums)
        read_index(self.root / "model.ptd")  # a clear error for a corrupt data file
        self.kernels = load_kernels()
        from executorch.extension.pybindings import portable_lib

        # ExecuTorch logs CPU probing at load; keep it, and show it only when loading fails.
        with tempfile.TemporaryDirectory() as d:
            log = Path(d) / "load.log"
            try:
                with _stderr_to(log):
                    self.program = portable_lib._load_for_executorch(
                        str(self.root / "model.pte"), data_path=str(self.root / "model.ptd")
                    )
                    # one step at position 0 (overwritten by any real use) sets up the
                    # thread pool and XNNPACK now, so their logs land here too
                    self.program.forward((torch.zeros(1, 1, dtype=torch.long),
                                          torch.zeros(1, dtype=torch.long)))
            except (RuntimeError, ValueError) as e:
                detail = _last_error_line(log.read_text(errors="replace")) or str(e)
                raise ArtifactError(
                    f"{self.root}: ExecuTorch cannot load model.pte with model.ptd ({detail}); "
                    "the files are corrupt or do not belong together — convert again"
                ) from None
        m = self.manifest
        self.max_prefill = int(m["max_prefill"])
        self.max_context = int(m["max_context"])
        self.config = _Config(self.max_context, int(m["methods"]["get_vocab_size"]))

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> _Cursor:
        if batch_size != 1:
            raise ValueError("an ExecuTorch artifact runs one sequence (batch size 1)")
        return _Cursor(min(max_context or self.max_context, self.max_context))

    def forward_chunk(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Run `forward` once: ids [1, T ≤ max_prefill] at `position` → logits [V] (float32)."""
        try:
            out = self.program.forward((ids, torch.tensor([position], dtype=torch.long)))
        except RuntimeError as e:
            raise ArtifactError(f"{self.root}: forward failed ({e})") from None
        return out[0].reshape(-1)

    def __call__(
        self, input_ids: torch.Tensor, *, cache: _Cursor | None = None, last_only: bool = True
    ) -> torch.Tensor:
        from ossedge.runtime.artifacts import check_call

        t = check_call(input_ids, cache, "an ExecuTorch")
        ids = input_ids.to(torch.long)
        for a in range(0, t, self.max_prefill):
            logits = self.forward_chunk(ids[:, a : a + self.max_prefill], cache.position)
            cache.position += min(self.max_prefill, t - a)
        return logits[None, None]
