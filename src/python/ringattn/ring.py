"""Ring attention across MPI ranks, with ring-flash-attention's function names.

Run under MPI (``mpirun -np 4 python3 script.py``); importing this module imports
mpi4py, which initialises MPI. Every function here is collective over ``group`` (an
mpi4py communicator, default ``MPI.COMM_WORLD``): all ranks of the group must call it
with the same options and their own shards.

    ring_flash_attn_func(q, k, v, ...)          contiguous shards   ("ring")
    zigzag_ring_flash_attn_func(q, k, v, ...)   zigzag shards
    stripe_flash_attn_func(q, k, v, ...)        striped shards      ("stripe")
    ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, ...)   (and zigzag_ /
    stripe_ variants): packed sequences, each rank holding its shard of every sequence
    decode(q, k_cache_shard, v_cache_shard, ...)  distributed decode over a sharded cache
    mla_decode(q, k_cache, block_table, cache_seqlens, ...)  distributed MLA decode over a
        paged latent cache sharded across the ranks (vLLM's decode context parallelism)
    shard(x, layout, rank, size) / unshard(shards, layout)  cut / reassemble tensors

Every forward takes ``ulysses_degree=U`` (keyword, default 1): the ranks form a U x R grid
(yunchang's USP, ``ulysses_degree x ring_degree``): an all-to-all inside each group of U
consecutive ranks turns sequence shards into shards of h / U heads, the ring runs over the
R = size / U ranks of the other axis, and a second all-to-all brings the result back. U
must divide size and h, and U and h_k must divide one another (K/V heads are replicated
when U > h_k). Shards then follow the hybrid layout: cut them with
``shard(x, layout, rank, size, ulysses_degree=U)``.

Shard layouts (token t of a sequence of length L on P ranks; chunk boundaries at
floor(c * L / parts), so any L >= P works; for L divisible by P (zigzag: 2P) this is
exactly ring-flash-attention's ``extract_local``):
    contiguous  rank r holds [r*L/P, (r+1)*L/P)
    zigzag      chunks c = [c*L/(2P), (c+1)*L/(2P)); rank r holds chunk r then 2P-1-r
    striped     rank r holds tokens r, r+P, r+2P, ... (ring-flash-attention's stripe)

Every forward and ``decode`` also take ``attention_chunk=C`` (keyword, default 0 = off;
FlashAttention-3's chunked local attention, Llama 4): a token sees only the keys of its
size-C chunk of the global sequence, combined with causal and windows; the ranks apply
the chunk at global positions and skip the blocks it hides, so the result is exactly the
single-process one.

Errors are collective: when the arguments are wrong on any rank, every rank raises
the same exception, its message prefixed with the first failing rank ("rank 2: ...").
Results are exact single-process attention over the whole sequence (docs/semantics.md
sections 1 and 5): fully masked rows give output 0 and LSE -inf; the LSE is the
natural log, fp32.
"""

import math

import numpy as np
from mpi4py import MPI

from . import _C, _tensor
from ._C import CommError, InvalidArgument, UnsupportedError

__all__ = [
    "ring_flash_attn_func",
    "zigzag_ring_flash_attn_func",
    "stripe_flash_attn_func",
    "ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_func",
    "stripe_flash_attn_varlen_func",
    "decode",
    "mla_decode",
    "shard",
    "unshard",
    "shard_cu_seqlens",
    "LAYOUTS",
]

# Accepted layout names -> the C++ layout name.
LAYOUTS = {
    "contiguous": "contiguous",
    "ring": "contiguous",
    "zigzag": "zigzag",
    "striped": "striped",
    "stripe": "striped",
}

_MODES = ("pass-kv", "pass-q")

# Exception classes a rank's error may be re-raised as on every rank (by name).
_ERROR_CLASSES = {
    c.__name__: c for c in (TypeError, ValueError, InvalidArgument, UnsupportedError, CommError)
}


def _layout(name):
    if not isinstance(name, str) or name not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {name!r} (expected one of {', '.join(LAYOUTS)})")
    return LAYOUTS[name]


def _comm(group):
    """The mpi4py communicator of `group` (None = COMM_WORLD)."""
    if group is None:
        return MPI.COMM_WORLD
    if not isinstance(group, MPI.Comm):
        raise TypeError(f"group: expected an mpi4py communicator (MPI.Comm), got {type(group).__name__}")
    if group == MPI.COMM_NULL:
        raise ValueError("group: MPI.COMM_NULL is not a communicator this rank belongs to")
    return group


