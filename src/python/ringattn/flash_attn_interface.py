"""FlashAttention-3's Python API (``hopper/flash_attn_interface.py``) on ringattn's CPU kernels.

Same function names, positional order, keyword names and defaults as FlashAttention-3, so
code written for it runs unchanged on CPU tensors::

    import sys
    import ringattn.flash_attn_interface
    sys.modules["flash_attn_interface"] = ringattn.flash_attn_interface
    from flash_attn_interface import flash_attn_func, flash_attn_with_kvcache

Inputs are CPU ``torch.Tensor`` or ``numpy.ndarray`` (one kind per call), fp32 / bf16 /
fp16 (or fp8 e4m3, below), last dim contiguous; they are read **in place** (no copy of q, k, v or the caches,
other strides are free). Outputs have q's dtype and kind; LSE is always fp32 and the
NATURAL log (``[b, h, s_q]``, varlen ``[h, total_q]``). A query row that sees no key gets
output 0 and LSE -inf. Semantics: docs/semantics.md sections 1-3 and 5.

Attention sinks (gpt-oss): ``sinks=`` (FlashInfer's name; ``s_aux=``, the name of FA3's
vLLM fork, is an alias) takes ``[h]`` fp32 logits, one per query head, on
``flash_attn_func`` and ``flash_attn_varlen_func``. Each output row is multiplied by
``exp(lse) / (exp(lse) + exp(sinks[h]))``; the returned LSE excludes the sink, so
partial results still merge exactly (``flash_attn_combine``, then apply the sink once).
``+inf`` gives output 0, ``-inf`` no effect, NaN is a ``ValueError``.

Chunked local attention (Llama 4): ``attention_chunk=C > 0`` on ``flash_attn_func`` and
``flash_attn_varlen_func`` lets query row ``i`` see only the keys of the size-``C`` chunk
that holds its diagonal key ``p = i + s_k - s_q`` (keys ``[C*floor(p/C), C*floor(p/C) + C)``),
together with ``causal`` / ``window_size`` (FA3 semantics).

fp8 e4m3 (FA3): q, k, v (and the KV caches, k, v of ``flash_attn_with_kvcache``) may be
``torch.float8_e4m3fn``, or ``uint8`` tensors holding e4m3 bits (torch builds without an
fp8 dtype, such as Debian's torch 1.13, and numpy); all of one call's operands use the
same one. ``q_descale``, ``k_descale``, ``v_descale`` ``[b, h_k]`` fp32 (optional, default
1) multiply the dequantised values: scores ``scale * q_descale[b, g] * k_descale[b, g] *
(q . k)`` and output ``v_descale[b, g] * softmax V`` for query heads of KV head ``g``; the
LSE is that of these scores. The output is bf16 (fp32 for numpy inputs, numpy having no
bfloat16); descales on non-fp8 inputs are a ``ValueError``. Rotary tables with fp8 are
rejected (rotate before quantising).

``qv`` (FA3's extra query part, all three functions): a tensor shaped as the output
(``[b, s_q, h, d_v]``, varlen ``[total_q, h, d_v]``) in q's dtype; the score becomes
``softmax_scale * (q . k + qv . v)`` and the default scale ``1/sqrt(d + d_v)``. ``d_v`` is
limited to 256 as everywhere; FA3's MLA shape (``d = 64, d_v = 512``) belongs to
``ringattn.flash_mla_interface``. qv is not rotated by ``rotary_cos / rotary_sin``.
qv is not supported with fp8 inputs.

Speed hints (``num_splits``, ``pack_gqa``, ``sm_margin``, ``deterministic``,
``scheduler_metadata``) are accepted and never change results beyond rounding. There is no
backward pass (outputs do not track gradients).
"""

import math

import numpy as np

from . import _C, _tensor

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
    "flash_attn_combine",
]


# ---- argument helpers ----


def _unsupported(**named):
    """ValueError for the first argument set to something other than its default."""
    for name, (value, default) in named.items():
        if value is None and default is None:
            continue
        if default is None or value is None or value != default:
            raise ValueError(
                f"{name}: not supported by ringattn's CPU kernels yet (got {_describe(value)}; "
                f"leave it at {default!r})"
            )


