"""MLA over a latent cache sharded across MPI ranks, from Python:
`mpirun -np N python3 tests/python/mpi_mla_session.py` (N = 1..4).

ringattn.session.MlaSession (prompt latents stored, decode steps of 1, 3 and 2 tokens,
causal among the new tokens) and the one-shot ringattn.ring.mla_decode (each rank's
contiguous slice of a paged cache, non-causal and causal multi-token) on numpy and torch
tensors, fp32 and bf16, both cache layouts, sinks; every output row is compared with a
float64 NumPy reference of MLA over the sequence's whole history. Bad arguments on one rank
make every rank raise.
"""
import sys

import numpy as np

import ringattn
from ringattn import ring
from ringattn import session as rs
from checks_mpi import RANK, SIZE, check, f64, summary

try:
    import torch
except ImportError:  # numpy only
    torch = None

D, DV = 576, 512


def mla_ref(q, kv, L, scale, causal, sink=None):
    """q [s_q, h, 576], kv [>= L, 576] (float64): MLA over tokens [0, L); with causal, row
    s sees positions <= L - s_q + s. -> out [s_q, h, 512], lse [h, s_q]."""
    s_q = q.shape[0]
    s = np.einsum("ihd,jd->hij", q, kv[:L]) * scale
    if causal:
        vis = np.arange(L)[None, :] <= (L - s_q + np.arange(s_q))[:, None]
        s = np.where(vis[None], s, -np.inf)
    m = s.max(axis=2, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("hij,jd->ihd", p / p.sum(axis=2, keepdims=True), kv[:L, :DV])
    lse = np.log(p.sum(axis=2)) + m[..., 0]
    if sink is not None:
        out = out * (1.0 / (1.0 + np.exp(sink[None, :] - lse.T)))[..., None]
    return out, lse


def converter(kind, dtype):
    def conv(x):
        if kind == "torch":
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            return t.to(torch.bfloat16) if dtype == "bf16" else t
        return np.ascontiguousarray(x, dtype=np.float32)
    return conv


def run_session(kind, dtype, cache_layout, prompt_layout, sinks):
    rng = np.random.default_rng(5)
    h, scale = 4, 0.05
    lens = [11 + SIZE, 3]
    b = len(lens)
    steps = [1, 3, 2]
    total = [n + sum(steps) for n in lens]
    conv = converter(kind, dtype)
    rnd = (lambda a: f64(conv(a))) if dtype == "bf16" else (lambda a: a)
    LAT = [rnd(rng.standard_normal((n, D))) for n in total]
    sink = np.linspace(-1.0, 2.0, h) if sinks else None
    sink_t = None if sink is None else (torch.tensor(sink, dtype=torch.float32) if kind == "torch"
                                        else sink.astype(np.float32))
    what = f"session {kind} {dtype} {cache_layout} {prompt_layout} sinks={sinks}"
    tol = 2e-5 if dtype == "fp32" else 3e-2
    sess = rs.MlaSession(b, h, max(total), dtype=dtype, page_size=4, cache_layout=cache_layout,
                         prompt_layout=prompt_layout, softmax_scale=scale, sinks=sink_t)
    full = np.concatenate([LAT[s][:lens[s]] for s in range(b)])
    sess.prefill(sess.shard_prompt(conv(full), lens), lens)
    check(sess.lengths == lens, f"{what}: lengths after prefill {sess.lengths}")
    at = list(lens)
    for t in steps:
        q = rnd(rng.standard_normal((b, t, h, D)))
        kv = np.stack([LAT[s][at[s]:at[s] + t] for s in range(b)])
        o, l = sess.decode(conv(q), conv(kv))
        check(type(o) is type(conv(q)) and tuple(o.shape) == (b, t, h, DV), f"{what}: out kind/shape")
        for s in range(b):
            ro, rl = mla_ref(q[s], LAT[s], at[s] + t, scale, True, sink)
            e = max(np.abs(f64(o[s]) - ro).max(), np.abs(f64(l[s]) - rl).max())
            check(e <= tol, f"{what}: step of {t} seq {s} err {e:.3g}")
        st = sess.last_stats
        check(st["merge_s"] >= 0 and st["wait_s"] >= 0, f"{what}: stats {st}")
        at = [x + t for x in at]
    check(sess.lengths == total, f"{what}: lengths {sess.lengths} vs {total}")


def run_one_shot(kind, dtype, causal, root):
    rng = np.random.default_rng(9)
    h, s_q, page, scale = 4, 2 if causal else 1, 3, 0.06
    lens = [4 * SIZE + 5, 2 * SIZE]
    b = len(lens)
    conv = converter(kind, dtype)
    rnd = (lambda a: f64(conv(a))) if dtype == "bf16" else (lambda a: a)
    LAT = [rnd(rng.standard_normal((n, D))) for n in lens]
    q = rnd(rng.standard_normal((b, s_q, h, D)))
    sink = np.array([0.5, -np.inf, 1.0, 2.0])
    # This rank's slice [r L / P, (r + 1) L / P) of every sequence as a paged cache whose
    # blocks are listed in reverse order (a block table that is not the identity).
    first = [r * n // SIZE for n in lens for r in [RANK]]
    count = [(RANK + 1) * n // SIZE - r * n // SIZE for n in lens for r in [RANK]]
    mb = max(1, max((c + page - 1) // page for c in count))
    cache = np.zeros((b * mb, page, 1, D))
    table = np.zeros((b, mb), np.int32)
    for s in range(b):
        for blk in range(mb):
            table[s, blk] = b * mb - 1 - (s * mb + blk)
        for j in range(count[s]):
            cache[table[s, j // page], j % page, 0] = LAT[s][first[s] + j]
    sink_t = torch.tensor(sink, dtype=torch.float32) if kind == "torch" else sink.astype(np.float32)
    tables = torch.from_numpy(table) if kind == "torch" else table
    seqlens = np.array(count, np.int64)
    seqlens = torch.from_numpy(seqlens) if kind == "torch" else seqlens
    o, l = ring.mla_decode(conv(q), conv(cache), tables, seqlens, softmax_scale=scale,
                           causal=causal, root=root, attn_sink=sink_t)
    what = f"one-shot {kind} {dtype} causal={causal} root={root}"
    if root is not None and RANK != root:
        check(o is None and l is None, f"{what}: non-root returns None")
        return
    tol = 2e-5 if dtype == "fp32" else 3e-2
    for s in range(b):
        ro, rl = mla_ref(q[s], LAT[s], lens[s], scale, causal, sink)
        e = max(np.abs(f64(o[s]) - ro).max(), np.abs(f64(l[s]) - rl).max())
        check(e <= tol, f"{what}: seq {s} err {e:.3g}")


def test_errors():
    sess = rs.MlaSession(1, 2, 10, dtype="fp32")
    sess.prefill(np.zeros((len(sess.prefill_positions(2)), D), np.float32), [2])
    q = np.zeros((1, 1, 2, D), np.float32)
    bad = np.zeros((1, 1, 3, D), np.float32) if RANK == SIZE - 1 else q
    kv = np.zeros((1, 1, D), np.float32)
    try:
        sess.decode(bad, kv)
        check(False, "heads mismatch on one rank: no error")
    except ringattn.InvalidArgument as e:
        check(str(e).startswith(f"rank {SIZE - 1}:") and "heads" in str(e), f"heads mismatch message {e}")
    try:
        over = np.zeros((1, 9, 2, D), np.float32)
        sess.decode(over, np.zeros((1, 9, D), np.float32))
        check(False, "overflow: no error")
    except ringattn.InvalidArgument as e:
        check("more than the capacity 10" in str(e), f"overflow message {e}")
    try:
        rs.MlaSession(1, 2, 10, dtype="fp16")
        check(False, "fp16: no error")
    except ValueError as e:
        check("fp32 or bf16" in str(e), f"fp16 message {e}")
    try:  # one-shot: a slice that is not this rank's contiguous share
        cache = np.zeros((2, 4, 1, D), np.float32)
        lens = np.array([3 if RANK == 0 else 1], np.int64)
        ring.mla_decode(q, cache, np.array([[0, 1]], np.int32), lens)
        check(SIZE == 1, "uneven slices: no error")
    except ringattn.InvalidArgument as e:
        check("local cache_seqlens" in str(e), f"uneven slices message {e}")


def main():
    ringattn.set_num_threads(1)
    kinds = ["numpy"] + (["torch"] if torch is not None else [])
    for kind in kinds:
        for dtype in (["fp32", "bf16"] if kind == "torch" else ["fp32"]):
            run_session(kind, dtype, "round-robin", "contiguous", sinks=False)
            run_one_shot(kind, dtype, causal=False, root=None)
        run_session(kind, "fp32", "contiguous", "zigzag", sinks=True)
        run_one_shot(kind, "fp32", causal=True, root=SIZE - 1)
    test_errors()
    return summary("mpi_mla_session")


if __name__ == "__main__":
    sys.exit(main())
