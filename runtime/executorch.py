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
from ossedge.runtime import expert_cache as cache_api
from ossedge.runtime import routing
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
def _stderr_to(path: Path | int) -> Iterator[None]:
    """Send the process's stderr (file descriptor 2, where native code logs) to `path`, or to the
    open file descriptor `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    if isinstance(path, int):
        os.dup2(path, 2)
    else:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
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


# ---------------------------------------------------------------------------------------------
# Artifacts: model.pte + model.ptd + tokenizer.json + manifest.json (see README, "ExecuTorch").

ARTIFACT_FORMAT = "ossedge-executorch"
# 1: four stacked expert tensors per layer; 2: one packed tensor per layer (an expert cache can
# read each expert with one pread). Both run.
SUPPORTED_CONTRACT = (1, 2)
FILES = ("model.pte", "model.ptd", "tokenizer.json")
# The relative logits error |Δ|₂/|ref|₂ allowed at 90% of the steps against the reference with
# the same recipe, routed as the artifact routed and rounding what its kernels round (see
# runtime/verify.py). Float linear layers (recipe native): the program computes what that reference
# does (measured ~1e-6). XNNPACK's int8 linears: matched too, but a value on a rounding boundary in
# one and not the other moves a token, and attention carries it on (p90 ≤ 0.036 measured over 20
# random-weight checkpoints per recipe: benchmarks/results/verify-sweep).
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
    """The line that says what failed: the ossedge kernels' own message where they logged one
    (ExecuTorch's generic "failed to execute" follows it), else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and "cpuinfo" not in ln]
    ours = [ln[ln.index("ossedge "):] for ln in lines if "ossedge moe:" in ln]
    return ours[-1] if ours else lines[-1] if lines else ""


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

    def __init__(
        self, root: str | Path, *, checksums: bool = False, expert_cache: str | int = "auto",
        cache_aware_routing: int = 0, routing_pool: int | None = None,
    ) -> None:  # fmt: skip
        quiet_imports()
        from ossedge.targets.executorch.ptd import read_index

        self.root = Path(root)
        self.manifest = read_artifact_manifest(self.root, checksums=checksums)
        read_index(self.root / "model.ptd")  # a clear error for a corrupt data file
        self.kernels = load_kernels()
        self.expert_cache_bytes = self._open_cache(expert_cache_option(expert_cache))
        # lossy and opt-in: checked before the (slow) load, set once the cache is open
        self.routing_pool = cache_api.routing_pool(
            cache_api.store_of(self.manifest), cache_aware_routing, routing_pool,
            budget=self.expert_cache_bytes)  # fmt: skip
        self.cache_aware_routing = cache_aware_routing if self.routing_pool else 0
        self._log = None  # where forward's native log goes while the cache is on
        from executorch.extension.pybindings import portable_lib

        # ExecuTorch logs CPU probing at load; keep it, and show it only when loading fails.
        with tempfile.TemporaryDirectory() as d:
            log = Path(d) / "load.log"
            lock = _no_memory_lock() if self.expert_cache_bytes else contextlib.nullcontext()
            try:
                with _stderr_to(log), lock:
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
        if self.expert_cache_bytes:
            lib = _loaded()[0]
            cache_api.set_routing(lib, self.cache_aware_routing, self.routing_pool)
            lib.ossedge_expert_cache_reset_stats()
        m = self.manifest
        self.max_prefill = int(m["max_prefill"])
        self.max_context = int(m["max_context"])
        self.config = _Config(self.max_context, int(m["methods"]["get_vocab_size"]))

    def _open_cache(self, option: str | int) -> int:
        """Open (or close) the process's expert cache for this artifact; returns its budget."""
        lib = _loaded()[0]
        m = self.manifest
        total = sum(f["bytes"] for f in m["files"].values())
        budget = cache_api.resolve(option, m, rest=resident_rest(m), total=total)
        if budget:
            cache_api.open_cache(lib, self.root / "model.ptd", budget)
        else:
            lib.ossedge_expert_cache_close()
        return budget

    def expert_cache_stats(self) -> dict[str, int] | None:
        """The expert cache's counters (hits, misses, bytes_read, …), or None when it is off."""
        return cache_api.stats(_loaded()[0]) if self.expert_cache_bytes else None

    def trace_routing(self, on: bool = True) -> None:
        """Start (or stop) recording the experts the kernels choose; starting empties the record."""
        _loaded()[0].ossedge_routing_trace(1 if on else 0)

    def routing_trace(self) -> list[routing.Routing]:
        """Per layer, the routing of every token run since `trace_routing()`."""
        return routing.read_kernel_record(_loaded()[0],
                                          int(self.manifest["config"]["num_hidden_layers"]))

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> _Cursor:
        if batch_size != 1:
            raise ValueError("an ExecuTorch artifact runs one sequence (batch size 1)")
        return _Cursor(min(max_context or self.max_context, self.max_context))

    def forward_chunk(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Run `forward` once: ids [1, T ≤ max_prefill] at `position` → logits [V] (float32)."""
        args = (ids, torch.tensor([position], dtype=torch.long))
        if not self.expert_cache_bytes:
            try:
                return self.program.forward(args)[0].reshape(-1)
            except RuntimeError as e:
                raise ArtifactError(f"{self.root}: forward failed ({e})") from None
        # With the cache, a failed read (I/O error, damaged extent) is logged by the kernel:
        # catch that line for the error (one log file for the model's life, emptied per call).
        if self._log is None:
            self._log = tempfile.TemporaryFile()
        self._log.seek(0)
        self._log.truncate()
        try:
            with _stderr_to(self._log.fileno()):
                out = self.program.forward(args)
        except RuntimeError as e:
            self._log.seek(0)
            detail = _last_error_line(self._log.read().decode(errors="replace")) or str(e)
            raise ArtifactError(f"{self.root}: forward failed: {detail}") from None
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


def expert_cache_option(value: str | int | None) -> str | int:
    return cache_api.parse_option(value)


def resident_rest(manifest: dict) -> int:
    """What this process holds besides the experts with the artifact loaded (the memory model's
    anonymous parts for a Python host, and its library pages)."""
    from ossedge.runtime.config import config_from_hf_dict
    from ossedge.targets.memory import executorch_footprint

    f = executorch_footprint(config_from_hf_dict(manifest["config"]), manifest["recipe"],
                             int(manifest["max_context"]), max_prefill=int(manifest["max_prefill"]),
                             host="python")  # fmt: skip
    return f.anon + f.part("libraries")


def check_structure(root: str | Path, manifest: dict, source) -> dict:
    """What verify reads straight from model.ptd and holds against `source` (the checkpoint with
    the artifact's recipe): the rotary tables (YaRN, for every position of the context), the
    norms and the attention sinks exactly, and each layer's first and last packed expert byte for
    byte. Errors too small for the logits to show at a few dozen tokens (a rotary table slightly
    off grows with the position) are caught here. Returns ok, problems and counts."""
    import numpy as np
    from ossedge.runtime.model import rope_tables
    from ossedge.targets.executorch.pack import Layout, unpack_expert
    from ossedge.targets.executorch.ptd import read_index

    path = Path(root) / "model.ptd"
    entries = read_index(path).entries()
    cfg = source.config
    problems: list[str] = []

    def read(key: str, dtype=np.float32, part: tuple[int, int] | None = None) -> np.ndarray | None:
        """Tensor `key` (or bytes [start, start + size) of it) from model.ptd."""
        if key not in entries:
            problems.append(f"model.ptd has no {key}")
            return None
        offset, size = entries[key]
        start, size = part or (0, size)
        return np.fromfile(path, dtype=np.uint8, count=size, offset=offset + start).view(dtype)

    def same(key: str, want: torch.Tensor) -> None:
        got = read(key)
        want = want.float().reshape(-1).numpy()
        if got is not None and (got.shape != want.shape or not np.allclose(got, want, rtol=1e-6,
                                                                           atol=1e-7)):  # fmt: skip
            diff = f"{np.abs(got - want).max():.3g}" if got.shape == want.shape else "its shape"
            problems.append(f"{key} differs from the checkpoint's (largest difference {diff})")

    cos, sin = rope_tables(cfg, torch.arange(int(manifest["max_context"])))
    same("rope_cos", cos)
    same("rope_sin", sin)
    same("norm", source.weight("model.norm.weight"))
    checked = exact = 0
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        same(f"blocks.{n}.attn.sinks", source.weight(p + "self_attn.sinks"))
        same(f"blocks.{n}.attn_norm", source.weight(p + "input_layernorm.weight"))
        same(f"blocks.{n}.mlp_norm", source.weight(p + "post_attention_layernorm.weight"))
        gate_up, down = (source.weight(p + f"mlp.experts.{w}") for w in ("gate_up_proj", "down_proj"))
        layout = Layout(gate_up.fmt, cfg.hidden_size, cfg.intermediate_size)
        codes, scales = ("blocks", "scales") if gate_up.fmt == "mxfp4" else ("q", "scale")
        for e in sorted({0, cfg.num_local_experts - 1}):
            extent = read(f"blocks.{n}.mlp.experts", np.uint8, (e * layout.stride, layout.stride))
            if extent is None:
                break
            got = unpack_expert(layout, torch.from_numpy(extent.copy()))
            want = {"gate_up_codes": gate_up.parts[codes][e], "gate_up_scales": gate_up.parts[scales][e],
                    "gate_up_bias": source.weight(p + "mlp.experts.gate_up_proj_bias")[e].float(),
                    "down_codes": down.parts[codes][e], "down_scales": down.parts[scales][e],
                    "down_bias": source.weight(p + "mlp.experts.down_proj_bias")[e].float()}  # fmt: skip
            checked += 1
            bad = [k for k, v in want.items() if not torch.equal(got[k], v.reshape(got[k].shape))]
            exact += not bad
            if bad:
                problems.append(f"layer {n} expert {e}: {', '.join(bad)} differ from the checkpoint")
    return {"ok": not problems, "problems": problems, "expert_weights_checked": checked,
            "expert_weights_exact": exact}  # fmt: skip