def _collective(comm, fn):
    """Runs fn() on every rank and allgathers (error, result). When any rank raised, every
    rank raises the first failing rank's exception class with "rank R: message"; otherwise
    returns the list of every rank's result (rank order)."""
    err, info = None, None
    try:
        info = fn()
    except Exception as e:  # noqa: BLE001  (re-raised below on every rank)
        err = (type(e).__name__, str(e))
    gathered = comm.allgather((err, info))
    for r, (e, _) in enumerate(gathered):
        if e is not None:
            cls = _ERROR_CLASSES.get(e[0], RuntimeError)
            raise cls(f"rank {r}: {e[1]}")
    return [i for _, i in gathered]


def _raise_all(cls, rank, msg):
    raise cls(f"rank {rank}: {msg}")


def _contiguous(x):
    if _tensor.is_torch(x):
        return x.contiguous()
    return np.ascontiguousarray(x)


def _scale(softmax_scale, d):
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale: must be finite, got {softmax_scale!r}")
    return s


def _softcap(softcap):
    c = float(softcap)
    if not (c >= 0.0 and math.isfinite(c)):
        raise ValueError(f"softcap: must be finite and >= 0, got {softcap!r}")
    return c


def _attention_chunk(attention_chunk):
    """attention_chunk: 0 = off, C > 0 = chunked local attention (module docstring)."""
    c = _tensor.check_scalar_int(attention_chunk, "attention_chunk")
    if c < 0:
        raise ValueError(f"attention_chunk: must be >= 0 (0 = off), got {c}")
    return c


def _unsupported(dropout_p, alibi_slopes):
    if dropout_p != 0:
        raise ValueError(f"dropout_p: only 0.0 is supported (inference forward), got {dropout_p!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: ALiBi is not supported; pass None")


def _float_tensor(x, name, ndim, shape_text):
    typ = _tensor.type_of(x, name)
    if typ not in _tensor.FLOAT_TYPES:
        raise TypeError(f"{name}: dtype {typ} not supported (expected fp32, bf16 or fp16)")
    if _tensor.is_torch(x) and x.device.type != "cpu":
        raise ValueError(f"{name}: must be a CPU tensor, got device {x.device}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {shape_text}, got shape {list(x.shape)}")
    return typ


def _check_qkv(q, k, v, lead, shape_q, shape_kv):
    """Local checks shared by the dense and varlen forwards; returns q's element type."""
    _tensor.type_of(q, "q")
    _tensor.same_kind(q, {"k": k, "v": v})
    typ = _float_tensor(q, "q", lead + 2, shape_q)
    for name, x in (("k", k), ("v", v)):
        t = _float_tensor(x, name, lead + 2, shape_kv)
        if t != typ:
            raise TypeError(f"{name}: dtype {t} must equal q's {typ}")
    h, d = int(q.shape[-2]), int(q.shape[-1])
    h_k = int(k.shape[-2])
    if int(k.shape[-1]) != d:
        raise ValueError(f"k: head dim {int(k.shape[-1])} must equal q's {d}")
    if h_k < 1 or h % h_k:
        raise ValueError(f"k: heads h_k={h_k} must divide q's heads h={h}")
    if int(v.shape[-2]) != h_k:
        raise ValueError(f"v: heads {int(v.shape[-2])} must equal k's {h_k}")
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[:lead]) != tuple(q.shape[:lead]):
            raise ValueError(
                f"{name}: leading dims {list(x.shape[:lead])} must equal q's {list(q.shape[:lead])} "
                "(self-attention: q, k and v hold the same tokens)")
    return typ


def _check_mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode: expected 'pass-kv' or 'pass-q', got {mode!r}")


def _options(softmax_scale, d, causal, window_size, softcap, dropout_p, alibi_slopes):
    _unsupported(dropout_p, alibi_slopes)
    wl, wr = _tensor.window_pair(window_size)
    return _scale(softmax_scale, d), bool(causal), wl, wr, _softcap(softcap)


def _ulysses(ulysses_degree, size, q, k):
    """Checks of the Ulysses degree (local; the ranks agree on it afterwards)."""
    u = _tensor.check_scalar_int(ulysses_degree, "ulysses_degree")
    _C.check_ulysses_grid(size, u, int(q.shape[-2]), int(k.shape[-2]))
    return u


def _same_degree(infos, rank_of_u=-1):
    """Every rank must pass the same ulysses_degree (raised on all ranks otherwise)."""
    degrees = [info[rank_of_u] for info in infos]
    for r, u in enumerate(degrees):
        if u != degrees[0]:
            _raise_all(InvalidArgument, r, f"ulysses_degree: ranks pass different degrees {degrees}")
    return degrees[0]


