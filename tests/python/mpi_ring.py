"""ringattn.ring under MPI: run as `mpirun -np N python3 tests/python/mpi_ring.py` (N = 1..4).

Every rank builds the same full q, k, v (same seed), cuts its shard with ringattn.ring.shard,
runs the ring and compares its part of the result with
  - a float64 NumPy reference over the whole sequence (docs/semantics.md sections 1 and 5),
  - the single-process kernel ringattn.flash_attn_interface.flash_attn_func (fp32 and bf16).
Covers every layout, causal or not, windows, softcap, GQA, fp32/bf16/fp16, torch and numpy,
pass-KV and pass-Q, varlen (empty and shorter-than-P sequences), distributed decode (with and
without root), shard/unshard round trips, and collective errors: a bad argument on ONE rank
must make EVERY rank raise (the test catches it, checks the message and continues).

Exit status: 0 when every check passed on every rank, 1 otherwise; rank 0 prints a summary.
An unexpected exception on one rank aborts the whole job (MPI_Abort) instead of hanging.
"""

import itertools
import math
import sys
import time
import traceback

import numpy as np
import torch

import ringattn
from ringattn import ring
from checks_mpi import COMM, RANK, SIZE, check, f64, summary

try:
    from ringattn.flash_attn_interface import flash_attn_func
except (ImportError, AttributeError):  # the single-process API is optional here
    flash_attn_func = None


RING_FUNCS = {
    "contiguous": ring.ring_flash_attn_func,
    "zigzag": ring.zigzag_ring_flash_attn_func,
    "striped": ring.stripe_flash_attn_func,
}
VARLEN_FUNCS = {
    "contiguous": ring.ring_flash_attn_varlen_func,
    "zigzag": ring.zigzag_ring_flash_attn_varlen_func,
    "striped": ring.stripe_flash_attn_varlen_func,
}


def max_err(a, b):
    """max |a - b| treating equal infinities (the -inf LSE of empty rows) as equal."""
    a, b = f64(a), f64(b)
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    if (np.isinf(a) != np.isinf(b)).any() or np.isnan(a).any() or np.isnan(b).any():
        return math.inf
    d = np.where(same_inf, 0.0, np.abs(np.where(same_inf, 0.0, a) - np.where(same_inf, 0.0, b)))
    return float(d.max()) if d.size else 0.0


