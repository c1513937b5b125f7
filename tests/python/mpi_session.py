"""ringattn.session under MPI: `mpirun -np N python3 tests/python/mpi_session.py` (N = 1..4).

A session (prefill, decode steps of 1 and 2 tokens, extend in each mode, decode again) on
torch and numpy tensors, fp32 and bf16, both cache layouts; every output row is compared
with a float64 NumPy reference of causal attention over the whole sequence. Bad arguments
on one rank make every rank raise.
"""
import math
import sys

import numpy as np

import ringattn
from ringattn import session as rs
from checks_mpi import RANK, SIZE, check, f64, summary

try:
    import torch
except ImportError:  # numpy only
    torch = None



def causal_ref(q, k, v, scale, wl=-1, chunk=0):
    """q [L, h, d], k/v [L, h_k, *] (float64) -> out [L, h, d_v], lse [h, L]."""
    L, h, _ = q.shape
    g = h // k.shape[1]
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("ihd,jhd->hij", q, kk) * scale
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    vis = j <= i
    if wl >= 0:
        vis &= j >= i - wl
    if chunk > 0:  # attention_chunk: the history from the start of the token's chunk
        vis &= j // chunk == i // chunk
    s = np.where(vis[None], s, -np.inf)
    m = s.max(axis=2, keepdims=True)
    p = np.exp(s - m)
    return np.einsum("hij,jhd->ihd", p / p.sum(axis=2, keepdims=True), vv), np.log(p.sum(axis=2)) + m[..., 0]


def run(kind, dtype, cache_layout, mode, wl, sinks=False, chunk=0):
    rng = np.random.default_rng(11)
    h, h_k, d, d_v = 4, 2, 16, 8
    lens = [19 + SIZE, 7]
    b = len(lens)
    steps = [1, 2, 0, 2]  # decode 1, decode 2, extend (0 = the extend slot), decode 2
    s1 = 0 if wl >= 0 else 6
    total = [n + sum(x for x in steps if x) + s1 for n in lens]
    Q = [rng.standard_normal((n, h, d)) for n in total]
    K = [rng.standard_normal((n, h_k, d)) for n in total]
    V = [rng.standard_normal((n, h_k, d_v)) for n in total]

    def conv(x):
        if kind == "torch":
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            return t.to(torch.bfloat16) if dtype == "bf16" else t
        return np.ascontiguousarray(x, dtype=np.float32)

    # bf16 inputs: the reference sees the rounded values.
    rnd = (lambda a: f64(conv(a))) if dtype == "bf16" else (lambda a: a)
    Q, K, V = [rnd(x) for x in Q], [rnd(x) for x in K], [rnd(x) for x in V]
    refs = [causal_ref(Q[s], K[s], V[s], 1 / math.sqrt(d), wl, chunk) for s in range(b)]
    sink = np.linspace(-1.0, 2.0, h) if sinks else None
    if sinks:  # out *= exp(lse) / (exp(lse) + exp(sink)); the LSE excludes the sink
        refs = [(o * (1.0 / (1.0 + np.exp(sink[None, :] - l.T)))[..., None], l) for o, l in refs]
    tol = 2e-5 if dtype == "fp32" else 3e-2
    what = f"{kind} {dtype} {cache_layout} {mode} wl={wl} chunk={chunk}"
    sink_t = None if sink is None else (torch.tensor(sink, dtype=torch.float32) if kind == "torch"
                                        else sink.astype(np.float32))
    sess = rs.KvSession(b, h, h_k, d, max(total), head_dim_v=d_v, dtype=dtype, page_size=3,
                        cache_layout=cache_layout, window_size=(wl, 0), sinks=sink_t,
                        attention_chunk=chunk)
    full = lambda X: np.concatenate([X[s][:lens[s]] for s in range(b)])  # noqa: E731
    ql, kl, vl = (sess.shard_prompt(conv(full(X)), lens) for X in (Q, K, V))
    out, lse = sess.prefill(ql, kl, vl, lens)
    rows = [(s, p) for s in range(b) for p in sess.prefill_positions(lens[s])]
    check(tuple(out.shape) == (len(rows), h, d_v) and tuple(lse.shape) == (h, len(rows)), f"{what}: prefill shapes")
    for r, (s, p) in enumerate(rows):
        e = max(np.abs(f64(out[r]) - refs[s][0][p]).max(), np.abs(f64(lse[:, r]) - refs[s][1][:, p]).max())
        check(e <= tol, f"{what}: prefill seq {s} pos {p} err {e:.3g}")
    at = list(lens)
    for t in steps:
        n = t if t else s1
        if n == 0:
            continue
        args = [conv(np.stack([X[s][at[s]:at[s] + n] for s in range(b)])) for X in (Q, K, V)]
        if t:
            o, l = sess.decode(*args)
        else:
            o, l, info = sess.extend(*args, mode=mode)
            check(info["mode"] in ("pass-q", "pass-kv") and (mode == "auto" or info["mode"] == mode),
                  f"{what}: extend ran {info}")
        check(type(o) is type(args[0]) and o.dtype == args[0].dtype, f"{what}: out kind/dtype")
        for s in range(b):
            e = max(np.abs(f64(o[s]) - refs[s][0][at[s]:at[s] + n]).max(),
                    np.abs(f64(l[s]) - refs[s][1][:, at[s]:at[s] + n]).max())
            check(e <= tol, f"{what}: step of {n} seq {s} err {e:.3g}")
        at = [x + n for x in at]
    check(sess.lengths == total, f"{what}: lengths {sess.lengths} vs {total}")