def _dense(layout, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
           return_attn_probs, group, softcap, mode, ulysses_degree, sinks=None,
           attention_chunk=0):
    comm = _comm(group)
    size, rank = comm.Get_size(), comm.Get_rank()
    layout = _layout(layout)

    def local():
        _check_mode(mode)
        typ = _check_qkv(q, k, v, 2, "[b, s_local, h, d]", "[b, s_local, h_k, d]")
        _options(softmax_scale, int(q.shape[-1]), causal, window_size, softcap,
                 dropout_p, alibi_slopes)
        _tensor.sinks_arg(sinks, None, int(q.shape[2]), q)
        _attention_chunk(attention_chunk)
        return typ, int(q.shape[1]), _ulysses(ulysses_degree, size, q, k)

    infos = _collective(comm, local)
    typ = infos[rank][0]
    u = _same_degree(infos)
    lengths = [n for _, n, _ in infos]
    s = sum(lengths)
    # Every rank checks every rank's length against the layout: the same verdict everywhere.
    if s < size:
        _raise_all(InvalidArgument, 0, f"q: global length {s} (sum of the local lengths {lengths}) "
                   f"is smaller than the number of ranks {size} (every rank needs a token)")
    for r, n in enumerate(lengths):
        want = _C.shard_length(layout, s, size, r, u)
        if n != want:
            grid = f" with ulysses_degree {u}" if u > 1 else ""
            _raise_all(InvalidArgument, r, f"q: local length {n} is not the {layout} shard length "
                       f"{want} of a {s}-token sequence on {size} ranks{grid} (local lengths "
                       f"{lengths}; cut shards with ringattn.ring.shard)")
    scale, causal_b, wl, wr, cap = _options(softmax_scale, int(q.shape[-1]), causal, window_size,
                                            softcap, dropout_p, alibi_slopes)
    qc, kc, vc = _contiguous(q), _contiguous(k), _contiguous(v)
    b, n, h = int(q.shape[0]), int(q.shape[1]), int(q.shape[2])
    d_v = int(v.shape[-1])
    sink, sink_arg = _tensor.sinks_arg(sinks, None, h, q)
    out = _tensor.empty(q, (b, n, h, d_v), "fp32")
    lse = _tensor.empty(q, (b, h, n), "fp32") if return_attn_probs else None
    arg = _tensor.arg
    _C.ring_forward(comm.py2f(), arg(qc, "q"), arg(kc, "k"), arg(vc, "v"), arg(out, "out", types=("fp32",)),
                    None if lse is None else arg(lse, "softmax_lse", types=("fp32",)), None, s,
                    layout, mode, scale, causal_b, wl, wr, cap, 0, u, sink_arg,
                    _attention_chunk(attention_chunk))
    del sink
    out = _tensor.to_type(out, typ)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                         return_attn_probs=False, group=None, *, softcap=0.0, mode="pass-kv",
                         ulysses_degree=1, sinks=None, attention_chunk=0):
    """Ring attention over contiguous shards (ring-flash-attention's ``ring_flash_attn_func``).

    q [b, s_local, h, d], k [b, s_local, h_k, d], v [b, s_local, h_k, d_v]: this rank's
    shard, rank r holding tokens [r*S/P, (r+1)*S/P) of the global sequence of S = sum of
    the local lengths. Returns out [b, s_local, h, d_v] in q's dtype and kind (torch or
    numpy), or (out, softmax_lse [b, h, s_local] fp32 natural log, None) with
    return_attn_probs. causal / window_size=(left, right) / softcap apply to the global
    sequence (self-attention, docs/semantics.md section 1). mode "pass-kv" (K/V travel)
    or "pass-q" (queries travel, K/V stay): same result. ulysses_degree=U > 1 runs the
    Ulysses x ring grid (module docstring; shards from shard(..., ulysses_degree=U)). sinks:
    optional [h] fp32 attention-sink logits, applied once after the ring's last merge (the
    LSE excludes them; flash_attn_interface docstring). attention_chunk=C > 0: chunked
    local attention (FA3, Llama 4) over the global sequence: token i sees only keys in
    [C floor(i / C), C floor(i / C) + C), with causal / windows. dropout_p must be 0 and
    alibi_slopes None (ValueError otherwise); deterministic is accepted and ignored (the
    forward is deterministic).
    """
    return _dense("contiguous", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, return_attn_probs, group, softcap, mode, ulysses_degree, sinks,
                  attention_chunk)


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None, *, softcap=0.0,
                                mode="pass-kv", ulysses_degree=1, sinks=None,
                                attention_chunk=0):
    """Ring attention over zigzag shards: the sequence cut in 2P chunks, rank r holding
    chunk r followed by chunk 2P-1-r (equal causal work per rank). Otherwise as
    ring_flash_attn_func."""
    return _dense("zigzag", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, return_attn_probs, group, softcap, mode, ulysses_degree, sinks,
                  attention_chunk)


