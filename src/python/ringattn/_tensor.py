"""Tensor plumbing shared by every ringattn Python module (internal).

Inputs may be CPU ``torch.Tensor`` (float32, bfloat16, float16, float8_e4m3fn, int32,
int64, uint8) or ``numpy.ndarray`` (float32, float16, int32, int64, uint8). Float
tensors (q, k, v, caches) are read and written **in place**: the C++ side receives the
caller's data pointer, shape and strides (in elements); only the last dim must be
contiguous, as in FlashAttention-3. Small index tensors (cu_seqlens, cache_seqlens,
page/block tables, indices) are converted to contiguous int32 when they are not
already, after a range check. Outputs are allocated in the kind of the reference
input (torch in -> torch out, numpy in -> numpy out).
"""

import sys

import numpy as np

from . import _C

FLOAT_TYPES = ("fp32", "bf16", "fp16")
INDEX_TYPES = ("i32", "i64")

_NUMPY_TYPES = {
    np.dtype(np.float32): "fp32",
    np.dtype(np.float16): "fp16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
}
_NUMPY_OF_TYPE = {v: k for k, v in _NUMPY_TYPES.items()}


def _torch():
    """The torch module if the caller has imported it (never imports it ourselves)."""
    return sys.modules.get("torch")


_TORCH_TENSOR = None


def is_torch(x):
    global _TORCH_TENSOR
    if _TORCH_TENSOR is None:
        t = _torch()
        if t is None:
            return False
        _TORCH_TENSOR = t.Tensor
    return isinstance(x, _TORCH_TENSOR)


_TORCH_TYPES = None
_TORCH_OF_TYPE = None


def _torch_types():
    """torch dtype -> element type name (built once, after the caller imported torch)."""
    global _TORCH_TYPES, _TORCH_OF_TYPE
    if _TORCH_TYPES is not None:
        return _TORCH_TYPES
    t = _torch()
    m = {
        t.float32: "fp32",
        t.bfloat16: "bf16",
        t.float16: "fp16",
        t.int32: "i32",
        t.int64: "i64",
        t.uint8: "u8",
    }
    if hasattr(t, "float8_e4m3fn"):
        m[t.float8_e4m3fn] = "fp8"
    _TORCH_OF_TYPE = {v: k for k, v in m.items()}
    _TORCH_TYPES = m
    return m


def type_of(x, name):
    """ringattn element type name of a tensor ("fp32", "bf16", ...)."""
    if is_torch(x):
        typ = _torch_types().get(x.dtype)
        if typ is None:
            raise TypeError(f"{name}: unsupported dtype {x.dtype}")
        return typ
    if isinstance(x, np.ndarray):
        typ = _NUMPY_TYPES.get(x.dtype)
        if typ is None:
            raise TypeError(f"{name}: unsupported dtype {x.dtype}")
        return typ
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def arg(x, name, types=FLOAT_TYPES, ndim=None, shape_text=""):
    """TensorArg over `x` (no copy). Checks kind, device, dtype (one of `types`), rank (an
    int or a tuple of accepted ranks) and that the last dim is contiguous; raises TypeError
    / ValueError naming `name`. The checks run in C++ (_C.tensor_arg): this is on every
    call's path."""
    if ndim is None or isinstance(ndim, int):
        return _C.tensor_arg(x, name, tuple(types), -1 if ndim is None else ndim, shape_text)
    t = _C.tensor_arg(x, name, tuple(types), -1, shape_text)
    if len(t.shape) not in ndim:
        raise ValueError(f"{name}: expected {' or '.join(map(str, ndim))} dims {shape_text}, got "
                         f"{len(t.shape)} (shape {list(t.shape)})")
    return t


def opt_arg(x, name, **kw):
    return None if x is None else arg(x, name, **kw)