def reference(q, k, v, scale, causal, window, softcap, sinks=None, chunk=0):
    """float64 attention of one sequence: q [s_q, h, d], k/v [s_k, h_k, *]; bottom-right mask
    (docs/semantics.md section 1). Returns out [s_q, h, d_v], lse [h, s_q] (natural log);
    rows that see no key give 0 / -inf."""
    q, k, v = f64(q), f64(k), f64(v)
    s_q, h, _ = q.shape
    s_k, h_k, _ = k.shape
    if s_q == 0 or s_k == 0:
        return np.zeros((s_q, h, v.shape[-1])), np.full((h, s_q), -np.inf)
    g = h // h_k
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    sc = np.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        sc = softcap * np.tanh(sc / softcap)
    i = np.arange(s_q)[:, None] + (s_k - s_q)
    j = np.arange(s_k)[None, :]
    wl, wr = window
    if causal:
        wr = 0
    vis = np.ones((s_q, s_k), dtype=bool)
    if wr >= 0:
        vis &= j <= i + wr
    if wl >= 0:
        vis &= j >= i - wl
    if chunk > 0:  # attention_chunk: key j in the chunk of the row's diagonal key i
        vis &= (j // chunk) == (i // chunk)
    sc = np.where(vis[None], sc, -np.inf)
    m = sc.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(sc - m)
    den = p.sum(axis=-1, keepdims=True)
    # Attention sink: an extra logit per head in the denominator only (LSE excludes it).
    den_o = np.where(den > 0, den, 1.0)
    if sinks is not None:
        with np.errstate(over="ignore"):
            den_o = den_o + np.exp(np.asarray(sinks, np.float64)[:, None, None] - m)
    out = np.einsum("hij,jhd->ihd", p / den_o, v)
    with np.errstate(divide="ignore"):
        lse = np.log(den[..., 0]) + m[..., 0]
    return out, np.where(den[..., 0] > 0, lse, -np.inf)


def reference_batch(q, k, v, scale, causal, window, softcap, sinks=None, chunk=0):
    outs, lses = zip(*(reference(q[i], k[i], v[i], scale, causal, window, softcap, sinks, chunk)
                       for i in range(q.shape[0])))
    return np.stack(outs), np.stack(lses)


def randn(shape, seed, dtype, kind):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if kind == "numpy":
        return x.astype(dtype)
    return torch.from_numpy(x).to(dtype)


def tol(dtype):
    return {np.float32: 2e-5, torch.float32: 2e-5, np.float16: 4e-3, torch.float16: 4e-3,
            torch.bfloat16: 2e-2}[dtype]


# ---- dense ring over every layout ----


def test_dense():
    b, s, h, h_k, d = 2, 23 + 4 * SIZE, 4, 2, 16  # s not a multiple of P (or 2P) for P > 1
    windows = [(-1, -1), (5, 0), (4, 3)]
    grid = itertools.product(RING_FUNCS, (False, True), windows, (0.0, 15.0))
    for n, (layout, causal, window, softcap) in enumerate(grid):
        kind, dtype = ("torch", torch.float32) if n % 2 else ("numpy", np.float32)
        mode = "pass-q" if n % 3 == 0 else "pass-kv"
        d_v = 24 if n % 4 == 1 else d
        q = randn((b, s, h, d), 1, dtype, kind)
        k = randn((b, s, h_k, d), 2, dtype, kind)
        v = randn((b, s, h_k, d_v), 3, dtype, kind)
        scale = 0.3
        what = f"dense {layout} causal={causal} window={window} softcap={softcap} {kind} {mode} d_v={d_v}"
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE) for x in (q, k, v))
        out, lse, none = RING_FUNCS[layout](ql, kl, vl, 0.0, scale, causal, window, None, False,
                                            True, None, softcap=softcap, mode=mode)
        ro, rl = reference_batch(q, k, v, scale, causal, window, softcap)
        check(none is None, f"{what}: third return value must be None")
        check(type(out) is type(ql) and out.dtype == ql.dtype, f"{what}: out kind/dtype {type(out)} {out.dtype}")
        check(tuple(out.shape) == (b, ql.shape[1], h, d_v), f"{what}: out shape {tuple(out.shape)}")
        check(tuple(lse.shape) == (b, h, ql.shape[1]), f"{what}: lse shape {tuple(lse.shape)}")
        e_o = max_err(out, ring.shard(ro, layout, RANK, SIZE))
        e_l = max_err(lse, ring.shard(rl, layout, RANK, SIZE, dim=2))
        check(e_o <= tol(dtype) and e_l <= 2e-4, f"{what}: out err {e_o:.3g} lse err {e_l:.3g}")
        if flash_attn_func is not None:
            fo = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                 softcap=softcap)
            e_f = max_err(out, ring.shard(fo, layout, RANK, SIZE))
            check(e_f <= tol(dtype), f"{what}: vs flash_attn_func err {e_f:.3g}")


def test_low_precision():
    b, s, h, h_k, d = 1, 17 + 3 * SIZE, 6, 2, 32
    for layout, (kind, dtype), causal in itertools.product(
            RING_FUNCS, (("torch", torch.bfloat16), ("torch", torch.float16), ("numpy", np.float16)),
            (False, True)):
        q = randn((b, s, h, d), 11, dtype, kind)
        k = randn((b, s, h_k, d), 12, dtype, kind)
        v = randn((b, s, h_k, d), 13, dtype, kind)
        what = f"{dtype} {layout} causal={causal}"
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE) for x in (q, k, v))
        out = RING_FUNCS[layout](ql, kl, vl, causal=causal, window_size=(9, -1))
        check(out.dtype == ql.dtype and type(out) is type(ql), f"{what}: out dtype {out.dtype}")
        ro, _ = reference_batch(q, k, v, 1 / math.sqrt(d), causal, (9, -1), 0.0)
        e = max_err(out, ring.shard(ro, layout, RANK, SIZE))
        check(e <= tol(dtype), f"{what}: out err {e:.3g}")
        if flash_attn_func is not None:
            fo = flash_attn_func(q, k, v, causal=causal, window_size=(9, -1))
            e_f = max_err(out, ring.shard(fo, layout, RANK, SIZE))
            check(e_f <= tol(dtype), f"{what}: vs flash_attn_func err {e_f:.3g}")


