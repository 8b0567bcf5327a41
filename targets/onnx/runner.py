"""Running ONNX artifacts (`ossedge convert --target onnx`) with ONNX Runtime's CPU execution
provider, behind the reference runtime's generation contract: `cache = model.new_cache()`,
`model(ids [1, T], cache=cache)` → logits [1, 1, V] of the last token.

The KV cache is one preallocated buffer per layer, [1, KV, context, D], bound through IO binding
as both the past input and the present output of every call: GroupQueryAttention then writes the
new keys in place (its shared-buffer mode) and nothing is copied between steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ossedge.runtime.errors import ArtifactError
from ossedge.runtime.routing import CallTrace, from_logits
from ossedge.targets.base import ArtifactConfig, check_call
from ossedge.targets.onnx import PREFILL_CHUNK, TARGET


class OnnxCache:
    """Per-layer KV buffers (ONNX Runtime values) and the position reached."""

    def __init__(self, values: list, limit: int) -> None:
        self.values = values  # [(key, value)] per layer, OrtValue [1, KV, limit, D]
        self.position = 0
        self.limit = limit


class OnnxModel(CallTrace):
    """An ONNX artifact in an ONNX Runtime CPU session. `threads`: intra-op threads (default: all
    cores). `prepack` (default: $OSSEDGE_ONNX_PREPACK=1, else off) lets ONNX Runtime repack the
    weights into its own heap at load: several times faster (6.5× decode on the tiny model) but
    the weights then take heap memory instead of staying in the mapped data file, and QMoE's
    8-bit experts run on int8-quantized activations."""

    def __init__(self, root: str | Path, *, checksums: bool = False, threads: int | None = None,
                 prepack: bool | None = None):
        import onnxruntime as ort

        self.root = Path(root)
        self.manifest = m = TARGET.read_manifest(self.root, checksums=checksums)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if prepack is None:
            prepack = os.environ.get("OSSEDGE_ONNX_PREPACK") == "1"
        self.prepack = prepack
        for k, v in m.get("session_options", {}).items():
            if not (prepack and k == "session.disable_prepacking"):
                opts.add_session_config_entry(k, v)
        self._opts = opts
        self._router_outputs: list[str] = []
        try:
            self.session = ort.InferenceSession(
                str(self.root / "model.onnx"), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(
                f"{self.root}: ONNX Runtime cannot load model.onnx ({first}); the files are "
                "corrupt or do not belong together — convert again"
            ) from None
        cfg = m["config"]
        self.layers = int(cfg["num_hidden_layers"])
        self.kv_heads, self.head_dim = int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
        self.max_context = int(m["max_context"])
        self.max_prefill = PREFILL_CHUNK
        self.config = ArtifactConfig(self.max_context, int(cfg["vocab_size"]))

    def trace_routing(self, on: bool = True) -> None:
        """Start (or stop) recording each layer's routing (emptied). The first start reloads the
        graph with the QMoE nodes' router logits as extra outputs (the weights stay in place); the
        record is QMoE's top-k of the router logits it was given."""
        if on and not self._router_outputs:
            self._load_traced()
        super().trace_routing(on)

    def _load_traced(self) -> None:
        import onnx
        import onnxruntime as ort

        graph = onnx.load(str(self.root / "model.onnx"), load_external_data=False)
        names = [n.input[1] for n in graph.graph.node if n.op_type == "QMoE"]
        for name in names:
            graph.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))  # fmt: skip
        # from bytes: the external data file is found in the artifact's folder
        self._opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                            str(self.root))  # fmt: skip
        self.session = ort.InferenceSession(graph.SerializeToString(), self._opts,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self._router_outputs = names

    def new_cache(self, *, batch_size: int = 1, max_context: int | None = None) -> OnnxCache:
        import onnxruntime as ort

        if batch_size != 1:
            raise ValueError("an ONNX artifact runs one sequence (batch size 1)")
        limit = min(max_context or self.max_context, self.max_context)
        shape = (1, self.kv_heads, limit, self.head_dim)
        values = [tuple(ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                        for _ in range(2)) for _ in range(self.layers)]
        return OnnxCache(values, limit)

    def forward_chunk(self, ids: np.ndarray, cache: OnnxCache) -> np.ndarray:
        """One session run: ids [1, T] at the cache's position → logits [T, V]."""
        t = ids.shape[1]
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, cache.position + t), np.int64))
        b.bind_output("logits")  # first: copy_outputs_to_cpu() follows the binding order
        for name in self._router_outputs:
            b.bind_output(name)
        for n, (k, v) in enumerate(cache.values):
            b.bind_ortvalue_input(f"past_key_values.{n}.key", k)
            b.bind_ortvalue_input(f"past_key_values.{n}.value", v)
            b.bind_ortvalue_output(f"present.{n}.key", k)
            b.bind_ortvalue_output(f"present.{n}.value", v)
        try:
            self.session.run_with_iobinding(b)
        except Exception as e:
            raise ArtifactError(f"{self.root}: forward failed ({str(e).splitlines()[0]})") from None
        out = b.copy_outputs_to_cpu()
        if self._trace is not None:
            k = int(self.manifest["config"]["num_experts_per_tok"])
            self._record([from_logits(torch.from_numpy(out[1 + n]), k)
                          for n in range(len(self._router_outputs))])  # fmt: skip
        return out[0][0]

    def __call__(
        self, input_ids: torch.Tensor, *, cache: OnnxCache | None = None, last_only: bool = True
    ) -> torch.Tensor:

        t = check_call(input_ids, cache, "an ONNX")
        ids = input_ids.to(torch.long).numpy()
        chunks = []
        for a in range(0, t, self.max_prefill):
            part = ids[:, a : a + self.max_prefill]
            logits = self.forward_chunk(part, cache)
            cache.position += part.shape[1]
            chunks.append(logits[-1:] if last_only else logits)
        out = torch.from_numpy(np.concatenate(chunks[-1:] if last_only else chunks))
        return out[None]