def _describe(x):
    if _tensor.is_torch(x) or isinstance(x, np.ndarray):
        return f"a {_tensor.kind_name(x)} tensor of shape {list(x.shape)}"
    return repr(x)


# fp8 e4m3 operands: torch.float8_e4m3fn, or uint8 holding the e4m3 bits (torch builds
# without an fp8 dtype, e.g. Debian's torch 1.13; numpy).
_FP8_TYPES = ("fp8", "u8")


def _float_arg(x, name, ndim, shape_text):
    """TensorArg of an attention operand (fp32 / bf16 / fp16 / fp8 e4m3), read in place."""
    if x is None:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got None")
    return _tensor.arg(x, name, types=_tensor.FLOAT_TYPES + _FP8_TYPES, ndim=ndim,
                       shape_text=shape_text)


def _out_type(ref, typ):
    """Output element type for inputs of element type `typ`: q's type, and for fp8 inputs
    bf16 (torch) or fp32 (numpy, which has no bfloat16)."""
    if typ in _FP8_TYPES:
        return "bf16" if _tensor.is_torch(ref) else "fp32"
    return typ


def _descale_args(typ, b, h_k, ref, **named):
    """TensorArgs of q_descale / k_descale / v_descale ([b, h_k] fp32, FA3; None when absent).
    Only fp8 inputs take them."""
    out = []
    for name, x in named.items():
        if x is None:
            out.append(None)
            continue
        if typ not in _FP8_TYPES:
            raise ValueError(f"{name}: only fp8 inputs (float8_e4m3fn or uint8 e4m3 bits) take "
                             f"descales, q is {typ}")
        _tensor.same_kind(ref, {name: x})
        t = _tensor.arg(x, name, types=("fp32",), ndim=2, shape_text="[b, h_k]")
        if tuple(t.shape) != (b, h_k):
            raise ValueError(f"{name}: expected shape [b, h_k] = [{b}, {h_k}], got {list(t.shape)}")
        out.append(t)
    return out


def _same_dtype(qa, others):
    """TypeError unless every TensorArg in `others` (name -> TensorArg or None) has q's dtype."""
    want = qa.type
    for name, t in others.items():
        if t is not None and t.type != want:
            raise TypeError(f"{name}: dtype {t.type} must equal q's {want}")


def _check_head_dims(d, d_v, qname, vname):
    """The kernels take head dims that are multiples of 8 in [8, 256]."""
    for name, what, n in ((qname, "head dim d", d), (vname, "value head dim d_v", d_v)):
        if n % 8 or not 8 <= n <= 256:
            raise ValueError(f"{name}: {what}={n} must be a multiple of 8 in [8, 256]")


def _qv_arg(qv, q, qa, want, shape_text):
    """TensorArg of FA3's qv (None when absent): shaped as the output `want`, q's dtype.

    A value head dim over the kernels' limit names the MLA path (FA3 runs MLA as d = 64,
    d_v = 512 through qv; ringattn has dedicated MLA kernels for that)."""
    if qv is None:
        return None
    _tensor.same_kind(q, {"qv": qv})
    qva = _float_arg(qv, "qv", len(want), shape_text)
    _same_dtype(qa, {"qv": qva})
    got = [int(x) for x in qv.shape]
    if got != list(want):
        raise ValueError(f"qv: shape {got} must equal {shape_text} = {list(want)} "
                         f"(q is {list(q.shape)})")
    d_v = int(want[-1])
    if d_v > 256:
        raise ValueError(f"qv: d_v={d_v} exceeds 256, the value head dim limit of ringattn's "
                         f"attention kernels; absorbed MLA (d_v=512) runs through "
                         f"ringattn.flash_mla_interface")
    return qva


def _lse_arg(lse, name="softmax_lse"):
    """TensorArg of a freshly allocated LSE, or None when it has no element to write."""
    return _tensor.arg(lse, name, types=("fp32",)) if math.prod(lse.shape) else None


def _scale(softmax_scale):
    """Softmax scale for the kernel: 0 means the default 1/sqrt(d) (1/sqrt(d + d_v) with qv)."""
    if softmax_scale is None:
        return 0.0
    s = float(softmax_scale)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"softmax_scale: must be a positive finite number, got {softmax_scale!r}")
    return s


