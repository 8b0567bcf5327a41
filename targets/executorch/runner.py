"""Running ExecuTorch artifacts from Python behind the generation contract (`ExecuTorchModel`)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from ossedge.runtime import expert_cache as cache_api
from ossedge.runtime import routing
from ossedge.runtime.config import config_from_hf_dict
from ossedge.runtime.errors import ArtifactError
from ossedge.targets.base import ArtifactConfig, check_call, quiet_imports
from ossedge.targets.base import stderr_to as _stderr_to
from ossedge.targets.executorch import TARGET
from ossedge.targets.executorch.library import _loaded, _no_memory_lock, load_kernels
from ossedge.targets.executorch.memory import executorch_footprint
from ossedge.targets.executorch.ptd import read_index

# ---------------------------------------------------------------------------------------------
# Artifacts: model.pte + model.ptd + tokenizer.json + manifest.json (see README, "ExecuTorch").

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


class ExecuTorchModel:
    """An ExecuTorch artifact behind the reference runtime's generation contract: `cache =
    model.new_cache()`, `model(ids [1, T], cache=cache)` → logits [1, 1, V] of the last token.
    Prompts longer than the program's prefill length are fed in chunks. One conversation at a
    time: `new_cache()` restarts at position 0 (the program's caches are overwritten in order)."""

    def __init__(
        self, root: str | Path, *, checksums: bool = False, expert_cache: str | int = "auto",
        cache_aware_routing: int = 0, routing_pool: int | None = None, threads: int | None = None,
    ) -> None:  # fmt: skip
        quiet_imports()

        if threads:  # the pybindings' thread pool (XNNPACK and the ossedge kernels)
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)

        self.root = Path(root)
        self.manifest = TARGET.read_manifest(self.root, checksums=checksums)
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
        self.config = ArtifactConfig(self.max_context, int(m["methods"]["get_vocab_size"]))

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

    f = executorch_footprint(config_from_hf_dict(manifest["config"]), manifest["recipe"],
                             int(manifest["max_context"]), max_prefill=int(manifest["max_prefill"]),
                             host="python")  # fmt: skip
    return f.anon + f.part("libraries")
