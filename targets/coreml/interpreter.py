"""A numpy interpreter of Core ML programs (MIL), so Core ML artifacts are checked where Core ML
does not run.

`MilPackage(path)` reads an `.mlpackage`'s `model.mlmodel` protobuf and memory-maps its weight
files; `run(function, inputs, states)` executes one function op by op and updates the states in
place. Every op computes in float32 (int32 for integer ops) and rounds its result to the dtype the
program declares for it, so fp16 programs are emulated with fp16 storage between ops; declared
static output shapes are checked. An op this interpreter does not implement is an error naming it,
never a silent skip.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ossedge.runtime.errors import OssedgeError
from ossedge.targets.base import quiet_imports

BLOB_SENTINEL = 0xDEADBEEF
MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")
DECODED_CACHE_BYTES = 512 << 20  # decoded constexpr weights kept, over all packages

# (package, function, output) → decoded weight, least recently used first
_DECODED: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
_DECODED_BYTES = [0]


class MilError(OssedgeError):
    """A Core ML package cannot be read or executed by the interpreter."""


# proto DataType → (numpy dtype, bits, signed) ; sub-byte types are unpacked to (u)int8
_DTYPES: dict[str, tuple[Any, int, bool]] = {
    "BOOL": (np.bool_, 8, False),
    "FLOAT16": (np.float16, 16, True),
    "FLOAT32": (np.float32, 32, True),
    "FLOAT64": (np.float64, 64, True),
    "INT8": (np.int8, 8, True),
    "INT16": (np.int16, 16, True),
    "INT32": (np.int32, 32, True),
    "INT64": (np.int64, 64, True),
    "UINT8": (np.uint8, 8, False),
    "UINT16": (np.uint16, 16, False),
    "UINT32": (np.uint32, 32, False),
    "INT4": (np.int8, 4, True),
    "UINT4": (np.uint8, 4, False),
    "UINT2": (np.uint8, 2, False),
    "UINT1": (np.uint8, 1, False),
    "UINT3": (np.uint8, 3, False),
    "UINT6": (np.uint8, 6, False),
}
_CAST = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int8": np.int8,
         "uint8": np.uint8, "bool": np.bool_, "int16": np.int16}


def quiet_coremltools() -> None:
    """coremltools logs at import about optional frameworks (sklearn, the torch version, the
    macOS-only runtime); none matter here. Silence them once, before the first import."""
    quiet_imports()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")


def _pb():
    quiet_coremltools()
    from coremltools.proto import MIL_pb2, Model_pb2

    return MIL_pb2, Model_pb2


def dtype_name(code: int) -> str:
    mil_pb2, _ = _pb()
    return mil_pb2.DataType.Name(code)


def unpack_bits(raw: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """`count` values of `bits` bits packed LSB-first in bytes `raw` → (u)int8 array."""
    if bits == 8:
        return raw[:count].view(np.int8 if signed else np.uint8)
    b = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    v = (b.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1)
    if signed:
        v = np.where(v >= 1 << (bits - 1), v.astype(np.int16) - (1 << bits), v)
        return v.astype(np.int8)
    return v.astype(np.uint8)


class _Type:
    """A tensor type from the proto: dtype name, shape (None for a symbolic dimension)."""

    def __init__(self, vt) -> None:
        which = vt.WhichOneof("type")
        self.state = which == "stateType"
        if self.state:
            vt = vt.stateType.wrappedType
            which = vt.WhichOneof("type")
        if which != "tensorType":
            raise MilError(f"values of type {which} are not supported by the interpreter")
        tt = vt.tensorType
        self.dtype = dtype_name(tt.dataType)
        self.shape = tuple(
            d.constant.size if d.WhichOneof("dimension") == "constant" else None
            for d in tt.dimensions
        )

    @property
    def np(self):
        try:
            return _DTYPES[self.dtype][0]
        except KeyError:
            raise MilError(f"tensor dtype {self.dtype} is not supported by the interpreter") \
                from None

    def describe(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


class MilPackage:
    """One .mlpackage: its functions, their signatures, and their execution."""

    def __init__(self, path: str | Path) -> None:
        _, model_pb2 = _pb()
        self.path = Path(path)
        spec_file = self.path / MODEL_FILE
        try:
            raw = spec_file.read_bytes()
        except OSError as e:
            raise MilError(f"{spec_file}: cannot read ({e.strerror}); not a complete "
                           ".mlpackage") from None
        self.spec = model_pb2.Model()
        try:
            self.spec.ParseFromString(raw)
        except Exception:  # protobuf raises DecodeError, a bare Exception subclass
            raise MilError(f"{spec_file}: not a Core ML model (protobuf does not parse)") from None
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise MilError(f"{spec_file}: not an ML program; the interpreter runs ML programs only")
        self.functions = {}
        for name, fn in self.spec.mlProgram.functions.items():
            block = fn.block_specializations[fn.opset]
            self.functions[name] = {
                "inputs": {i.name: _Type(i.type) for i in fn.inputs},
                "ops": list(block.operations),
                "outputs": list(block.outputs),
            }
        self._blobs: dict[str, np.memmap] = {}

    # -- values ---------------------------------------------------------------------------------

    def _blob_file(self, name: str) -> np.memmap:
        if name not in self._blobs:
            path = self.path / WEIGHTS_DIR / name.split("/")[-1]
            try:
                self._blobs[name] = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise MilError(f"{path}: cannot map the weight file ({e}); the package is "
                               "incomplete") from None
        return self._blobs[name]

    def _blob(self, bfv, t: _Type) -> np.ndarray:
        data = self._blob_file(bfv.fileName)
        where = f"{self.path / WEIGHTS_DIR / bfv.fileName.split('/')[-1]} at offset {bfv.offset}"
        if bfv.offset + 64 > data.size:
            raise MilError(f"{where}: beyond the end of the file; the weight file is truncated")
        sentinel, _, size, offset = struct.unpack_from("<IIQQ", data, bfv.offset)
        if sentinel != BLOB_SENTINEL:
            raise MilError(f"{where}: no blob header; the weight file is corrupt")
        np_dtype, bits, signed = _DTYPES.get(t.dtype, (None, 0, False))
        if np_dtype is None or None in t.shape:
            raise MilError(f"{where}: cannot read a {t.dtype} {t.shape} weight")
        count = int(np.prod(t.shape, dtype=np.int64))
        want = (count * bits + 7) // 8
        if size < want or offset + size > data.size:
            raise MilError(f"{where}: holds {size} bytes, {want} needed; the weight file is "
                           "truncated or corrupt")
        raw = data[offset : offset + size]
        if bits >= 8:
            out = raw[: want].view(np_dtype)
        else:
            out = unpack_bits(np.asarray(raw), bits, count, signed)
        return out.reshape(t.shape)

    def _value(self, v) -> Any:
        t = _Type(v.type)
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            return self._blob(v.blobFileValue, t)
        tv = v.immediateValue.tensor
        kind = tv.WhichOneof("value")
        np_dtype, bits, signed = _DTYPES.get(t.dtype, (None, 0, False))
        shape = t.shape
        if kind == "bytes":
            raw = np.frombuffer(tv.bytes.values, dtype=np.uint8)
            count = int(np.prod(shape, dtype=np.int64))
            arr = raw.view(np_dtype)[:count] if bits >= 8 else unpack_bits(raw, bits, count,
                                                                            signed)
        elif kind == "strings":
            arr = np.array(list(tv.strings.values), dtype=object)
        else:
            field = {"floats": tv.floats, "ints": tv.ints, "bools": tv.bools,
                     "longInts": tv.longInts, "doubles": tv.doubles}[kind]
            arr = np.array(list(field.values), dtype=np_dtype)
        arr = arr.reshape(shape)
        if t.dtype == "STRING" and arr.shape == ():
            return str(arr.item())
        return arr

    # -- execution ------------------------------------------------------------------------------

    def signature(self, function: str) -> dict[str, Any]:
        """inputs, outputs and states of `function` as names → {shape, dtype}."""
        fn = self._function(function)
        types = self._output_types(fn)
        inputs = {n: t.describe() for n, t in fn["inputs"].items() if not t.state}
        states = {n: t.describe() for n, t in fn["inputs"].items() if t.state}
        outputs = {n: types[n].describe() for n in fn["outputs"]}
        return {"inputs": inputs, "outputs": outputs, "states": states}

    def _function(self, function: str) -> dict:
        try:
            return self.functions[function]
        except KeyError:
            raise MilError(f"{self.path}: no function {function!r} (it has "
                           f"{sorted(self.functions)[:8]}…)") from None

    @staticmethod
    def _output_types(fn: dict) -> dict[str, _Type]:
        out = {n: t for n, t in fn["inputs"].items()}
        for op in fn["ops"]:
            for o in op.outputs:
                out[o.name] = _Type(o.type)
        return out

    def ops(self, function: str) -> list:
        return self._function(function)["ops"]

    def run(
        self,
        function: str,
        inputs: dict[str, np.ndarray],
        states: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Execute `function`. `states` maps state names to arrays, replaced by what the function
        writes. Returns the outputs by name."""
        fn = self._function(function)
        states = {} if states is None else states
        env: dict[str, Any] = {}
        for name, t in fn["inputs"].items():
            src = states if t.state else inputs
            if name not in src:
                kind = "state" if t.state else "input"
                raise MilError(f"{function}: {kind} {name!r} not given")
            a = np.asarray(src[name])
            if a.dtype != t.np or any(s is not None and s != g for s, g in zip(t.shape, a.shape)) \
                    or len(a.shape) != len(t.shape):
                raise MilError(f"{function}: {name} must be {t.dtype} {list(t.shape)}, got "
                               f"{a.dtype} {list(a.shape)}")
            env[name] = a
        for op in fn["ops"]:
            self._execute(function, op, env, states)
        return {n: env[n] for n in fn["outputs"]}

    def _args(self, op, env) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for key, arg in op.inputs.items():
            vals = []
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    if b.name not in env:
                        raise MilError(f"op {op.type} reads {b.name!r}, which is not defined")
                    vals.append(env[b.name])
                else:
                    vals.append(self._value(b.value))
            args[key] = vals if key in _TUPLE_ARGS.get(op.type, ()) else vals[0]
        return args

    def decoded(self, function: str, op, env: dict) -> np.ndarray:
        """The value of a constexpr op (decoded weights; `env` holds earlier constexpr results
        it may read), cached within a byte budget."""
        key = (str(self.path), function, op.outputs[0].name)
        if key in _DECODED:
            _DECODED.move_to_end(key)
            return _DECODED[key]
        args = self._args(op, env)
        value = _CONSTEXPR[op.type](**args).astype(_Type(op.outputs[0].type).np)
        _DECODED[key] = value
        _DECODED_BYTES[0] += value.nbytes
        while _DECODED_BYTES[0] > DECODED_CACHE_BYTES and len(_DECODED) > 1:
            _, old = _DECODED.popitem(last=False)
            _DECODED_BYTES[0] -= old.nbytes
        return value

    def _execute(self, function: str, op, env: dict, states: dict) -> None:
        kind = op.type
        if op.blocks:
            raise MilError(f"{function}: op {kind} has nested blocks; not supported by the "
                           "interpreter")
        if kind == "const":
            env[op.outputs[0].name] = self._value(op.attributes["val"])
            return
        if kind in _CONSTEXPR:
            env[op.outputs[0].name] = self.decoded(function, op, env)
            return
        args = self._args(op, env)
        if kind == "read_state":
            env[op.outputs[0].name] = states[op.inputs["input"].arguments[0].name]
            return
        if kind == "write_state":
            name = op.inputs["input"].arguments[0].name
            states[name] = np.asarray(args["data"]).astype(states[name].dtype)
            return
        impl = _OPS.get(kind)
        if impl is None:
            raise MilError(f"{function}: op {kind!r} is not implemented by the MIL interpreter")
        try:
            result = impl(**args)
        except MilError:
            raise
        except Exception as e:  # a shape or value the op rejects
            raise MilError(f"{function}: op {kind} ({op.outputs[0].name}) failed: {e}") from None
        results = result if isinstance(result, tuple) else (result,)
        for o, r in zip(op.outputs, results):
            t = _Type(o.type)
            r = np.asarray(r).astype(t.np)
            if len(r.shape) != len(t.shape) or any(
                s is not None and s != g for s, g in zip(t.shape, r.shape)
            ):
                raise MilError(f"{function}: op {kind} ({o.name}) produced {list(r.shape)}, the "
                               f"program declares {list(t.shape)}")
            env[o.name] = r