def test_divisible_matches_extract_local():
    """For lengths divisible by 2P our shards are ring-flash-attention's extract_local."""
    s = 4 * SIZE
    x = torch.arange(s).reshape(1, s)
    chunks = x.chunk(2 * SIZE, dim=1)
    want = {
        "ring": x.chunk(SIZE, dim=1)[RANK],
        "zigzag": torch.cat([chunks[RANK], chunks[2 * SIZE - 1 - RANK]], dim=1),
        "stripe": torch.stack(x.split(SIZE, dim=1), dim=1).transpose(1, 2)[:, RANK],
    }
    for layout, w in want.items():
        got = ring.shard(x, layout, RANK, SIZE)
        check(torch.equal(got, w), f"extract_local order {layout}: {got.tolist()} != {w.tolist()}")


# ---- varlen ----


def test_varlen():
    h, h_k, d = 4, 1, 16
    lens = [5, 0, 31 + SIZE, 1, 2 * SIZE + 3]  # empty and shorter-than-P sequences
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total = int(cu[-1])
    for n, (layout, causal, window, softcap) in enumerate(itertools.product(
            VARLEN_FUNCS, (False, True), ((-1, -1), (6, 2)), (0.0, 10.0))):
        kind, dtype = ("torch", torch.float32) if n % 2 == 0 else ("numpy", np.float32)
        if n % 5 == 4:
            kind, dtype = "torch", torch.bfloat16
        mode = "pass-q" if n % 3 == 1 else "pass-kv"
        q = randn((total, h, d), 21, dtype, kind)
        k = randn((total, h_k, d), 22, dtype, kind)
        v = randn((total, h_k, d), 23, dtype, kind)
        what = f"varlen {layout} causal={causal} window={window} softcap={softcap} {dtype} {mode}"
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE, dim=0, cu_seqlens=cu) for x in (q, k, v))
        cu_local = ring.shard_cu_seqlens(cu, layout, RANK, SIZE)
        cu_arg = torch.from_numpy(cu_local) if kind == "torch" else cu_local
        max_local = int(np.diff(cu_local).max())
        out, lse, _ = VARLEN_FUNCS[layout](ql, kl, vl, cu_arg, max_local, causal=causal,
                                           window_size=window, softcap=softcap,
                                           return_attn_probs=True, mode=mode)
        ro = np.zeros((total, h, d))
        rl = np.zeros((h, total))
        for i in range(len(lens)):
            a, e = int(cu[i]), int(cu[i + 1])
            ro[a:e], rl[:, a:e] = reference(f64(q)[a:e], f64(k)[a:e], f64(v)[a:e],
                                            1 / math.sqrt(d), causal, window, softcap)
        check(tuple(out.shape) == (int(cu_local[-1]), h, d), f"{what}: out shape {tuple(out.shape)}")
        check(tuple(lse.shape) == (h, int(cu_local[-1])), f"{what}: lse shape {tuple(lse.shape)}")
        e_o = max_err(out, ring.shard(ro, layout, RANK, SIZE, dim=0, cu_seqlens=cu))
        e_l = max_err(lse, ring.shard(rl, layout, RANK, SIZE, dim=1, cu_seqlens=cu))
        check(e_o <= tol(dtype) and e_l <= 2e-4, f"{what}: out err {e_o:.3g} lse err {e_l:.3g}")


# ---- distributed decode ----