def _softcap(softcap):
    c = float(softcap)
    if not math.isfinite(c) or c < 0.0:
        raise ValueError(f"softcap: must be >= 0 (0 = off), got {softcap!r}")
    return c


def _num_splits(num_splits):
    """FA3's num_splits: n > 0 asks for n key splits (1 = none), <= 0 lets the engine decide."""
    n = _tensor.check_scalar_int(num_splits, "num_splits")
    return n if n > 0 else 0


def _attention_chunk(attention_chunk):
    """FA3's attention_chunk: 0 = off, C > 0 = chunked local attention (module docstring)."""
    c = _tensor.check_scalar_int(attention_chunk, "attention_chunk")
    if c < 0:
        raise ValueError(f"attention_chunk: must be >= 0 (0 = off), got {c}")
    return c


def _opt_int(x, name):
    return None if x is None else _tensor.check_scalar_int(x, name)


def _index(x, name, ndim=1, lo=None):
    """(keep-alive int32 array, TensorArg) of an index tensor, or (None, None)."""
    if x is None:
        return None, None
    return _tensor.index_array(x, name, ndim=ndim, lo=lo)


def _fp32_table(x, name):
    """A rotary table as contiguous fp32 (a small copy when it is not already)."""
    _tensor.type_of(x, name)
    x = _tensor.to_type(x, "fp32")
    return x.contiguous() if _tensor.is_torch(x) else np.ascontiguousarray(x)


_DTYPE_NAMES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}


def _dtype_name(dt, name):
    """"fp32" | "bf16" | "fp16" from a torch dtype, numpy dtype or string (None stays None)."""
    if dt is None:
        return None
    if isinstance(dt, str):
        key = dt
    elif "torch" in type(dt).__module__:
        key = str(dt).replace("torch.", "")  # torch.bfloat16 -> "bfloat16"
    else:
        try:
            key = np.dtype(dt).name
        except TypeError:
            key = None
    typ = _DTYPE_NAMES.get(key)
    if typ is None:
        raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {dt!r}")
    return typ