_TUPLE_ARGS = {"concat": ("values",)}


def _f(x) -> np.ndarray:
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def _binary(fn: Callable) -> Callable:
    return lambda x, y: fn(_f(x), _f(y))


def _lut_to_dense(indices, lut, vector_axis=None):
    if lut.shape[-1] != 1:
        raise MilError("constexpr_lut_to_dense with vector palettization is not supported")
    idx = []
    for axis, n in enumerate(indices.shape):
        groups = lut.shape[axis]
        if n % groups:
            raise MilError(f"constexpr_lut_to_dense: lut groups {lut.shape} do not divide "
                           f"indices {indices.shape}")
        shape = [1] * indices.ndim
        shape[axis] = n
        idx.append((np.arange(n) // (n // groups)).reshape(shape))
    return lut[(*idx, indices.astype(np.int64), 0)]


def _expand(a: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, a.shape)):
        if n % m:
            raise MilError(f"constexpr_blockwise_shift_scale: {what} {a.shape} does not divide "
                           f"data {shape}")
        if m != n:
            a = np.repeat(a, n // m, axis=axis)
    return a


def _shift_scale(data, scale, offset=None):
    d = data.astype(np.float32)
    if offset is not None:
        d = d - _expand(np.asarray(offset, dtype=np.float32), data.shape, "offset")
    return d * _expand(scale.astype(np.float32), data.shape, "scale")


_CONSTEXPR = {
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_blockwise_shift_scale": _shift_scale,
}


def _slice_by_size(x, begin, size):
    idx = tuple(slice(int(b), x.shape[i] if int(s) == -1 else int(b) + int(s))
                for i, (b, s) in enumerate(zip(begin, size)))
    out = x[idx]
    if any(int(s) != -1 and out.shape[i] != int(s) for i, s in enumerate(size)):
        raise MilError(f"slice_by_size: begin {list(begin)} size {list(size)} is outside "
                       f"{list(x.shape)}")
    return out


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None,
                  squeeze_mask=None):
    if stride is not None and np.any(np.asarray(stride) != 1):
        raise MilError("slice_update with strides is not supported")
    if any(m is not None and np.any(m) for m in (begin_mask, end_mask, squeeze_mask)):
        raise MilError("slice_update with masks is not supported")
    begin, end = [int(b) for b in begin], [int(e) for e in end]
    if any(b < 0 or e > n or e < b for b, e, n in zip(begin, end, x.shape)):
        raise MilError(f"slice_update: [{begin}, {end}) is outside {list(x.shape)}")
    out = np.array(x, copy=True)
    out[tuple(slice(b, e) for b, e in zip(begin, end))] = np.asarray(update).reshape(
        [e - b for b, e in zip(begin, end)]
    )
    return out


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f(x), _f(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(x, weight, bias=None):
    out = _f(x) @ _f(weight).T
    return out if bias is None else out + _f(bias)


def _softmax(x, axis=-1):
    x = _f(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True,
          output_indices_dtype="int32"):
    x = _f(x)
    axis = int(axis)
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(int(k)), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(_CAST[str(output_indices_dtype)])


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims):
        raise MilError("gather with batch_dims is not supported")
    axis = int(axis)
    n = x.shape[axis]
    ind = np.asarray(indices).astype(np.int64)
    if np.any(ind < -n) or np.any(ind >= n):
        raise MilError(f"gather: index {ind.ravel().tolist()} outside an axis of {n}")
    return np.take(x, ind, axis=axis)


def _concat(values, axis, interleave=False):
    if interleave:
        raise MilError("concat with interleave is not supported")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


def _reduce(fn):
    def op(x, axes=None, keep_dims=False):
        ax = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(_f(x), axis=ax, keepdims=bool(keep_dims))

    return op


_OPS: dict[str, Callable] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "mod": _binary(np.mod),
    "pow": _binary(np.power),
    "greater_equal": _binary(np.greater_equal),
    "greater": _binary(np.greater),
    "less_equal": _binary(np.less_equal),
    "less": _binary(np.less),
    "equal": _binary(np.equal),
    "select": lambda cond, a, b: np.where(np.asarray(cond, dtype=bool), _f(a), _f(b)),
    "cast": lambda x, dtype: np.asarray(x).astype(_CAST[str(dtype)]),
    "identity": lambda x: np.asarray(x),
    "reshape": lambda x, shape: np.reshape(x, [int(s) for s in shape]),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else
                                               tuple(int(a) for a in axes)),
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "concat": _concat,
    "gather": _gather,
    "linear": _linear,
    "matmul": _matmul,
    "softmax": _softmax,
    "topk": _topk,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f(x) + np.float32(epsilon)),
    "sqrt": lambda x: np.sqrt(_f(x)),
    "exp": lambda x: np.exp(_f(x)),
    "sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * _f(x))),
    "clip": lambda x, alpha, beta: np.clip(_f(x), np.float32(alpha), np.float32(beta)),
}


def implemented_ops() -> list[str]:
    return sorted([*_OPS, *_CONSTEXPR, "const", "read_state", "write_state"])