def test_decode():
    b, h, h_k, d, d_v = 2, 4, 2, 16, 8
    s_cache = 13 + 5 * SIZE
    for n, (s_q, causal, window, softcap, root) in enumerate(itertools.product(
            (1, 3), (False, True), ((-1, -1), (7, 0)), (0.0, 12.0), (None, SIZE - 1))):
        kind, dtype = ("torch", torch.float32) if n % 2 else ("numpy", np.float32)
        if n % 7 == 3:
            kind, dtype = "torch", torch.bfloat16
        q = randn((b, s_q, h, d), 31, dtype, kind)
        kc = randn((b, s_cache, h_k, d), 32, dtype, kind)
        vc = randn((b, s_cache, h_k, d_v), 33, dtype, kind)
        what = f"decode s_q={s_q} causal={causal} window={window} softcap={softcap} root={root} {dtype}"
        out, lse = ring.decode(q, ring.shard(kc, "contiguous", RANK, SIZE),
                               ring.shard(vc, "contiguous", RANK, SIZE), softmax_scale=0.25,
                               causal=causal, window_size=window, softcap=softcap, root=root)
        if root is not None and RANK != root:
            check(out is None and lse is None, f"{what}: non-root rank must get (None, None)")
            continue
        ro, rl = reference_batch(q, kc, vc, 0.25, causal, window, softcap)
        check(out.dtype == q.dtype and tuple(out.shape) == (b, s_q, h, d_v),
              f"{what}: out {out.dtype} {tuple(out.shape)}")
        e_o, e_l = max_err(out, ro), max_err(lse, rl)
        check(e_o <= tol(dtype) and e_l <= 1e-4, f"{what}: out err {e_o:.3g} lse err {e_l:.3g}")


def test_sinks():
    # Attention sinks through every ring function and decode: applied once, after the
    # ring's last merge / the reduction (a per-block sink would scale several times).
    b, s, h, h_k, d = 2, 19 + 3 * SIZE, 4, 2, 16
    sinks_np = np.array([1.0, -np.inf, 2.5, np.inf], np.float32)
    for n, (layout, causal) in enumerate(itertools.product(RING_FUNCS, (False, True))):
        kind = "torch" if n % 2 else "numpy"
        dtype = torch.float32 if kind == "torch" else np.float32
        sinks = torch.from_numpy(sinks_np) if kind == "torch" else sinks_np
        q, k, v = (randn((b, s, hh, d), 40 + i, dtype, kind) for i, hh in enumerate((h, h_k, h_k)))
        what = f"sinks {layout} causal={causal} {kind}"
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE) for x in (q, k, v))
        out, lse, _ = RING_FUNCS[layout](ql, kl, vl, 0.0, 0.3, causal, (-1, -1), None, False, True,
                                         None, mode="pass-q" if n % 3 == 0 else "pass-kv", sinks=sinks)
        ro, rl = reference_batch(q, k, v, 0.3, causal, (-1, -1), 0.0, sinks_np)
        e_o = max_err(out, ring.shard(ro, layout, RANK, SIZE))
        e_l = max_err(lse, ring.shard(rl, layout, RANK, SIZE, dim=2))
        check(e_o <= tol(dtype) and e_l <= 2e-4, f"{what}: out err {e_o:.3g} lse err {e_l:.3g}")
        # Varlen: the same batch as two packed sequences.
        cu = np.array([0, s, 2 * s], np.int32)
        pack = (lambda x: x.reshape(-1, *x.shape[2:]))
        qv, kv_, vv = (ring.shard(pack(x), layout, RANK, SIZE, dim=0, cu_seqlens=cu) for x in (q, k, v))
        cul = ring.shard_cu_seqlens(cu, layout, RANK, SIZE)
        cu_arg = torch.from_numpy(cul) if kind == "torch" else cul
        vo = VARLEN_FUNCS[layout](qv, kv_, vv, cu_arg, int(np.diff(cul).max()), 0.0, 0.3, causal,
                                  sinks=sinks)
        e_v = max_err(vo, ring.shard(pack(ro), layout, RANK, SIZE, dim=0, cu_seqlens=cu))
        check(e_v <= tol(dtype), f"{what} varlen: out err {e_v:.3g}")
    q = randn((b, 2, h, d), 50, np.float32, "numpy")
    kc = randn((b, 11 + 4 * SIZE, h_k, d), 51, np.float32, "numpy")
    vc = randn((b, 11 + 4 * SIZE, h_k, d), 52, np.float32, "numpy")
    out, lse = ring.decode(q, ring.shard(kc, "contiguous", RANK, SIZE), ring.shard(vc, "contiguous", RANK, SIZE),
                           softmax_scale=0.25, causal=True, sinks=sinks_np)
    ro, rl = reference_batch(q, kc, vc, 0.25, True, (-1, -1), 0.0, sinks_np)
    e_o, e_l = max_err(out, ro), max_err(lse, rl)
    check(e_o <= 2e-5 and e_l <= 1e-4, f"decode sinks: out err {e_o:.3g} lse err {e_l:.3g}")