def stripe_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, group=None, *, softcap=0.0, mode="pass-kv",
                         ulysses_degree=1, sinks=None, attention_chunk=0):
    """Ring attention over striped shards: rank r holds tokens r, r+P, r+2P, ... (the
    order of ring-flash-attention's stripe ``extract_local``). Unlike the original,
    causal=False and windows are supported too. Otherwise as ring_flash_attn_func."""
    return _dense("striped", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, return_attn_probs, group, softcap, mode, ulysses_degree, sinks,
                  attention_chunk)


def _varlen(layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
            window_size, alibi_slopes, return_attn_probs, group, softcap, mode, ulysses_degree,
            sinks=None, attention_chunk=0):
    comm = _comm(group)
    size, rank = comm.Get_size(), comm.Get_rank()
    layout = _layout(layout)

    def local():
        _check_mode(mode)
        typ = _check_qkv(q, k, v, 1, "[t_local, h, d]", "[t_local, h_k, d]")
        _options(softmax_scale, int(q.shape[-1]), causal, window_size, softcap, dropout_p,
                 alibi_slopes)
        _tensor.sinks_arg(sinks, None, int(q.shape[1]), q)
        _attention_chunk(attention_chunk)
        cu, _ = _tensor.index_array(cu_seqlens, "cu_seqlens", ndim=1, shape_text="[b + 1]", lo=0)
        if cu.shape[0] < 2:
            raise ValueError(f"cu_seqlens: needs at least 2 entries [b + 1], got {cu.shape[0]}")
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens: first entry must be 0, got {int(cu[0])}")
        lens = np.diff(cu.astype(np.int64))
        if (lens < 0).any():
            raise ValueError(f"cu_seqlens: must be non-decreasing, got {cu.tolist()}")
        if int(cu[-1]) != int(q.shape[0]):
            raise ValueError(f"cu_seqlens: last entry {int(cu[-1])} must equal q's local token "
                             f"count {int(q.shape[0])}")
        m = _tensor.check_scalar_int(max_seqlen, "max_seqlen")
        if lens.size and m < int(lens.max()):
            raise ValueError(f"max_seqlen: {m} is smaller than the longest local sequence "
                             f"{int(lens.max())}")
        return typ, lens.tolist(), _ulysses(ulysses_degree, size, q, k)

    infos = _collective(comm, local)
    typ = infos[rank][0]
    u = _same_degree(infos)
    local_lens = [l for _, l, _ in infos]
    nseq = {len(l) for l in local_lens}
    if len(nseq) != 1:
        counts = [len(l) for l in local_lens]
        _raise_all(InvalidArgument, int(np.argmax(np.array(counts) != counts[0])),
                   f"cu_seqlens: ranks hold different numbers of sequences {counts}")
    global_lens = np.sum(np.array(local_lens, dtype=np.int64).reshape(size, -1), axis=0)
    for r, lens in enumerate(local_lens):
        for i, (n, total) in enumerate(zip(lens, global_lens.tolist())):
            want = _C.shard_length(layout, total, size, r, u)
            if n != want:
                _raise_all(InvalidArgument, r,
                           f"cu_seqlens: sequence {i} has {n} local tokens, the {layout} shard of "
                           f"its {total} tokens on {size} ranks has {want} (cut shards with "
                           "ringattn.ring.shard and ringattn.ring.shard_cu_seqlens)")
    cu_global = np.zeros(global_lens.size + 1, dtype=np.int64)
    np.cumsum(global_lens, out=cu_global[1:])
    if cu_global[-1] >= 2**31:
        _raise_all(InvalidArgument, 0, f"cu_seqlens: {int(cu_global[-1])} tokens in all exceed int32")
    cu_keep, cu_arg = _tensor.index_array(cu_global.astype(np.int32), "cu_seqlens")
    scale, causal_b, wl, wr, cap = _options(softmax_scale, int(q.shape[-1]), causal, window_size,
                                            softcap, dropout_p, alibi_slopes)
    qc, kc, vc = _contiguous(q), _contiguous(k), _contiguous(v)
    t, h = int(q.shape[0]), int(q.shape[1])
    d_v = int(v.shape[-1])
    sink, sink_arg = _tensor.sinks_arg(sinks, None, h, q)
    out = _tensor.empty(q, (t, h, d_v), "fp32")
    lse = _tensor.empty(q, (h, t), "fp32") if return_attn_probs else None
    arg = _tensor.arg
    _C.ring_forward(comm.py2f(), arg(qc, "q"), arg(kc, "k"), arg(vc, "v"), arg(out, "out", types=("fp32",)),
                    None if lse is None else arg(lse, "softmax_lse", types=("fp32",)), cu_arg, 0,
                    layout, mode, scale, causal_b, wl, wr, cap, 0, u, sink_arg,
                    _attention_chunk(attention_chunk))
    del sink
    del cu_keep
    out = _tensor.to_type(out, typ)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None, *, softcap=0.0, mode="pass-kv", ulysses_degree=1,
                                sinks=None, attention_chunk=0):
    """Varlen ring attention (ring-flash-attention's ``ring_flash_attn_varlen_func``).

    Packed sequences; as in ring-flash-attention every rank holds its contiguous shard of
    EVERY sequence, packed back to back: q [t_local, h, d], k [t_local, h_k, d], v
    [t_local, h_k, d_v], and ``cu_seqlens`` [b + 1] are this rank's LOCAL offsets (the
    global length of sequence i is the sum over ranks of its local lengths; the shard of
    each sequence must be the layout's: use shard_cu_seqlens / shard(..., cu_seqlens=)).
    max_seqlen: the longest local sequence (checked to be >= it, otherwise unused).
    Sequences shorter than the number of ranks are fine (some ranks hold none of them).
    Returns out [t_local, h, d_v] in q's dtype, or (out, softmax_lse [h, t_local] fp32,
    None) with return_attn_probs (the unpadded LSE layout of FlashAttention >= 2.6 / FA3).
    """
    return _varlen("contiguous", q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                   causal, window_size, alibi_slopes, return_attn_probs, group, softcap, mode,
                   ulysses_degree, sinks, attention_chunk)


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                       softmax_scale=None, causal=False, window_size=(-1, -1),
                                       alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None, *, softcap=0.0,
                                       mode="pass-kv", ulysses_degree=1, sinks=None,
                                       attention_chunk=0):
    """As ring_flash_attn_varlen_func with each sequence cut in zigzag order."""
    return _varlen("zigzag", q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                   causal, window_size, alibi_slopes, return_attn_probs, group, softcap, mode,
                   ulysses_degree, sinks, attention_chunk)


