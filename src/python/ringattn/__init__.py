"""ringattn: exact attention on CPUs and clusters.

Modules:
  ringattn.flash_attn_interface  FlashAttention-3's Python API (flash_attn_func, ...)
  ringattn.flash_mla_interface   FlashMLA's Python API (flash_mla_with_kvcache, ...)
  ringattn.ring                  ring attention across MPI ranks (mpi4py), named like
                                 ring-flash-attention; imported on first use

Process-wide settings: ``set_backend("auto" | "cpu-amx" | "cpu-avx512-bf16" | "cpu-avx512" |
"cpu-avx2" | "cpu-scalar" | "reference")`` and ``set_num_threads(n)`` (default: OpenMP's, i.e. OMP_NUM_THREADS or the
number of cores). Kernels run with the GIL released; calls from several Python threads
are safe. Inputs are CPU torch tensors or numpy arrays, read in place.
"""

import importlib

import numpy as np

from . import _C, _tensor
from ._C import (  # noqa: F401  (re-exported)
    CommError,
    Error,
    InvalidArgument,
    IoError,
    ResourceError,
    UnsupportedError,
)

__version__ = _C.version()

__all__ = [
    "__version__",
    "set_backend",
    "backend",
    "available_backends",
    "set_num_threads",
    "get_num_threads",
    "merge_state",
    "merge_states",
    "flash_attn_interface",
    "flash_mla_interface",
    "ring",
    "session",
    "Error",
    "InvalidArgument",
    "UnsupportedError",
    "IoError",
    "CommError",
    "ResourceError",
]


def set_backend(name):
    """Choose the kernel backend for this process: "auto" (best this CPU supports), "cpu"
    (best SIMD), "cpu-amx" (bf16 prefill on Intel AMX tiles), "cpu-avx512-bf16" (bf16
    prefill on vdpbf16ps), "cpu-avx512", "cpu-avx2", "cpu-scalar" or "reference". A backend this CPU
    cannot run raises UnsupportedError (a ValueError) naming the missing feature."""
    if not isinstance(name, str):
        raise TypeError(f"set_backend: name must be a str, got {type(name).__name__}")
    _C.set_backend(name)


def backend():
    """Name of the backend in use (what "auto" resolved to, e.g. "cpu-avx512")."""
    return _C.backend()


def available_backends():
    """Backends this machine can run, best first (always ends with "reference")."""
    return list(_C.available_backends())


def set_num_threads(n):
    """OpenMP threads each kernel call uses (n >= 1)."""
    _C.set_num_threads(_tensor.check_scalar_int(n, "set_num_threads: n"))


def get_num_threads():
    """OpenMP threads each kernel call uses."""
    return _C.get_num_threads()


def _float_type(x, name):
    typ = _tensor.type_of(x, name)
    if typ in _tensor.INDEX_TYPES or typ == "u8":
        raise TypeError(f"{name}: expected a floating-point tensor, got {typ}")
    return typ