def test_attention_chunk():
    # attention_chunk=C through every ring function (pass-KV and pass-Q, varlen, Ulysses where
    # it divides the ranks) and decode: chunked local attention over the global sequence,
    # equal to the float64 reference with the same chunk. Chunks that cut the shards.
    b, s, h, h_k, d = 2, 23 + 4 * SIZE, 4, 2, 16
    for n, (layout, causal, chunk) in enumerate(itertools.product(RING_FUNCS, (False, True),
                                                                   (5, 16))):
        kind = "torch" if n % 2 else "numpy"
        dtype = torch.float32 if kind == "torch" else np.float32
        window = (9, -1) if n % 4 == 3 else (-1, -1)
        q, k, v = (randn((b, s, hh, d), 60 + i, dtype, kind) for i, hh in enumerate((h, h_k, h_k)))
        what = f"chunk {chunk} {layout} causal={causal} window={window} {kind}"
        u = 2 if n % 3 == 0 and SIZE % 2 == 0 else 1
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE, ulysses_degree=u) for x in (q, k, v))
        out, lse, _ = RING_FUNCS[layout](ql, kl, vl, 0.0, 0.3, causal, window, None, False, True,
                                         None, mode="pass-q" if n % 2 == 0 else "pass-kv",
                                         ulysses_degree=u, attention_chunk=chunk)
        ro, rl = reference_batch(q, k, v, 0.3, causal, window, 0.0, chunk=chunk)
        e_o = max_err(out, ring.shard(ro, layout, RANK, SIZE, ulysses_degree=u))
        e_l = max_err(lse, ring.shard(rl, layout, RANK, SIZE, dim=2, ulysses_degree=u))
        check(e_o <= tol(dtype) and e_l <= 2e-4,
              f"{what} U={u}: out err {e_o:.3g} lse err {e_l:.3g}")
        if flash_attn_func is not None and kind == "numpy":  # the single-process kernel agrees
            fo = flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                 attention_chunk=chunk)
            e_f = max_err(out, ring.shard(f64(fo), layout, RANK, SIZE, ulysses_degree=u))
            check(e_f <= tol(dtype), f"{what}: vs flash_attn_func err {e_f:.3g}")
        cu = np.array([0, s, 2 * s], np.int32)
        pack = (lambda x: x.reshape(-1, *x.shape[2:]))
        qv, kv_, vv = (ring.shard(pack(x), layout, RANK, SIZE, dim=0, cu_seqlens=cu)
                       for x in (q, k, v))
        cul = ring.shard_cu_seqlens(cu, layout, RANK, SIZE)
        vo = VARLEN_FUNCS[layout](qv, kv_, vv, cul, int(np.diff(cul).max()), 0.0, 0.3, causal,
                                  window, attention_chunk=chunk)
        e_v = max_err(vo, ring.shard(pack(ro), layout, RANK, SIZE, dim=0, cu_seqlens=cu))
        check(e_v <= tol(dtype), f"{what} varlen: out err {e_v:.3g}")
    s_cache = 13 + 5 * SIZE
    for s_q, chunk in ((1, 8), (4, 6), (3, 64)):
        q = randn((b, s_q, h, d), 70, np.float32, "numpy")
        kc = randn((b, s_cache, h_k, d), 71, np.float32, "numpy")
        vc = randn((b, s_cache, h_k, d), 72, np.float32, "numpy")
        out, lse = ring.decode(q, ring.shard(kc, "contiguous", RANK, SIZE),
                               ring.shard(vc, "contiguous", RANK, SIZE), softmax_scale=0.25,
                               causal=True, attention_chunk=chunk)
        ro, rl = reference_batch(q, kc, vc, 0.25, True, (-1, -1), 0.0, chunk=chunk)
        e_o, e_l = max_err(out, ro), max_err(lse, rl)
        check(e_o <= 2e-5 and e_l <= 1e-4,
              f"decode chunk {chunk} s_q={s_q}: out err {e_o:.3g} lse err {e_l:.3g}")
    # A negative chunk on one rank: every rank raises, naming the option.
    q = randn((1, 4 * SIZE, h, d), 73, np.float32, "numpy")
    ql = ring.shard(q, "zigzag", RANK, SIZE)
    bad = SIZE - 1
    expect_all_raise("attention_chunk < 0",
                     lambda: ring.zigzag_ring_flash_attn_func(
                         ql, ql, ql, attention_chunk=-2 if RANK == bad else 4),
                     ValueError, "attention_chunk: must be >= 0", bad)