def stripe_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                  softmax_scale=None, causal=False, window_size=(-1, -1),
                                  alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None, *, softcap=0.0,
                                  mode="pass-kv", ulysses_degree=1, sinks=None,
                                  attention_chunk=0):
    """As ring_flash_attn_varlen_func with each sequence striped over the ranks."""
    return _varlen("striped", q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                   causal, window_size, alibi_slopes, return_attn_probs, group, softcap, mode,
                   ulysses_degree, sinks, attention_chunk)


def decode(q, k_cache_shard, v_cache_shard, softmax_scale=None, causal=False,
           window_size=(-1, -1), softcap=0.0, root=None, group=None, *, sinks=None,
           attention_chunk=0):
    """Distributed decode (tree attention) over a KV cache sharded across the ranks.

    q [b, s_q, h, d]: the new query rows, identical on every rank. k_cache_shard
    [b, n_r, h_k, d], v_cache_shard [b, n_r, h_k, d_v]: rank r's contiguous slice of every
    sequence's cache (tokens [r*S/P, (r+1)*S/P) of a cache of S = sum of n_r tokens, S >= P).
    The mask is docs/semantics.md section 1 over the whole cache (bottom-right: query row
    i sits at position S - s_q + i). Each rank attends over its keys and an allreduce whose
    operation is the LSE merge (section 5) combines the partial results.
    Returns (out [b, s_q, h, d_v] in q's dtype, lse [b, h, s_q] fp32 natural log) on every
    rank, or with root=R only on rank R ((None, None) on the others). sinks: optional
    [h] fp32 attention-sink logits, applied once after the reduction (the LSE excludes them).
    attention_chunk=C > 0: chunked local attention at cache positions (query row i sees
    only the keys of the size-C chunk holding position S - s_q + i).
    """
    comm = _comm(group)
    size, rank = comm.Get_size(), comm.Get_rank()

    def local():
        _tensor.type_of(q, "q")
        _tensor.same_kind(q, {"k_cache_shard": k_cache_shard, "v_cache_shard": v_cache_shard})
        typ = _float_tensor(q, "q", 4, "[b, s_q, h, d]")
        for name, x, text in (("k_cache_shard", k_cache_shard, "[b, n_r, h_k, d]"),
                              ("v_cache_shard", v_cache_shard, "[b, n_r, h_k, d_v]")):
            t = _float_tensor(x, name, 4, text)
            if t != typ:
                raise TypeError(f"{name}: dtype {t} must equal q's {typ}")
        b, _, h, d = (int(x) for x in q.shape)
        h_k = int(k_cache_shard.shape[2])
        if int(k_cache_shard.shape[0]) != b or int(v_cache_shard.shape[0]) != b:
            raise ValueError(f"k_cache_shard, v_cache_shard: batch {int(k_cache_shard.shape[0])}, "
                             f"{int(v_cache_shard.shape[0])} must equal q's {b}")
        if int(k_cache_shard.shape[3]) != d:
            raise ValueError(f"k_cache_shard: head dim {int(k_cache_shard.shape[3])} must equal q's {d}")
        if h_k < 1 or h % h_k:
            raise ValueError(f"k_cache_shard: heads h_k={h_k} must divide q's heads h={h}")
        if tuple(v_cache_shard.shape[1:3]) != tuple(k_cache_shard.shape[1:3]):
            raise ValueError(f"v_cache_shard: shape {list(v_cache_shard.shape)} must match "
                             f"k_cache_shard's {list(k_cache_shard.shape)} in dims 1 and 2")
        _scale(softmax_scale, d)
        _softcap(softcap)
        _tensor.window_pair(window_size)
        _tensor.sinks_arg(sinks, None, h, q)
        _attention_chunk(attention_chunk)
        if root is not None:
            rt = _tensor.check_scalar_int(root, "root")
            if not 0 <= rt < size:
                raise ValueError(f"root: {rt} must lie in [0, {size})")
        return typ, int(k_cache_shard.shape[1]), root

    infos = _collective(comm, local)
    typ = infos[rank][0]
    lengths = [n for _, n, _ in infos]
    roots = [r for _, _, r in infos]
    if any(r != roots[0] for r in roots):
        _raise_all(InvalidArgument, next(i for i, r in enumerate(roots) if r != roots[0]),
                   f"root: ranks disagree on root {roots}")
    s_cache = sum(lengths)
    if s_cache < size:
        _raise_all(InvalidArgument, 0, f"k_cache_shard: cache length {s_cache} (sum of the local "
                   f"lengths {lengths}) is smaller than the number of ranks {size}")
    for r, n in enumerate(lengths):
        want = _C.decode_shard_length(s_cache, size, r)
        if n != want:
            _raise_all(InvalidArgument, r, f"k_cache_shard: local cache length {n} is not the "
                       f"contiguous shard length {want} of a {s_cache}-token cache on {size} ranks "
                       f"(local lengths {lengths}; cut with ringattn.ring.shard)")
    wl, wr = _tensor.window_pair(window_size)
    b, s_q, h, d = (int(x) for x in q.shape)
    d_v = int(v_cache_shard.shape[3])
    rt = -1 if root is None else int(root)
    writes = rt < 0 or rt == rank
    out = _tensor.empty(q, (b, s_q, h, d_v), "fp32") if writes else None
    lse = _tensor.empty(q, (b, h, s_q), "fp32") if writes else None
    qc, kc, vc = _contiguous(q), _contiguous(k_cache_shard), _contiguous(v_cache_shard)
    sink, sink_arg = _tensor.sinks_arg(sinks, None, h, q)
    arg = _tensor.arg
    _C.distributed_decode(comm.py2f(), arg(qc, "q"), arg(kc, "k_cache_shard"), arg(vc, "v_cache_shard"),
                          None if out is None else arg(out, "out", types=("fp32",)),
                          None if lse is None else arg(lse, "lse", types=("fp32",)), s_cache,
                          _scale(softmax_scale, d), bool(causal), wl, wr, _softcap(softcap), rt,
                          sink_arg, _attention_chunk(attention_chunk))
    del sink
    if not writes:
        return None, None
    return _tensor.to_type(out, typ), lse