def test_errors():
    sess = rs.KvSession(1, 2, 2, 8, 10, dtype="fp32")
    x = np.zeros((1, 1, 2, 8), np.float32)
    bad = np.zeros((1, 1, 3, 8), np.float32) if RANK == SIZE - 1 else x
    try:
        sess.prefill(np.zeros((0, 2, 8), np.float32), np.zeros((0, 2, 8), np.float32),
                     np.zeros((0, 2, 8), np.float32), [0])
        sess.decode(bad, x, x)
        check(False, "heads mismatch on one rank: no error")
    except ringattn.InvalidArgument as e:
        check(str(e).startswith(f"rank {SIZE - 1}:") and "heads" in str(e), f"heads mismatch message {e}")
    try:
        sess.decode(x.astype(np.float16), x, x)
        check(False, "dtype: no error")
    except TypeError as e:
        check("session's fp32" in str(e), f"dtype message {e}")
    try:
        over = np.zeros((1, 11, 2, 8), np.float32)
        sess.decode(over, over, over)
        check(False, "overflow: no error")
    except ringattn.InvalidArgument as e:
        check("more than the capacity 10" in str(e), f"overflow message {e}")


def main():
    ringattn.set_num_threads(1)
    kinds = ["numpy"] + (["torch"] if torch is not None else [])
    for n, kind in enumerate(kinds):
        for dtype in (["fp32", "bf16"] if kind == "torch" else ["fp32"]):
            for layout, mode in (("round-robin", "pass-q"), ("contiguous", "pass-kv"), ("round-robin", "auto")):
                run(kind, dtype, layout, mode, -1)
        run(kind, "fp32", "round-robin", "auto", 5)
        run(kind, "fp32", "contiguous", "pass-kv", -1, sinks=True)
        # attention_chunk: chunks cutting the prompts, the decode steps and the extend.
        run(kind, "fp32", "round-robin", "pass-q", -1, chunk=5)
        run(kind, "fp32", "contiguous", "pass-kv", -1, sinks=True, chunk=8)
        run(kind, "fp32", "round-robin", "auto", 4, chunk=6)
    test_errors()
    return summary("mpi_session")


if __name__ == "__main__":
    sys.exit(main())
