"""Running a Core ML artifact (see `targets/coreml/convert.py` for its layout) behind the
reference runtime's generation contract.

The host side is the same on every engine: embedding rows from `embedding.safetensors`, then per
token and layer `attn_{l}` (with that function's KV-cache states), the k experts it picks, and
finally `head`. Engines:

- `coreml` (macOS): coremltools' `MLModel(package, function_name=…)` and `make_state()`;
- `interpreter` (anywhere): `targets.coreml.interpreter`, the numpy MIL interpreter used by `ossedge verify`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from ossedge.runtime.config import config_from_hf_dict
from ossedge.runtime.routing import CallTrace, Routing
from ossedge.targets.base import ArtifactConfig, check_call
from ossedge.targets.coreml import TARGET, CoreMLArtifactError
from ossedge.targets.coreml.interpreter import MilPackage
from ossedge.targets.embedding import EmbeddingFile

ENGINES = ("auto", "coreml", "interpreter")


class _InterpreterEngine:
    def __init__(self, root: Path, manifest: dict) -> None:
        self.packages = {name: MilPackage(root / name) for name in manifest["packages"]}
        self.where = {f: d["package"] for f, d in manifest["functions"].items()}

    def package(self, function: str):
        return self.packages[self.where[function]]

    def new_state(self, function: str) -> dict[str, np.ndarray]:
        sig = self.package(function).signature(function)["states"]
        return {n: np.zeros(d["shape"], dtype=np.float16) for n, d in sig.items()}

    def predict(self, function: str, inputs: dict, state=None) -> dict[str, np.ndarray]:
        return self.package(function).run(function, inputs, state)


class _CoreMLEngine:
    def __init__(self, root: Path, manifest: dict) -> None:
        import coremltools as ct

        self.models = {
            f: ct.models.MLModel(str(root / d["package"]), function_name=f)
            for f, d in manifest["functions"].items()
        }

    def new_state(self, function: str):
        return self.models[function].make_state()

    def predict(self, function: str, inputs: dict, state=None) -> dict[str, np.ndarray]:
        model = self.models[function]
        out = model.predict(inputs, state=state) if state is not None else model.predict(inputs)
        return {k: np.asarray(v) for k, v in out.items()}


class CoreMLCache:
    """Position and the per-layer states of one sequence."""

    def __init__(self, engine, layers: int, limit: int) -> None:
        self.position = 0
        self.limit = limit
        self.states = [engine.new_state(f"attn_{layer}") for layer in range(layers)]


class CoreMLModel(CallTrace):
    """A Core ML artifact behind the reference runtime's contract: `cache = model.new_cache()`,
    `model(ids [1, T], cache=cache)` → logits [1, 1, V] of the last token (tokens are fed one
    prediction call per function, as the artifact's functions take one token)."""

    def __init__(self, root: str | Path, *, engine: str = "auto", checksums: bool = False) -> None:
        self.root = Path(root)
        self.manifest = TARGET.read_manifest(self.root, checksums=checksums)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine == "auto":
            engine = "coreml" if platform.system() == "Darwin" else "interpreter-refused"
        if engine == "interpreter-refused":
            raise CoreMLArtifactError(
                f"{self.root}: Core ML prediction needs macOS; on {platform.system()} check the "
                f"artifact with `ossedge verify {self.root} --reference CKPT` (it runs the "
                "artifact in ossedge's MIL interpreter)"
            )
        if engine == "coreml" and platform.system() != "Darwin":
            raise CoreMLArtifactError("the coreml engine needs macOS; use engine='interpreter'")
        self.engine_name = engine
        cls = _CoreMLEngine if engine == "coreml" else _InterpreterEngine
        self.engine = cls(self.root, self.manifest)
        self.cfg = config_from_hf_dict(self.manifest["config"])
        self.max_context = int(self.manifest["max_context"])
        self.max_prefill = self.max_context
        self.config = ArtifactConfig(self.max_context, self.cfg.vocab_size)
        self._embedding = EmbeddingFile(self.root, self.manifest["embedding"])

    def embed(self, token: int) -> np.ndarray:
        """fp32 [1, H] embedding row of `token`."""
        return self._embedding.row(token)

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> CoreMLCache:
        if batch_size != 1:
            raise ValueError("a Core ML artifact runs one sequence (batch size 1)")
        limit = min(max_context or self.max_context, self.max_context)
        return CoreMLCache(self.engine, self.cfg.num_hidden_layers, limit)

    def step(self, token: int, cache: CoreMLCache) -> np.ndarray:
        """One token at the cache's position → logits fp32 [V]."""
        x = self.embed(token)
        pos = np.array([cache.position], dtype=np.int32)
        chosen = []
        for layer in range(self.cfg.num_hidden_layers):
            a = self.engine.predict(f"attn_{layer}", {"x": x, "pos": pos}, cache.states[layer])
            h = a["h"].astype(np.float32)
            chosen.append(Routing(torch.from_numpy(a["ids"].reshape(1, -1).astype(np.int64)),
                                  torch.from_numpy(a["w"].reshape(1, -1).astype(np.float32)),
                                  None))  # fmt: skip
            for j in range(a["ids"].shape[-1]):
                e = int(a["ids"].reshape(-1)[j])
                y = self.engine.predict(f"expert_{layer}_{e}", {"m": a["m"]})["y"]
                h = h + np.float32(a["w"].reshape(-1)[j]) * y.astype(np.float32)
            x = h
        cache.position += 1
        self._record(chosen)
        return self.engine.predict("head", {"h": x})["logits"].reshape(-1).astype(np.float32)

    def __call__(
        self, input_ids: torch.Tensor, *, cache: CoreMLCache | None = None, last_only: bool = True
    ) -> torch.Tensor:

        check_call(input_ids, cache, "a Core ML")
        for tok in input_ids[0].tolist():
            logits = self.step(int(tok), cache)
        return torch.from_numpy(logits)[None, None]