def mla_decode(q, k_cache, block_table, cache_seqlens, softmax_scale=None, causal=False,
               root=None, group=None, *, attn_sink=None):
    """Distributed absorbed-MLA decode over a paged latent cache sharded across the ranks
    (docs/mla.md, "Across ranks"; sessions that keep the cache: ringattn.session.MlaSession).

    q [b, s_q, h_q, 576] fp32 / bf16: the query rows, identical on every rank. This rank's
    paged shard, FlashMLA's layout: k_cache [num_blocks, page_block_size, 1, 576] (fp32 /
    bf16), block_table [b, max_blocks] int, cache_seqlens [b] int: rank r holds tokens
    [r*L/P, (r+1)*L/P) of each sequence of L tokens (L = the sum of the ranks'
    cache_seqlens; with causal, L includes the s_q query tokens, as in FlashMLA).
    causal: query row s sees positions <= L - s_q + s (multi-token prediction; every rank
    but the last must hold only tokens before the first query position). attn_sink [h_q]
    fp32: applied once, after the reduction. softmax_scale defaults to 1 / sqrt(576).
    Returns (out [b, s_q, h_q, 512] in q's dtype, lse [b, h_q, s_q] fp32 natural log, -inf
    for a row that sees nothing) on every rank, or with root=R on rank R only ((None,
    None) elsewhere).
    """
    comm = _comm(group)
    size, rank = comm.Get_size(), comm.Get_rank()

    def local():
        _tensor.same_kind(q, {"k_cache": k_cache, "block_table": block_table,
                              "cache_seqlens": cache_seqlens, "attn_sink": attn_sink})
        typ = _float_tensor(q, "q", 4, "[b, s_q, h_q, 576]")
        ktyp = _float_tensor(k_cache, "k_cache", 4, "[num_blocks, page_block_size, 1, 576]")
        if int(q.shape[3]) != 576 or int(k_cache.shape[3]) != 576:
            raise ValueError(f"q, k_cache: last dim must be 576 (512 latent + 64 rope), got "
                             f"{int(q.shape[3])} and {int(k_cache.shape[3])}")
        b, h = int(q.shape[0]), int(q.shape[2])
        bt, _ = _tensor.index_array(block_table, "block_table", ndim=2, shape_text="[b, max_blocks]")
        sl, _ = _tensor.index_array(cache_seqlens, "cache_seqlens", ndim=1, shape_text="[b]", lo=0)
        if bt.shape[0] != b or sl.shape[0] != b:
            raise ValueError(f"block_table, cache_seqlens: batch {bt.shape[0]}, {sl.shape[0]} must "
                             f"equal q's {b}")
        if softmax_scale is not None:
            _scale(softmax_scale, 576)
        _tensor.sinks_arg(attn_sink, None, h, q)
        if root is not None:
            rt = _tensor.check_scalar_int(root, "root")
            if not 0 <= rt < size:
                raise ValueError(f"root: {rt} must lie in [0, {size})")
        return typ, ktyp, [int(x) for x in np.asarray(sl).reshape(-1)], root

    infos = _collective(comm, local)
    typ = infos[rank][0]
    roots = [i[3] for i in infos]
    if any(r != roots[0] for r in roots):
        _raise_all(InvalidArgument, next(i for i, r in enumerate(roots) if r != roots[0]),
                   f"root: ranks disagree on root {roots}")
    local_lens = [i[2] for i in infos]
    if any(len(x) != len(local_lens[0]) for x in local_lens):
        _raise_all(InvalidArgument, 0, f"cache_seqlens: ranks disagree on the batch "
                   f"{[len(x) for x in local_lens]}")
    global_lens = [int(sum(col)) for col in zip(*local_lens)]
    b, s_q, h = int(q.shape[0]), int(q.shape[1]), int(q.shape[2])
    rt = -1 if root is None else int(root)
    writes = rt < 0 or rt == rank
    out = _tensor.empty(q, (b, s_q, h, 512), "fp32") if writes else None
    lse = _tensor.empty(q, (b, h, s_q), "fp32") if writes else None
    bt, bt_arg = _tensor.index_array(block_table, "block_table", ndim=2, shape_text="[b, max_blocks]")
    sl, sl_arg = _tensor.index_array(cache_seqlens, "cache_seqlens", ndim=1, shape_text="[b]", lo=0)
    sink, sink_arg = _tensor.sinks_arg(attn_sink, None, h, q)
    qc, kc = _contiguous(q), _contiguous(k_cache)
    arg = _tensor.arg
    _C.mla_decode_distributed(comm.py2f(), arg(qc, "q", types=("fp32", "bf16")),
                              arg(kc, "k_cache", types=("fp32", "bf16")),
                              None if out is None else arg(out, "out", types=("fp32",)),
                              None if lse is None else arg(lse, "lse", types=("fp32",)), bt_arg,
                              sl_arg, global_lens, sink_arg,
                              0.0 if softmax_scale is None else _scale(softmax_scale, 576),
                              bool(causal), rt)
    del sink, bt, sl
    if not writes:
        return None, None
    return _tensor.to_type(out, typ), lse


