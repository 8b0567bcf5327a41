"""Expert routing as an artifact did it, for `ossedge verify`: which experts each token went to in
each layer, with what weights, from which router logits. A reference routed the same way tells a
wrong export (off at every step) from a router flip (two experts nearly tied, and the int8 or
fp16 noise of the artifact tipping the choice), which changes the logits as much as a bug does."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Routing:
    """One layer's routing of N tokens: ids and weights [N, K]; logits [N, E], or None where the
    artifact does not expose them (Core ML chooses on the device and returns only ids and
    weights)."""

    ids: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None


def concat_calls(calls: list[list[Routing]]) -> list[Routing]:
    """Per layer, the calls' routings joined along the tokens (calls in order)."""
    if not calls:
        return []

    def cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if any(p is None for p in parts) else torch.cat(parts)

    return [Routing(torch.cat([c[n].ids for c in calls]), torch.cat([c[n].weights for c in calls]),
                    cat([c[n].logits for c in calls]))
            for n in range(len(calls[0]))]  # fmt: skip


class CallTrace:
    """The routing record of a runner whose programs return each call's routing: off until
    `trace_routing()`; then one list (a Routing per layer) per call, joined by `routing_trace()`."""

    _trace: list[list[Routing]] | None = None

    def trace_routing(self, on: bool = True) -> None:
        """Start (or stop) recording the experts the programs choose (emptied)."""
        self._trace = [] if on else None

    def routing_trace(self) -> list[Routing]:
        """Per layer, the routing of every token run since `trace_routing()` (ids and weights)."""
        return concat_calls(self._trace or [])

    def _record(self, chosen: list[Routing]) -> None:
        if self._trace is not None:
            self._trace.append(chosen)


def from_logits(logits: torch.Tensor, k: int) -> Routing:
    """The top-k routing of router logits [N, E] (softmax over the k), as QMoE and the reference
    do it (ties: the lower index first)."""
    top_v, top_i = torch.topk(logits.float(), k, dim=-1)
    return Routing(top_i, torch.softmax(top_v, dim=-1), logits.float())


# ------------------------------------------------------------ the ExecuTorch kernels' record


def bind(lib: ctypes.CDLL) -> None:
    """Declare the routing-record functions of the kernel library (kernels/routing_trace.cpp)."""
    i64p, f32p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float)
    lib.ossedge_routing_trace.argtypes = [ctypes.c_int]
    lib.ossedge_routing_trace_count.restype = ctypes.c_int64
    lib.ossedge_routing_trace_shape.argtypes = [ctypes.c_int64, i64p]
    lib.ossedge_routing_trace_shape.restype = ctypes.c_int
    lib.ossedge_routing_trace_read.argtypes = [ctypes.c_int64, i64p, f32p, f32p]
    lib.ossedge_routing_trace_read.restype = ctypes.c_int


def read_kernel_record(lib: ctypes.CDLL, layers: int) -> list[Routing]:
    """The kernels' record since it was started, one Routing per layer (the MoE calls of each
    forward run in layer order), tokens in call order."""
    calls = []
    for i in range(lib.ossedge_routing_trace_count()):
        shape = (ctypes.c_int64 * 4)()
        lib.ossedge_routing_trace_shape(i, shape)
        t, e, k, has_logits = shape
        ids = np.empty((t, k), np.int64)
        weights = np.empty((t, k), np.float32)
        logits = np.empty((t, e), np.float32) if has_logits else None
        lib.ossedge_routing_trace_read(
            i, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
            weights.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            None if logits is None else logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))  # fmt: skip
        calls.append(Routing(torch.from_numpy(ids), torch.from_numpy(weights),
                             None if logits is None else torch.from_numpy(logits)))  # fmt: skip
    if len(calls) % layers:
        raise RuntimeError(f"the kernels recorded {len(calls)} MoE calls, not a multiple of the "
                           f"{layers} layers")  # fmt: skip
    return concat_calls([calls[a : a + layers] for a in range(0, len(calls), layers)])