def _fp32_contiguous(x, name):
    _tensor.type_of(x, name)
    x = _tensor.to_type(x, "fp32")
    if _tensor.is_torch(x):
        return x.contiguous()
    return np.ascontiguousarray(x)


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two partial attention states over disjoint key sets (FlashInfer's
    ``merge_state``, but the LSE is the NATURAL log, as everywhere in ringattn).

    v_a, v_b: [seq, h, d] partial outputs; s_a, s_b: [seq, h] their LSEs (natural log,
    -inf or +inf = empty state). Returns (v [seq, h, d] in v_a's dtype, s [seq, h] fp32):
      s = log(exp(s_a) + exp(s_b)),  v = v_a * exp(s_a - s) + v_b * exp(s_b - s).
    Two empty states give v = 0 and s = -inf.
    """
    _tensor.same_kind(v_a, {"s_a": s_a, "v_b": v_b, "s_b": s_b})
    for name, x, nd in (("v_a", v_a, 3), ("s_a", s_a, 2), ("v_b", v_b, 3), ("s_b", s_b, 2)):
        _tensor.type_of(x, name)
        if len(x.shape) != nd:
            raise ValueError(f"{name}: expected {nd} dims, got shape {list(x.shape)}")
    if tuple(v_a.shape) != tuple(v_b.shape):
        raise ValueError(f"v_b: shape {list(v_b.shape)} must equal v_a's {list(v_a.shape)}")
    for name, s in (("s_a", s_a), ("s_b", s_b)):
        if tuple(s.shape) != tuple(v_a.shape[:2]):
            raise ValueError(f"{name}: shape {list(s.shape)} must be [seq, h] = {list(v_a.shape[:2])}")
    for name, x in (("v_a", v_a), ("s_a", s_a), ("v_b", v_b), ("s_b", s_b)):
        _float_type(x, name)
    typ = _tensor.type_of(v_a, "v_a")
    seq, h, d = (int(x) for x in v_a.shape)
    if seq * h == 0:  # no rows: nothing to merge (the kernel takes non-empty tensors)
        return _tensor.empty(v_a, (seq, h, d), typ), _tensor.empty(v_a, (seq, h), "fp32")
    if d == 0:
        # The LSEs still merge: run the merge on one zero column and drop it.
        z = _tensor.full(v_a, (seq, h, 1), "fp32", 0.0)
        _, s = merge_state(z, s_a, z, s_b)
        return _tensor.empty(v_a, (seq, h, 0), typ), s
    va, sa = _fp32_contiguous(v_a, "v_a"), _fp32_contiguous(s_a, "s_a")
    vb, sb = _fp32_contiguous(v_b, "v_b"), _fp32_contiguous(s_b, "s_b")
    v = _tensor.empty(v_a, v_a.shape, "fp32")
    s = _tensor.empty(v_a, s_a.shape, "fp32")
    a = lambda x, n: _tensor.arg(x, n, types=("fp32",))  # noqa: E731
    _C.merge_state(a(va, "v_a"), a(sa, "s_a"), a(vb, "v_b"), a(sb, "s_b"), a(v, "v"), a(s, "s"))
    return _tensor.to_type(v, typ), s


def merge_states(v, s):
    """Merge several partial states per row (FlashInfer's ``merge_states``, natural-log LSE).

    v: [seq, num_states, h, d], s: [seq, num_states, h]. Returns (v [seq, h, d] in v's
    dtype, s [seq, h] fp32). Empty states (LSE -inf) contribute nothing; a row whose states
    are all empty gives 0 / -inf.
    """
    _tensor.same_kind(v, {"s": s})
    _tensor.type_of(v, "v")
    _tensor.type_of(s, "s")
    if len(v.shape) != 4:
        raise ValueError(f"v: expected 4 dims [seq, num_states, h, d], got shape {list(v.shape)}")
    if tuple(s.shape) != tuple(v.shape[:3]):
        raise ValueError(f"s: shape {list(s.shape)} must be [seq, num_states, h] = {list(v.shape[:3])}")
    typ = _float_type(v, "v")
    _float_type(s, "s")
    seq, n, h, d = (int(x) for x in v.shape)
    if seq * h == 0:  # no rows
        return _tensor.empty(v, (seq, h, d), typ), _tensor.empty(v, (seq, h), "fp32")
    if n == 0:  # no states: every row is empty (0, -inf)
        return _tensor.full(v, (seq, h, d), typ, 0.0), _tensor.full(v, (seq, h), "fp32", -np.inf)
    if d == 0:  # the LSEs still merge: run on one zero column and drop it
        _, so = merge_states(_tensor.full(v, (seq, n, h, 1), "fp32", 0.0), s)
        return _tensor.empty(v, (seq, h, 0), typ), so
    # [seq, states, h, d] -> rows (seq, h) with their states side by side.
    vp = _fp32_contiguous(v.transpose(0, 2, 1, 3) if not _tensor.is_torch(v) else v.permute(0, 2, 1, 3), "v")
    sp = _fp32_contiguous(s.transpose(0, 2, 1) if not _tensor.is_torch(s) else s.permute(0, 2, 1), "s")
    vp = vp.reshape(seq * h, n, d)
    sp = sp.reshape(seq * h, n)
    vo = _tensor.empty(v, (seq * h, d), "fp32")
    so = _tensor.empty(v, (seq * h,), "fp32")
    a = lambda x, nm: _tensor.arg(x, nm, types=("fp32",))  # noqa: E731
    _C.merge_states(a(vp, "v"), a(sp, "s"), a(vo, "v_out"), a(so, "s_out"))
    return _tensor.to_type(vo.reshape(seq, h, d), typ), so.reshape(seq, h)


def __getattr__(name):
    # Submodules load on first use: ringattn.ring imports mpi4py (which starts MPI).
    if name in ("flash_attn_interface", "flash_mla_interface", "ring", "session"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ringattn' has no attribute {name!r}")