def _strided_fp32(x, name):
    """TensorArg of an fp32 LSE tensor with ANY non-negative strides (the combine reads and
    writes LSEs element by element; FA3's LSE views are contiguous along seqlen, not the
    last dim)."""
    if _tensor.type_of(x, name) != "fp32":
        raise TypeError(f"{name}: must be fp32, got {_tensor.type_of(x, name)}")
    if _tensor.is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: must be a CPU tensor, got device {x.device}")
        strides, ptr = tuple(x.stride()), x.data_ptr()
    else:
        strides, ptr = tuple(st // x.itemsize for st in x.strides), x.ctypes.data
        if any(st % x.itemsize for st in x.strides):
            raise ValueError(f"{name}: strides {x.strides} are not a multiple of the item size")
    if any(st < 0 for st in strides):
        raise ValueError(f"{name}: negative strides {list(strides)} are not supported")
    return _C.TensorArg(name, ptr, "fp32", [int(n) for n in x.shape], list(strides))


def _lse_empty(ref):
    """FA3 returns empty fp32 tensors for the split accumulators it did not use."""
    return _tensor.empty(ref, (0,), "fp32")


# ---- dense and varlen forward (docs/semantics.md sections 1-2) ----


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
    *,
    sinks=None,
    s_aux=None,
    dropout_p=0.0,
    alibi_slopes=None,
):
    """Dense attention: q [b, s_q, h, d], k [b, s_k, h_k, d], v [b, s_k, h_k, d_v]
    (h % h_k == 0: GQA/MQA). Returns out [b, s_q, h, d_v] in q's dtype, or
    (out, softmax_lse [b, h, s_q] fp32, natural log) when return_attn_probs.

    causal / window_size=(left, right) use the bottom-right aligned mask; softcap > 0
    applies softcap * tanh(score / softcap). softmax_scale defaults to 1/sqrt(d).
    num_splits > 0 asks for that many key splits, <= 0 lets the engine decide; pack_gqa,
    deterministic and sm_margin are accepted and ignored. sinks (alias s_aux): [h] fp32
    attention-sink logits; attention_chunk > 0: chunked local attention (module
    docstring). qv [b, s_q, h, d_v] (q's dtype): score = softmax_scale * (q . k + qv . v),
    default scale 1/sqrt(d + d_v). The keyword-only dropout_p and alibi_slopes exist only
    to raise a clear ValueError.
    """
    _unsupported(dropout_p=(dropout_p, 0.0), alibi_slopes=(alibi_slopes, None))
    _tensor.type_of(q, "q")
    _tensor.same_kind(q, {"k": k, "v": v})
    qa = _float_arg(q, "q", 4, "[b, s_q, h, d]")
    ka = _float_arg(k, "k", 4, "[b, s_k, h_k, d]")
    va = _float_arg(v, "v", 4, "[b, s_k, h_k, d_v]")
    _same_dtype(qa, {"k": ka, "v": va})
    b, s_q, h, d = (int(x) for x in q.shape)
    d_v = int(v.shape[-1])
    qva = _qv_arg(qv, q, qa, (b, s_q, h, d_v), "[b, s_q, h, d_v]")
    _check_head_dims(d, d_v, "q", "v")
    dsa = _descale_args(qa.type, b, int(k.shape[2]), q, q_descale=q_descale,
                        k_descale=k_descale, v_descale=v_descale)
    typ = _out_type(q, qa.type)
    out = _tensor.empty(q, (b, s_q, h, d_v), typ)
    lse = _tensor.empty(q, (b, h, s_q), "fp32")
    wl, wr = _tensor.window_pair(window_size)
    sink, sink_arg = _tensor.sinks_arg(sinks, s_aux, h, q)
    if b == 0:  # nothing to compute (the kernels take b >= 1)
        return (out, lse) if return_attn_probs else out
    _C.fwd(qa, ka, va, _tensor.arg(out, "out"), _lse_arg(lse),
           None, None, None, None, 0, 0, _scale(softmax_scale), bool(causal), wl, wr,
           _softcap(softcap), _num_splits(num_splits), sink_arg,
           _attention_chunk(attention_chunk), *dsa, qva)
    del sink
    return (out, lse) if return_attn_probs else out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
    *,
    sinks=None,
    s_aux=None,
    dropout_p=0.0,
    alibi_slopes=None,
):
    """Variable-length attention over packed sequences: q [total_q, h, d], k [total_k, h_k, d],
    v [total_k, h_k, d_v], cu_seqlens_q / cu_seqlens_k [b + 1] int32 (int64 accepted) prefix
    sums, max_seqlen_q / max_seqlen_k the longest segments (None: computed), seqused_q /
    seqused_k [b] optional lengths used from each segment. Each segment is its own problem
    (mask of flash_attn_func); a segment with no keys gives 0 / -inf. Returns out
    [total_q, h, d_v] in q's dtype, or (out, softmax_lse [h, total_q] fp32) when
    return_attn_probs. Rows of q past cu_seqlens_q[-1] or past seqused_q get 0 / -inf.
    sinks (alias s_aux): [h] fp32 attention-sink logits; attention_chunk > 0: chunked
    local attention within each segment (module docstring). qv [total_q, h, d_v]: as in
    flash_attn_func.
    """
    _unsupported(dropout_p=(dropout_p, 0.0), alibi_slopes=(alibi_slopes, None))
    _tensor.type_of(q, "q")
    _tensor.same_kind(q, {"k": k, "v": v})
    qa = _float_arg(q, "q", 3, "[total_q, h, d]")
    ka = _float_arg(k, "k", 3, "[total_k, h_k, d]")
    va = _float_arg(v, "v", 3, "[total_k, h_k, d_v]")
    _same_dtype(qa, {"k": ka, "v": va})
    total_q, h, d = (int(x) for x in q.shape)
    total_k = int(k.shape[0])
    d_v = int(v.shape[-1])
    qva = _qv_arg(qv, q, qa, (total_q, h, d_v), "[total_q, h, d_v]")
    _check_head_dims(d, d_v, "q", "v")
    cq, cqa = _index(cu_seqlens_q, "cu_seqlens_q", lo=0)
    ck, cka = _index(cu_seqlens_k, "cu_seqlens_k", lo=0)
    if cq is None or ck is None:
        raise ValueError("cu_seqlens_q, cu_seqlens_k: both are required ([b + 1] int32)")
    if cq.shape[0] < 2 or cq.shape[0] != ck.shape[0]:
        raise ValueError(f"cu_seqlens_k: must have b + 1 >= 2 entries like cu_seqlens_q, got "
                         f"{ck.shape[0]} and {cq.shape[0]}")
    b = int(cq.shape[0]) - 1
    end_q, end_k = int(cq[-1]), int(ck[-1])
    if end_q > total_q:
        raise ValueError(f"cu_seqlens_q: last entry {end_q} exceeds q's {total_q} rows")
    if end_k > total_k:
        raise ValueError(f"cu_seqlens_k: last entry {end_k} exceeds k's {total_k} rows")
    if max_seqlen_q is None:
        max_seqlen_q = int(np.diff(cq).max())
    if max_seqlen_k is None:
        max_seqlen_k = int(np.diff(ck).max())
    msq = _tensor.check_scalar_int(max_seqlen_q, "max_seqlen_q")
    msk = _tensor.check_scalar_int(max_seqlen_k, "max_seqlen_k")
    sq, sqa = _index(seqused_q, "seqused_q", lo=0)
    sk, ska = _index(seqused_k, "seqused_k", lo=0)
    for name, arr in (("seqused_q", sq), ("seqused_k", sk)):
        if arr is not None and arr.shape[0] != b:
            raise ValueError(f"{name}: expected {b} entries (one per sequence), got {arr.shape[0]}")
    dsa = _descale_args(qa.type, b, int(k.shape[1]), q, q_descale=q_descale,
                        k_descale=k_descale, v_descale=v_descale)
    typ = _out_type(q, qa.type)
    out = _tensor.empty(q, (total_q, h, d_v), typ)
    lse = _tensor.empty(q, (h, total_q), "fp32")
    # The kernel writes rows [0, cu_seqlens_q[-1]) and lays the LSE out as [h, that].
    lse_k = lse if end_q == total_q else _tensor.empty(q, (h, end_q), "fp32")
    wl, wr = _tensor.window_pair(window_size)
    sink, sink_arg = _tensor.sinks_arg(sinks, s_aux, h, q)
    _C.fwd(qa, ka, va, _tensor.arg(out, "out"), _lse_arg(lse_k),
           cqa, cka, sqa, ska, msq, msk, _scale(softmax_scale), bool(causal), wl, wr,
           _softcap(softcap), _num_splits(num_splits), sink_arg,
           _attention_chunk(attention_chunk), *dsa, qva)
    del sink
    if end_q < total_q:
        out[end_q:] = 0
        lse[:, :end_q] = lse_k
        lse[:, end_q:] = -math.inf
    return (out, lse) if return_attn_probs else out