# ---- shard / unshard ----


def test_shard_roundtrip():
    for layout, length, kind in itertools.product(ring.LAYOUTS, (SIZE, 7 * SIZE + 3, 50), ("torch", "numpy")):
        x = randn((2, length, 3, 4), 41, np.float32 if kind == "numpy" else torch.float32, kind)
        shards = [ring.shard(x, layout, r, SIZE) for r in range(SIZE)]
        back = ring.unshard(shards, layout)
        check(type(back) is type(x) and max_err(back, x) == 0, f"unshard(shard) {layout} L={length} {kind}")
        # The shards partition the tokens: lengths add up and each equals shard_length.
        check(sum(s.shape[1] for s in shards) == length, f"shard lengths {layout} L={length}")
        lse = randn((2, 3, length), 42, np.float32, "numpy")
        back = ring.unshard([ring.shard(lse, layout, r, SIZE, dim=2) for r in range(SIZE)], layout, dim=-1)
        check(max_err(back, lse) == 0, f"unshard(shard) dim=2 {layout} L={length}")
    cu = np.array([0, 3, 3, 20, 21], dtype=np.int32)
    x = randn((21, 2, 4), 44, torch.float32, "torch")
    for layout in ("ring", "zigzag", "stripe"):
        shards = [ring.shard(x, layout, r, SIZE, dim=0, cu_seqlens=cu) for r in range(SIZE)]
        back = ring.unshard(shards, layout, dim=0, cu_seqlens=cu)
        check(torch.equal(back, x), f"varlen unshard(shard) {layout}")
        locs = [ring.shard_cu_seqlens(cu, layout, r, SIZE) for r in range(SIZE)]
        check(all(int(c[-1]) == s.shape[0] for c, s in zip(locs, shards)), f"shard_cu_seqlens {layout}")
        check(sum(np.diff(c) for c in locs).tolist() == np.diff(cu).tolist(), f"shard_cu_seqlens sums {layout}")
    # Gathered through MPI as a user would do it.
    x = randn((1, 5 * SIZE + 1, 2, 8), 43, torch.float32, "torch")
    for layout in ("contiguous", "zigzag", "striped"):
        back = ring.unshard(COMM.allgather(ring.shard(x, layout, RANK, SIZE)), layout)
        check(torch.equal(back, x), f"allgather + unshard {layout}")


# ---- collective errors ----


def expect_all_raise(what, fn, exc, fragment, bad_rank):
    """fn() must raise `exc` on EVERY rank, the message naming bad_rank (None: any rank) and
    containing fragment."""
    try:
        fn()
    except exc as e:
        msg = str(e)
        prefix = "rank " if bad_rank is None else f"rank {bad_rank}:"
        check(msg.startswith(prefix) and fragment in msg,
              f"{what}: message {msg!r} should start with {prefix!r} and mention {fragment!r}")
    except Exception as e:  # noqa: BLE001
        check(False, f"{what}: raised {type(e).__name__}: {e} instead of {exc.__name__}")
    else:
        check(False, f"{what}: did not raise")


