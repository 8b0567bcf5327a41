"""Running a Core AI artifact (see `targets/coreai/convert.py` for its layout) with coreai-core's
runtime, behind the reference runtime's generation contract.

Each asset is compiled for this machine when opened (`AIModelAsset.executable()`: on Linux an
interpreter, on macOS Core AI). A call of T tokens goes through the layer chunks as one prefill
call per chunk (T ≥ 2, in pieces of at most max_prefill) or one decode call (T = 1); the chunks'
KV states live in the cache and are updated in place; `head` turns the last hidden state into
logits. The routing every layer chose comes back as outputs (ids_l, w_l)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import torch

from ossedge.runtime.config import config_from_hf_dict
from ossedge.runtime.routing import CallTrace, Routing
from ossedge.targets.base import ArtifactConfig, check_call
from ossedge.targets.coreai import TARGET, CoreAIArtifactError
from ossedge.targets.coreai.backend import coreai, quiet
from ossedge.targets.embedding import EmbeddingFile


def _state_shape(text: str) -> tuple[int, ...]:
    """The shape in a signature entry, "NDArray (Float32, 32 × 2 × 32)" → (32, 2, 32)."""
    dims = text.rsplit(",", 1)[1].strip(" )")
    return tuple(int(d) for d in dims.split("×"))


class CoreAICache:
    """Position and the states (KV caches) of every chunk for one sequence."""

    def __init__(self, model: CoreAIModel, limit: int) -> None:
        nd = coreai().runtime.NDArray
        self.position = 0
        self.limit = limit
        self.states = {
            name: {s: nd(np.zeros(_state_shape(text), np.float32))
                   for s, text in chunk["functions"]["decode"]["states"].items()}
            for name, chunk in model.layer_chunks.items()
        }  # fmt: skip


class CoreAIModel(CallTrace):
    """A Core AI artifact behind the reference runtime's contract: `cache = model.new_cache()`,
    `model(ids [1, T], cache=cache)` → logits [1, 1, V] of the last token."""

    def __init__(self, root: str | Path, *, checksums: bool = False, load: bool = True) -> None:
        """Open the artifact; `load=False` only reads its manifest and embedding (for checks
        that read the assets' files: no call can run)."""
        self.root = Path(root)
        self.manifest = TARGET.read_manifest(self.root, checksums=checksums)
        ca = coreai()
        self.cfg = config_from_hf_dict(self.manifest["config"])
        self.max_context = int(self.manifest["max_context"])
        self.max_prefill = int(self.manifest["max_prefill"])
        self.config = ArtifactConfig(self.max_context, self.cfg.vocab_size)
        chunks = self.manifest["chunks"]
        self.layer_chunks = {n: c for n, c in chunks.items() if c["layers"] is not None}
        self._loop = asyncio.new_event_loop()
        self._stack = contextlib.AsyncExitStack()
        self._functions: dict[tuple[str, str], object] = {}
        try:
            for name, chunk in chunks.items() if load else ():
                path = self.root / name
                try:
                    with quiet(native=True):
                        asset = ca.authoring.AIModelAsset.load(path)
                        model = self._run(self._stack.enter_async_context(asset.executable()))
                        for fn in chunk["functions"]:
                            self._functions[name, fn] = model.load_function(fn)
                except (RuntimeError, ValueError, OSError) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise CoreAIArtifactError(f"{path}: Core AI cannot load it ({first}); the "
                                              "asset is corrupt, convert again") from None  # fmt: skip
        except BaseException:
            self.close()
            raise
        self._embedding = EmbeddingFile(self.root, self.manifest["embedding"])

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Release the compiled programs."""
        if not self._loop.is_closed():
            with quiet(native=True):
                self._run(self._stack.aclose())
            self._loop.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> CoreAICache:
        if batch_size != 1:
            raise ValueError("a Core AI artifact runs one sequence (batch size 1)")
        return CoreAICache(self, min(max_context or self.max_context, self.max_context))

    def call(self, chunk: str, function: str, inputs: dict[str, np.ndarray], states=None):
        """One function of one asset: numpy inputs → numpy outputs (states updated in place)."""
        nd = coreai().runtime.NDArray
        f = self._functions[chunk, function]
        out = self._run(f({k: nd(np.ascontiguousarray(v)) for k, v in inputs.items()},
                          states or {}))  # fmt: skip
        return {k: v.numpy() for k, v in out.items()}

    def hidden(self, tokens: list[int], cache: CoreAICache) -> np.ndarray:
        """The last layer's hidden states [T, H] of `tokens` (T ≤ max_prefill) at the cache's
        position; the cache advances."""
        x = self._embedding.rows(tokens)
        pos = np.array([cache.position], np.int32)
        function = "decode" if len(tokens) == 1 else "prefill"
        chosen = []
        for name, chunk in self.layer_chunks.items():
            out = self.call(name, function, {"x": x, "pos": pos}, cache.states[name])
            x = out["h"]
            for layer in range(*chunk["layers"]):
                chosen.append(Routing(torch.from_numpy(out[f"ids_{layer}"].astype(np.int64)),
                                      torch.from_numpy(out[f"w_{layer}"].astype(np.float32)),
                                      None))  # fmt: skip
        cache.position += len(tokens)
        self._record(chosen)
        return x

    def __call__(
        self, input_ids: torch.Tensor, *, cache: CoreAICache | None = None, last_only: bool = True
    ) -> torch.Tensor:
        t = check_call(input_ids, cache, "a Core AI")
        ids = input_ids[0].tolist()
        step = max(1, self.max_prefill)
        for a in range(0, t, step):
            x = self.hidden([int(i) for i in ids[a : a + step]], cache)
        logits = self.call("head.aimodel", "head", {"x": x[-1:]})["logits"]
        return torch.from_numpy(logits.reshape(-1).astype(np.float32))[None, None]