# ---- split combine (docs/semantics.md section 5) ----


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Combine split-KV partial results: out_partial [num_splits, b, s, h, d] fp32,
    lse_partial [num_splits, b, s, h] fp32 (natural log; -inf or +inf = empty split), any
    strides (FA3 passes a transposed LSE). Returns (out [b, s, h, d] in out_dtype (default
    fp32; bf16 / fp16 allowed), softmax_lse [b, s, h] fp32) - FA3's layout, where the LSE
    is a transposed view of a [b, h, s] buffer. `out`, when given, is written in place and
    returned. Rows whose splits are all empty give 0 / -inf. Also accepts the varlen form
    [num_splits, total, h, d] / [num_splits, total, h] (returns [total, h, d], [total, h]).
    """
    _tensor.same_kind(out_partial, {"lse_partial": lse_partial, "out": out})
    for name, x in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        if _tensor.type_of(x, name) != "fp32":
            raise TypeError(f"{name}: must be fp32, got {_tensor.type_of(x, name)}")
    varlen = len(out_partial.shape) == 4
    if varlen:
        if len(lse_partial.shape) != 3:
            raise ValueError(f"lse_partial: expected 3 dims [num_splits, total, h] with a 4-dim out_partial, "
                             f"got shape {list(lse_partial.shape)}")
        out_partial, lse_partial = out_partial[:, None], lse_partial[:, None]
    elif len(out_partial.shape) != 5:
        raise ValueError(f"out_partial: expected 5 dims [num_splits, b, s, h, d] (or 4 for varlen), "
                         f"got shape {list(out_partial.shape)}")
    _, b, s, h, d = (int(x) for x in out_partial.shape)
    typ = _dtype_name(out_dtype, "out_dtype")
    if out is not None:
        otyp = _tensor.type_of(out, "out")
        if typ is not None and otyp != typ:
            raise TypeError(f"out: dtype {otyp} differs from out_dtype {typ}")
        want = (b * s, h, d) if varlen else (b, s, h, d)
        if tuple(int(x) for x in out.shape) != want:
            raise ValueError(f"out: shape {list(out.shape)} must be {list(want)}")
        out_t = out
    else:
        shape = (b * s, h, d) if varlen else (b, s, h, d)
        out_t = _tensor.empty(out_partial, shape, typ or "fp32")
    lse_bhs = _tensor.empty(out_partial, (b, h, s), "fp32")
    lse = lse_bhs.transpose(1, 2) if _tensor.is_torch(lse_bhs) else lse_bhs.transpose(0, 2, 1)
    out_v = out_t[None] if varlen else out_t
    _C.combine(_tensor.arg(out_partial, "out_partial", types=("fp32",)),
               _strided_fp32(lse_partial, "lse_partial"), _tensor.arg(out_v, "out"),
               _strided_fp32(lse, "softmax_lse"))
    return out_t, (lse[0] if varlen else lse)


# ---- KV cache (docs/semantics.md section 3) ----


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    page_table=None,
    cu_seqlens_q=None,
    cu_seqlens_k_new=None,
    max_seqlen_q=None,
    rotary_seqlens=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    attention_chunk=0,
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    scheduler_metadata=None,
    num_splits=0,  # speed only
    pack_gqa=None,  # speed only (ignored)
    sm_margin=0,  # speed only (ignored)
    return_softmax_lse=False,
    *,
    sinks=None,
    s_aux=None,
):
    """Attention against a KV cache, appending new tokens in place.

    q [b, s_q, h, d]; k_cache / v_cache dense [b_cache, s_cache, h_k, d / d_v], or paged
    [num_blocks, page_size, h_k, d / d_v] with page_table [b, max_pages] int32 (any
    page_size). cache_seqlens: int or [b] int32, valid length before the append (None: the
    whole capacity, only without k/v). k / v [b, s_new, h_k, d / d_v]: written IN PLACE into
    k_cache / v_cache at [cache_seqlens, cache_seqlens + s_new) and attended to.
    cache_batch_idx [b]: cache row (dense) or page-table row of each sequence.
    cache_leftpad [b]: first valid slot; keys before it are ignored. rotary_cos / rotary_sin
    [s_rotary, rotary_dim / 2] rotate k at positions cache_seqlens + i and q at the same
    positions when causal or windowed, else at cache_seqlens (rotary_interleaved picks
    GPT-J pairs (2i, 2i+1) or GPT-NeoX halves). Cache slots outside [leftpad,
    cache_seqlens + s_new) are never read (may hold NaN). Chunked prefill: cu_seqlens_q
    [b + 1] packs each sequence's query rows (q [total_q, h, d], out [total_q, h, d_v], LSE
    [h, total_q]); cu_seqlens_k_new [b + 1] packs each sequence's new keys (k / v
    [total_new, h_k, d / d_v]); rotary_seqlens [b] replaces cache_seqlens as rotary position.
    sinks= / s_aux=, attention_chunk and qv (shaped as out, never rotated) as in
    flash_attn_func.

    Returns out [b, s_q, h, d_v] in q's dtype, or, when return_softmax_lse, FA3's tuple
    (out, softmax_lse [b, h, s_q] fp32, out_accum, softmax_lse_accum) where the two split
    accumulators are empty fp32 tensors (the CPU kernel merges its splits internally).
    scheduler_metadata from get_scheduler_metadata is used as the split plan.
    """
    if (qv is None and attention_chunk == 0 and cu_seqlens_q is None and cu_seqlens_k_new is None
            and max_seqlen_q is None and rotary_seqlens is None and sinks is None and s_aux is None
            and q_descale is None and k_descale is None and v_descale is None):
        # The common decode call runs in one C++ call (None: this Python path applies).
        r = _C.kvcache_fast(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                            cache_batch_idx, cache_leftpad, page_table, softmax_scale, causal,
                            window_size, softcap, scheduler_metadata, num_splits, return_softmax_lse)
        if r is not None:
            return r
    _tensor.type_of(q, "q")
    _tensor.same_kind(q, {"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
                          "rotary_cos": rotary_cos, "rotary_sin": rotary_sin})
    if (k is None) != (v is None):
        raise ValueError(f"k, v: new keys and values must be given together (k is "
                         f"{'None' if k is None else 'set'}, v is {'None' if v is None else 'set'})")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: must be given together")
    vq, vk = cu_seqlens_q is not None, cu_seqlens_k_new is not None
    if max_seqlen_q is not None and not vq:
        raise ValueError("max_seqlen_q: only used with cu_seqlens_q")
    if vk and k is None:
        raise ValueError("cu_seqlens_k_new: needs new keys and values k, v")
    qa = _float_arg(q, "q", 3 if vq else 4, "[total_q, h, d]" if vq else "[b, s_q, h, d]")
    kca = _float_arg(k_cache, "k_cache", 4, "[b_cache, s_cache, h_k, d] or [num_blocks, page_size, h_k, d]")
    vca = _float_arg(v_cache, "v_cache", 4, "[b_cache, s_cache, h_k, d_v] or [num_blocks, page_size, h_k, d_v]")
    kn_dims, kn_text = (3, "[total_new, h_k, d]") if vk else (4, "[b, s_new, h_k, d]")
    ka = None if k is None else _float_arg(k, "k", kn_dims, kn_text)
    va = None if v is None else _float_arg(v, "v", kn_dims, kn_text.replace(" d]", " d_v]"))
    _same_dtype(qa, {"k_cache": kca, "v_cache": vca, "k": ka, "v": va})
    if k is not None:
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if isinstance(x, np.ndarray) and not x.flags.writeable:
                raise ValueError(f"{name}: is read-only, but new k/v are written into it")
    cq, cqa = _index(cu_seqlens_q, "cu_seqlens_q", lo=0)
    ckn, ckna = _index(cu_seqlens_k_new, "cu_seqlens_k_new", lo=0)
    if vq:
        b, total_q = int(cq.shape[0]) - 1, int(q.shape[0])
        h, d = int(q.shape[1]), int(q.shape[2])
        s_q = 0 if max_seqlen_q is None else _tensor.check_scalar_int(max_seqlen_q, "max_seqlen_q")
    else:
        b, s_q, h, d = (int(x) for x in q.shape)
    d_v = int(v_cache.shape[-1])
    qva = _qv_arg(qv, q, qa, (total_q, h, d_v) if vq else (b, s_q, h, d_v),
                  "[total_q, h, d_v]" if vq else "[b, s_q, h, d_v]")
    _check_head_dims(d, d_v, "q", "v_cache")

    pt, pta = _index(page_table, "page_table", ndim=2)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens: required when new k/v are appended")
        cap = int(pt.shape[1]) * int(k_cache.shape[1]) if pt is not None else int(k_cache.shape[1])
        cache_seqlens = cap
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        cache_seqlens = np.full((b,), int(cache_seqlens), dtype=np.int32)
    # Values are checked by the kernel layer (>= 0, within the cache), naming the entry.
    cs, csa = _index(cache_seqlens, "cache_seqlens")
    cb, cba = _index(cache_batch_idx, "cache_batch_idx")
    lp, lpa = _index(cache_leftpad, "cache_leftpad")
    _, plana = _index(scheduler_metadata, "scheduler_metadata", lo=1)
    cos = sin = None
    if rotary_cos is not None:
        cos, sin = _fp32_table(rotary_cos, "rotary_cos"), _fp32_table(rotary_sin, "rotary_sin")
    rs, rsa = _index(rotary_seqlens, "rotary_seqlens")
    sk, ska = _tensor.sinks_arg(sinks, s_aux, h, q)
    chunk = _tensor.check_scalar_int(attention_chunk, "attention_chunk")
    dsa = _descale_args(qa.type, b, int(k_cache.shape[2]), q, q_descale=q_descale,
                        k_descale=k_descale, v_descale=v_descale)
    typ = _out_type(q, qa.type)
    out = _tensor.empty(q, (total_q, h, d_v) if vq else (b, s_q, h, d_v), typ)
    lse = _tensor.empty(q, (h, total_q) if vq else (b, h, s_q), "fp32")
    wl, wr = _tensor.window_pair(window_size)
    if b == 0:  # nothing to compute or append (the kernels take b >= 1)
        return (out, lse, _lse_empty(q), _lse_empty(q)) if return_softmax_lse else out
    _C.fwd_kvcache(qa, kca, vca, ka, va, _tensor.arg(out, "out"), _lse_arg(lse), csa, cba, lpa, pta,
                   None if cos is None else _tensor.arg(cos, "rotary_cos", types=("fp32",)),
                   None if sin is None else _tensor.arg(sin, "rotary_sin", types=("fp32",)),
                   bool(rotary_interleaved), _scale(softmax_scale), bool(causal), wl, wr,
                   _softcap(softcap), _num_splits(num_splits), plana, ska, chunk, rsa, cqa,
                   s_q if vq else 0, ckna, *dsa, qva)
    del cs, cb, lp, pt, cq, ckn, rs, sk  # kept alive through the call
    if return_softmax_lse:
        return out, lse, _lse_empty(q), _lse_empty(q)
    return out


def get_scheduler_metadata(
    batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
    cache_seqlens,
    qkv_dtype=None,
    headdim_v=None,
    cu_seqlens_q=None,
    cu_seqlens_k_new=None,
    cache_leftpad=None,
    page_size=None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,  # speed only
    pack_gqa=None,  # speed only (ignored)
    sm_margin=0,  # speed only (ignored)
):
    """Split plan for a flash_attn_with_kvcache call with these shapes: an int32 tensor [b]
    (the kind of cache_seqlens: torch in -> torch out; an int gives numpy) holding the number
    of key splits of each sequence. Pass it back as scheduler_metadata; it changes speed
    only. qkv_dtype defaults to bfloat16 (FA3's torch.bfloat16) and accepts torch / numpy
    dtypes or "fp32" / "bf16" / "fp16". page_size does not change the plan.
    """
    _unsupported(cu_seqlens_q=(cu_seqlens_q, None), cu_seqlens_k_new=(cu_seqlens_k_new, None),
                 attention_chunk=(attention_chunk, 0))
    b = _tensor.check_scalar_int(batch_size, "batch_size")
    s_q = _tensor.check_scalar_int(max_seqlen_q, "max_seqlen_q")
    s_k = _tensor.check_scalar_int(max_seqlen_k, "max_seqlen_k")
    h = _tensor.check_scalar_int(num_heads_q, "num_heads_q")
    h_k = _tensor.check_scalar_int(num_heads_kv, "num_heads_kv")
    d = _tensor.check_scalar_int(headdim, "headdim")
    d_v = d if headdim_v is None else _tensor.check_scalar_int(headdim_v, "headdim_v")
    s_new = _tensor.check_scalar_int(max_seqlen_k_new, "max_seqlen_k_new")
    _opt_int(page_size, "page_size")
    if b < 1:
        raise ValueError(f"batch_size: must be >= 1, got {b}")
    if h_k < 1 or h % h_k:
        raise ValueError(f"num_heads_kv: {h_k} must divide num_heads_q={h}")
    _check_head_dims(d, d_v, "headdim", "headdim_v")
    if s_new < 0:
        raise ValueError(f"max_seqlen_k_new: must be >= 0, got {s_new}")
    ref = cache_seqlens
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        cache_seqlens = np.full((b,), int(cache_seqlens), dtype=np.int32)
        ref = cache_seqlens
    cs, csa = _index(cache_seqlens, "cache_seqlens", lo=0)
    if cs is None:
        raise ValueError("cache_seqlens: required ([b] int32)")
    _, lpa = _index(cache_leftpad, "cache_leftpad", lo=0)
    # The planner checks lengths against a capacity; the longest sequence sets it.
    s_cache = max(s_k, int(cs.max()) + s_new if cs.size else 0)
    wl, wr = _tensor.window_pair(window_size)
    splits = _C.plan_kvcache(b, s_q, s_cache, h, h_k, d, d_v, _dtype_name(qkv_dtype, "qkv_dtype") or "bf16",
                             csa, lpa, s_new, bool(causal), wl, wr, 1.0 if has_softcap else 0.0,
                             _num_splits(num_splits))
    res = _tensor.empty(ref, (b,), "i32")
    a = np.asarray(splits, dtype=np.int32)
    res[:] = _tensor._torch().from_numpy(a) if _tensor.is_torch(res) else a
    return res