# ---- shard / unshard ----


def _positions(layout, length, size, rank, ulysses=1):
    return _C.shard_positions(layout, int(length), int(size), int(rank), int(ulysses))


def _take(x, index, dim):
    if _tensor.is_torch(x):
        t = _tensor._torch()
        return x.index_select(dim, t.from_numpy(np.ascontiguousarray(index, dtype=np.int64)))
    return np.take(x, index, axis=dim)


def _cat(parts, dim, ref):
    if _tensor.is_torch(ref):
        return _tensor._torch().cat(parts, dim=dim)
    return np.concatenate(parts, axis=dim)


def _check_rank(rank, size):
    rank = _tensor.check_scalar_int(rank, "rank")
    size = _tensor.check_scalar_int(size, "size")
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank: {rank} must lie in [0, size) with size = {size}")
    return rank, size


def _dim(x, dim):
    nd = len(x.shape)
    dim = _tensor.check_scalar_int(dim, "dim")
    if not -nd <= dim < nd:
        raise ValueError(f"dim: {dim} out of range for a {nd}-dim tensor")
    return dim % nd


def _cu_list(cu_seqlens):
    cu, _ = _tensor.index_array(cu_seqlens, "cu_seqlens", ndim=1, shape_text="[b + 1]", lo=0)
    cu = cu.astype(np.int64)
    if cu.size < 1 or cu[0] != 0 or (np.diff(cu) < 0).any():
        raise ValueError(f"cu_seqlens: must start at 0 and be non-decreasing, got {cu.tolist()}")
    return cu