def index_array(x, name, ndim=None, shape_text="", lo=None, hi=None):
    """Index tensor -> (contiguous int32 object to keep alive, TensorArg). Accepts int32 or
    int64 torch/numpy (and Python ints/lists, made into numpy); checks the values fit in
    int32 and, when given, lie in [lo, hi]."""
    if lo is None and hi is None and (ndim is None or len(x.shape) == ndim):
        # Fast path (decode calls): an int32 C-contiguous tensor is used as it is, with its
        # values checked by the C++ layer, which names the entry.
        torch_in = is_torch(x)
        if torch_in or isinstance(x, np.ndarray):
            typ = type_of(x, name)
            if typ == "i32" and (x.is_contiguous() if torch_in else x.flags.c_contiguous):
                a = x.numpy() if torch_in else x  # a view: the caller gets numpy either way
                return a, arg(a, name, types=("i32",))
    if not (is_torch(x) or isinstance(x, np.ndarray)):
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integers, got {x.dtype}")
        x = x.astype(np.int64, copy=False)
    typ = type_of(x, name)
    if typ not in INDEX_TYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {typ}")
    if is_torch(x) and x.device.type != "cpu":
        raise ValueError(f"{name}: must be a CPU tensor, got device {x.device}")
    a = x.numpy() if is_torch(x) else x
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {shape_text}, got {a.ndim} (shape {list(a.shape)})")
    convert = a.dtype != np.int32 or not a.flags.c_contiguous
    if a.size and (convert or lo is not None or hi is not None):
        # One reduction per bound actually needed (this sits on the decode call path).
        mn = int(a.min()) if (convert or lo is not None) else 0
        mx = int(a.max()) if (convert or hi is not None) else 0
        if convert and (mn < -(2**31) or mx >= 2**31):
            raise ValueError(f"{name}: values must fit in int32, got range [{mn}, {mx}]")
        if lo is not None and mn < lo:
            raise ValueError(f"{name}: values must be >= {lo}, got {mn}")
        if hi is not None and mx > hi:
            raise ValueError(f"{name}: values must be <= {hi}, got {mx}")
    if convert:
        a = np.ascontiguousarray(a, dtype=np.int32)
    return a, arg(a, name, types=("i32",))


def empty(ref, shape, typ):
    """Uninitialised tensor of the same kind as `ref` (torch or numpy) and element type `typ`."""
    if is_torch(ref):
        t = _torch()
        _torch_types()
        return t.empty(tuple(shape), dtype=_TORCH_OF_TYPE[typ])
    if typ == "bf16":
        raise TypeError("numpy has no bfloat16: pass torch tensors for bf16")
    return np.empty(tuple(shape), dtype=_NUMPY_OF_TYPE[typ])


def full(ref, shape, typ, value):
    out = empty(ref, shape, typ)
    out[...] = value
    return out


def to_type(x, typ):
    """`x` converted to element type `typ` (a copy only when the type differs)."""
    if type_of(x, "x") == typ:
        return x
    if is_torch(x):
        _torch_types()
        return x.to(_TORCH_OF_TYPE[typ])
    return x.astype(_NUMPY_OF_TYPE[typ])


def kind_name(x):
    return "torch" if is_torch(x) else "numpy"


def same_kind(ref, others):
    """Raise TypeError unless every non-None tensor in `others` (name -> tensor) is the same
    kind (torch or numpy) as `ref`."""
    want = kind_name(ref)
    for name, x in others.items():
        if x is not None and (is_torch(x) or isinstance(x, np.ndarray)) and kind_name(x) != want:
            raise TypeError(f"{name}: is a {kind_name(x)} tensor but q is {want}; pass one kind")


def out_type(q_type):
    """Output element type for a query of `q_type` (fp8 inputs give bf16)."""
    return "bf16" if q_type == "fp8" else q_type


def check_scalar_int(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


def window_pair(window_size, name="window_size"):
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (left, right), got {window_size!r}") from None
    left, right = check_scalar_int(left, name + "[0]"), check_scalar_int(right, name + "[1]")
    if left < -1 or right < -1:
        raise ValueError(f"{name}: entries must be >= -1 (-1 = unbounded), got ({left}, {right})")
    return left, right


def sinks_arg(sinks, s_aux, h, ref):
    """(keep-alive fp32 contiguous tensor, TensorArg) of the attention-sink logits [h]
    given as sinks= or its alias s_aux=, or (None, None)."""
    if sinks is not None and s_aux is not None:
        raise ValueError("sinks, s_aux: the same argument under two names; pass only one")
    name = "sinks" if s_aux is None else "s_aux"
    x = sinks if s_aux is None else s_aux
    if x is None:
        return None, None
    same_kind(ref, {name: x})
    typ = type_of(x, name)
    if typ not in FLOAT_TYPES:
        raise TypeError(f"{name}: expected a float tensor (fp32), got {typ}")
    if len(x.shape) != 1 or int(x.shape[0]) != h:
        raise ValueError(f"{name}: expected shape [h] with h={h} (q's heads), got {list(x.shape)}")
    x = to_type(x, "fp32")
    x = x.contiguous() if is_torch(x) else np.ascontiguousarray(x)
    return x, arg(x, name, types=("fp32",))