def test_errors():
    bad = SIZE - 1
    b, s, h, d = 1, 6 * SIZE, 2, 8
    q = randn((b, s, h, d), 51, torch.float32, "torch")
    ql = ring.shard(q, "zigzag", RANK, SIZE)
    f = ring.zigzag_ring_flash_attn_func
    expect_all_raise("dropout on one rank", lambda: f(ql, ql, ql, dropout_p=0.1 if RANK == bad else 0.0),
                     ValueError, "dropout_p", bad)
    expect_all_raise("alibi on one rank", lambda: f(ql, ql, ql, alibi_slopes=torch.ones(h) if RANK == bad else None),
                     ValueError, "alibi_slopes", bad)
    kbad = ql.to(torch.float16) if RANK == bad else ql
    expect_all_raise("k dtype on one rank", lambda: f(ql, kbad, ql), TypeError, "k: dtype", bad)
    wbad = (-3, 0) if RANK == bad else (-1, -1)
    expect_all_raise("window on one rank", lambda: f(ql, ql, ql, window_size=wbad), ValueError, "window_size", bad)
    # A shard of the wrong length (cut for a different layout or missing a token): the
    # global length is then ambiguous, so the rank named is the first whose length does not
    # fit the sum; the message lists every rank's length.
    # With one rank every length is a valid shard.
    if SIZE > 1:
        qs = ql[:, :-1] if RANK == bad else ql
        expect_all_raise("short shard on one rank", lambda: f(qs, qs, qs), ringattn.InvalidArgument,
                         "local length", None)
    # Heads differ on one rank: each rank is consistent locally; the C++ side agrees on shapes.
    qh = torch.cat([ql, ql], dim=2) if RANK == bad and SIZE > 1 else ql
    if SIZE > 1:
        try:
            f(qh, qh, qh)
        except ringattn.CommError as e:
            check("heads" in str(e), f"heads mismatch: message {str(e)!r} should name 'heads'")
        except Exception as e:  # noqa: BLE001
            check(False, f"heads mismatch: raised {type(e).__name__}: {e}")
        else:
            check(False, "heads mismatch: did not raise")
    expect_all_raise("mode on one rank", lambda: f(ql, ql, ql, mode="pass-x" if RANK == bad else "pass-kv"),
                     ValueError, "mode", bad)
    # varlen: a rank with a wrong local cu_seqlens (fewer sequences than the others).
    cu = np.array([0, 2 * SIZE, 5 * SIZE], dtype=np.int32)
    xl = ring.shard(torch.randn(5 * SIZE, h, d), "contiguous", RANK, SIZE, dim=0, cu_seqlens=cu)
    cl = ring.shard_cu_seqlens(cu, "contiguous", RANK, SIZE)
    cbad = np.array([0, int(cl[-1])], dtype=np.int32) if RANK == bad else cl
    if SIZE > 1:
        expect_all_raise("varlen cu_seqlens on one rank",
                         lambda: ring.ring_flash_attn_varlen_func(xl, xl, xl, cbad, 5 * SIZE),
                         ringattn.InvalidArgument, "sequences", bad)
    expect_all_raise("varlen max_seqlen on one rank",
                     lambda: ring.ring_flash_attn_varlen_func(xl, xl, xl, cl, 0 if RANK == bad else 5 * SIZE),
                     ValueError, "max_seqlen", bad)
    # decode: root out of range on one rank.
    kc = ring.shard(torch.randn(1, 3 * SIZE, 1, d), "contiguous", RANK, SIZE)
    qd = torch.randn(1, 1, h, d)
    expect_all_raise("decode root on one rank", lambda: ring.decode(qd, kc, kc, root=SIZE if RANK == bad else 0),
                     ValueError, "root", bad)
    try:
        ring.shard(q, "diagonal", RANK, SIZE)
        check(False, "shard with an unknown layout did not raise")
    except ValueError as e:
        check("diagonal" in str(e), f"unknown layout message {e}")
    # The communicator still works after all that.
    out = f(ql, ql, ql, causal=True)
    ro, _ = reference_batch(q, q, q, 1 / math.sqrt(d), True, (-1, -1), 0.0)
    check(max_err(out, ring.shard(ro, "zigzag", RANK, SIZE)) <= 2e-5, "ring after errors")