def _global_index(layout, size, rank, length=None, cu=None, ulysses=1):
    """Global token indices of rank `rank`'s shard, in its local order."""
    if cu is None:
        return _positions(layout, length, size, rank, ulysses)
    parts = [cu[i] + _positions(layout, cu[i + 1] - cu[i], size, rank, ulysses)
             for i in range(cu.size - 1)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shard(x, layout, rank, size, dim=1, cu_seqlens=None, ulysses_degree=1):
    """Rank `rank`'s shard (of `size` ranks) of the full tensor `x` along `dim`, in the
    layout's local token order ("contiguous"/"ring", "zigzag", "striped"/"stripe"); a copy,
    same kind (torch/numpy) and dtype. With cu_seqlens [b + 1] (global offsets), `x` is a
    packed varlen tensor (tokens along `dim`, usually 0) and every sequence is cut
    separately, the rank's pieces packed back to back (local offsets: shard_cu_seqlens).
    Use dim=2 for an LSE [b, h, s] and dim=-1 for a varlen LSE [h, total]. With
    ulysses_degree U > 1: the Ulysses x ring layout of the ring functions' ulysses_degree
    (ring shard g = rank // U of the layout over size / U ranks, cut into U contiguous
    pieces, piece rank % U)."""
    layout = _layout(layout)
    rank, size = _check_rank(rank, size)
    dim = _dim(x, dim)
    cu = None if cu_seqlens is None else _cu_list(cu_seqlens)
    if cu is not None and int(cu[-1]) != int(x.shape[dim]):
        raise ValueError(f"cu_seqlens: last entry {int(cu[-1])} must equal x's length "
                         f"{int(x.shape[dim])} along dim {dim}")
    u = _tensor.check_scalar_int(ulysses_degree, "ulysses_degree")
    return _take(x, _global_index(layout, size, rank, int(x.shape[dim]), cu, u), dim)


def shard_cu_seqlens(cu_seqlens, layout, rank, size, ulysses_degree=1):
    """Local cu_seqlens (int32 numpy [b + 1]) of rank `rank` for packed sequences with global
    offsets `cu_seqlens`: what ring_flash_attn_varlen_func and friends take."""
    layout = _layout(layout)
    rank, size = _check_rank(rank, size)
    cu = _cu_list(cu_seqlens)
    u = _tensor.check_scalar_int(ulysses_degree, "ulysses_degree")
    lens = [_C.shard_length(layout, int(cu[i + 1] - cu[i]), size, rank, u) for i in range(cu.size - 1)]
    out = np.zeros(cu.size, dtype=np.int32)
    np.cumsum(lens, out=out[1:])
    return out


def unshard(shards, layout, dim=1, cu_seqlens=None, ulysses_degree=1):
    """Inverse of shard: `shards` lists every rank's shard (rank order, e.g. from
    comm.allgather); returns the full tensor in token order. With cu_seqlens [b + 1]
    (GLOBAL offsets), the shards are packed varlen shards."""
    layout = _layout(layout)
    shards = list(shards)
    if not shards:
        raise ValueError("shards: expected one shard per rank, got none")
    size = len(shards)
    ref = shards[0]
    _tensor.type_of(ref, "shards[0]")
    _tensor.same_kind(ref, {f"shards[{i}]": s for i, s in enumerate(shards)})
    dim = _dim(ref, dim)
    total = sum(int(s.shape[dim]) for s in shards)
    cu = None if cu_seqlens is None else _cu_list(cu_seqlens)
    if cu is not None and int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens: last entry {int(cu[-1])} must equal the shards' total "
                         f"length {total}")
    u = _tensor.check_scalar_int(ulysses_degree, "ulysses_degree")
    index = [_global_index(layout, size, r, total, cu, u) for r in range(size)]
    for r, (s, ix) in enumerate(zip(shards, index)):
        if int(s.shape[dim]) != ix.size:
            raise ValueError(f"shards[{r}]: length {int(s.shape[dim])} along dim {dim} is not the "
                             f"{layout} shard length {ix.size} of {total} tokens on {size} ranks")
    # Row j of the concatenation holds global token order[j]; invert that permutation.
    order = np.concatenate(index)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=order.dtype)
    return _take(_cat(shards, dim, ref), inverse, dim)