def test_ulysses():
    """ulysses_degree U (every U dividing the size): dense and varlen, every layout, GQA with
    U > h_k (replicated K/V heads), shard/unshard round trip in the hybrid layout."""
    degrees = [u for u in (1, 2, 4) if SIZE % u == 0]
    h, h_k, d = 8, 2, 16
    for n, (u, layout) in enumerate(itertools.product(degrees, RING_FUNCS)):
        kind, dtype = ("torch", torch.float32) if n % 2 else ("numpy", np.float32)
        mode = "pass-q" if n % 3 == 2 else "pass-kv"
        b, s = 2, 19 + 3 * SIZE
        q, k, v = randn((b, s, h, d), 61, dtype, kind), randn((b, s, h_k, d), 62, dtype, kind), \
            randn((b, s, h_k, d), 63, dtype, kind)
        what = f"ulysses U={u} {layout} {kind} {mode}"
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE, ulysses_degree=u) for x in (q, k, v))
        out, lse, _ = RING_FUNCS[layout](ql, kl, vl, causal=True, window_size=(7, -1), return_attn_probs=True,
                                         mode=mode, ulysses_degree=u)
        ro, rl = reference_batch(q, k, v, 1 / math.sqrt(d), True, (7, -1), 0.0)
        e_o = max_err(out, ring.shard(ro, layout, RANK, SIZE, ulysses_degree=u))
        e_l = max_err(lse, ring.shard(rl, layout, RANK, SIZE, dim=2, ulysses_degree=u))
        check(e_o <= tol(dtype) and e_l <= 2e-4, f"{what}: out err {e_o:.3g} lse err {e_l:.3g}")
        full = ring.unshard(COMM.allgather(out), layout, ulysses_degree=u)
        check(max_err(full, ro) <= tol(dtype), f"{what}: unshard of the gathered outputs")
        # varlen, with an empty and a short sequence
        lens = [5, 0, 2 * SIZE + 7]
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        total = int(cu[-1])
        qv, kv, vv = randn((total, h, d), 64, dtype, kind), randn((total, h_k, d), 65, dtype, kind), \
            randn((total, h_k, d), 66, dtype, kind)
        ql, kl, vl = (ring.shard(x, layout, RANK, SIZE, dim=0, cu_seqlens=cu, ulysses_degree=u)
                      for x in (qv, kv, vv))
        cl = ring.shard_cu_seqlens(cu, layout, RANK, SIZE, ulysses_degree=u)
        out = VARLEN_FUNCS[layout](ql, kl, vl, cl, max(1, int(np.diff(cl).max())), causal=True, mode=mode,
                                   ulysses_degree=u)
        ro = np.zeros((total, h, d))
        for i in range(len(lens)):
            a, e = int(cu[i]), int(cu[i + 1])
            ro[a:e], _ = reference(f64(qv)[a:e], f64(kv)[a:e], f64(vv)[a:e], 1 / math.sqrt(d),
                                   True, (-1, -1), 0.0)
        e_o = max_err(out, ring.shard(ro, layout, RANK, SIZE, dim=0, cu_seqlens=cu, ulysses_degree=u))
        check(e_o <= tol(dtype), f"varlen {what}: out err {e_o:.3g}")
    if SIZE > 1:
        q = randn((1, 4 * SIZE, 12, d), 67, torch.float32, "torch")
        ql = ring.shard(q, "zigzag", RANK, SIZE, ulysses_degree=SIZE)
        expect_all_raise("degree on one rank",
                         lambda: ring.zigzag_ring_flash_attn_func(ql, ql, ql, ulysses_degree=SIZE if RANK == 0 else 1),
                         ringattn.InvalidArgument, "ulysses_degree", None)
        if 6 % SIZE:
            q6 = ql[:, :, :6].contiguous()
            expect_all_raise("degree not dividing the heads",
                             lambda: ring.zigzag_ring_flash_attn_func(q6, q6, q6, ulysses_degree=SIZE),
                             ValueError, f"must divide the query heads h=6", None)


def main():
    ringattn.set_num_threads(1)
    tests = [test_divisible_matches_extract_local, test_shard_roundtrip, test_dense,
             test_low_precision, test_varlen, test_decode, test_ulysses, test_sinks,
             test_attention_chunk, test_errors]
    t0 = time.time()
    for t in tests:
        try:
            t()
        except Exception:  # noqa: BLE001  (an unexpected error: other ranks may be waiting)
            traceback.print_exc()
            print(f"[rank {RANK}] {t.__name__} raised unexpectedly: aborting", flush=True)
            sys.stdout.flush()
            COMM.Abort(1)
    return summary("mpi_ring", f", {time.time() - t0:.1f} s, backend {ringattn.backend()}, "
                   f"flash_attn_func {'compared' if flash_attn_func else 'absent'}")


if __name__ == "__main__":
    sys.exit(main())
