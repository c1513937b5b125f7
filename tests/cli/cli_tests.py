#!/usr/bin/env python3
"""End-to-end tests of the `ringattn` tool: random .npy inputs, one run of the binary,
comparison with a float64 NumPy reference that follows docs/semantics.md literally.

usage: cli_tests.py RINGATTN_BINARY CASE     (CASE = one of the functions named case_*)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

BIN = None
TMP = None
BACKENDS = ["reference", "auto"]


# ---------------------------------------------------------------- reference
def attention_ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=0.0, sinks=None, chunk=0,
                  qv=None):
    """q [s_q, h, d], k [s_k, h_k, d], v [s_k, h_k, d_v] (float64) ->
    out [s_q, h, d_v], lse [h, s_q]; rows that see no key: out 0, lse -inf.
    sinks [h]: an extra logit per head in the denominator only (the LSE excludes it).
    chunk > 0: key j visible only in the chunk of the diagonal key i + s_k - s_q.
    qv [s_q, h, d_v] (FA3): score = scale * (q . k + qv . v), default scale 1/sqrt(d + d_v)."""
    s_q, h, d = q.shape
    s_k, h_k, d_v = v.shape
    if scale == 0.0:
        scale = 1.0 / np.sqrt(d if qv is None else d + d_v)
    rep = h // h_k
    kk = np.repeat(k, rep, axis=1)
    vv = np.repeat(v, rep, axis=1)
    s = np.einsum("qhd,khd->hqk", q, kk)
    if qv is not None:
        s = s + np.einsum("qhd,khd->hqk", qv, vv)
    s = s * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    wl, wr = window
    if causal:
        wr = 0
    i = np.arange(s_q)[:, None]
    j = np.arange(s_k)[None, :]
    shift = s_k - s_q
    vis = np.ones((s_q, s_k), dtype=bool)
    if wr >= 0:
        vis &= j <= i + shift + wr
    if wl >= 0:
        vis &= j >= i + shift - wl
    if chunk > 0:
        vis &= (j // chunk) == ((i + shift) // chunk)
    s = np.where(vis[None], s, -np.inf)
    m = s.max(axis=2, keepdims=True) if s_k > 0 else np.full((h, s_q, 1), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    tot = p.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lse = np.where(tot[..., 0] > 0, np.log(tot[..., 0]) + m_safe[..., 0], -np.inf)
        denom = np.where(tot > 0, tot, 1)
        if sinks is not None:
            denom = denom + np.exp(np.asarray(sinks, np.float64)[:, None, None] - m_safe)
        o = np.einsum("hqk,khd->qhd", np.where(tot > 0, p / denom, 0), vv)
    return o, lse


def bf16_round(x):
    """Round float values to bfloat16 (nearest even), returned as float64."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------- helpers
def path(name):
    return os.path.join(TMP, name)


def save(name, arr):
    p = path(name)
    np.save(p, arr)
    return p


def run(args, expect_rc=0):
    r = subprocess.run([BIN] + [str(a) for a in args], capture_output=True, text=True)
    if expect_rc is not None and r.returncode != expect_rc:
        sys.exit(f"FAIL: {' '.join(map(str, args))}\nexit {r.returncode} (expected {expect_rc})\n"
                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def check_close(name, got, ref, atol, rtol=0.0):
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        sys.exit(f"FAIL: {name}: shape {got.shape} != reference {ref.shape}")
    both_ninf = np.isneginf(got) & np.isneginf(ref)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_ninf, 0.0, np.abs(got - ref))
    bad = ~(diff <= atol + rtol * np.abs(np.where(both_ninf, 0.0, ref)))
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        sys.exit(f"FAIL: {name}: {bad.sum()} elements off, first at {idx}: got {got[idx]}, "
                 f"ref {ref[idx]} (atol {atol}, rtol {rtol})")
    print(f"ok {name}: max err {diff.max() if diff.size else 0:.3g}")


def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def run_attn_dense(r, b, s_q, s_k, h, h_k, d, d_v, extra, ref_kw, dtype="fp32", atol=2e-4,
                   file_dtype=np.float32):
    q = r.standard_normal((b, s_q, h, d)).astype(file_dtype)
    k = r.standard_normal((b, s_k, h_k, d)).astype(file_dtype)
    v = r.standard_normal((b, s_k, h_k, d_v)).astype(file_dtype)
    qp, kp, vp = save("q.npy", q), save("k.npy", k), save("v.npy", v)
    conv = bf16_round if dtype == "bf16" else (lambda x: np.asarray(x, np.float64))
    refs = [attention_ref(conv(q[i]), conv(k[i]), conv(v[i]), **ref_kw) for i in range(b)]
    o_ref = np.stack([o for o, _ in refs])
    l_ref = np.stack([l for _, l in refs])
    for be in BACKENDS:
        run(["attn", "--q", qp, "--k", kp, "--v", vp, "--out", path("o.npy"), "--lse", path("l.npy"),
             "--dtype", dtype, "--backend", be] + extra)
        check_close(f"out [{be}]", np.load(path("o.npy")), o_ref, atol)
        check_close(f"lse [{be}]", np.load(path("l.npy")), l_ref, atol, 1e-5)


# ---------------------------------------------------------------- attn
def case_attn_dense():
    run_attn_dense(rng(), 2, 37, 53, 6, 2, 64, 64, [], {})
    run_attn_dense(rng(), 1, 9, 4, 4, 1, 32, 16, [], {})          # MQA, d_v != d, s_q > s_k
    run_attn_dense(rng(), 2, 11, 13, 4, 4, 32, 32, [], {}, file_dtype=np.float16)  # <f2 files


def case_attn_causal_window():
    run_attn_dense(rng(), 2, 20, 33, 6, 3, 64, 64, ["--causal"], {"causal": True})
    run_attn_dense(rng(), 1, 33, 20, 4, 2, 32, 32, ["--causal"], {"causal": True})  # empty rows
    run_attn_dense(rng(), 2, 20, 33, 6, 3, 64, 64, ["--causal", "--window", 5, -1],
                   {"causal": True, "window": (5, -1)})
    run_attn_dense(rng(), 1, 24, 24, 2, 1, 32, 32, ["--window", 3, 2], {"window": (3, 2)})


def case_attn_softcap():
    run_attn_dense(rng(), 2, 17, 29, 4, 2, 64, 64, ["--softcap", 15, "--scale", 0.5],
                   {"softcap": 15.0, "scale": 0.5})


def case_attn_bf16():
    run_attn_dense(rng(), 2, 31, 45, 4, 2, 64, 64, ["--causal"], {"causal": True}, dtype="bf16",
                   atol=2e-2)


def case_attn_varlen():
    r = rng()
    h, h_k, d, d_v = 4, 2, 32, 32
    lens_q = [5, 0, 12, 3, 7]
    lens_k = [7, 6, 20, 0, 7]      # segment 3 has no keys: its rows are 0 / -inf
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)  # int64 accepted too
    q = r.standard_normal((cu_q[-1], h, d)).astype(np.float32)
    k = r.standard_normal((cu_k[-1], h_k, d)).astype(np.float32)
    v = r.standard_normal((cu_k[-1], h_k, d_v)).astype(np.float32)
    args = ["--q", save("q.npy", q), "--k", save("k.npy", k), "--v", save("v.npy", v),
            "--cu-seqlens-q", save("cq.npy", cu_q), "--cu-seqlens-k", save("ck.npy", cu_k),
            "--out", path("o.npy"), "--lse", path("l.npy")]
    for causal in (False, True):
        o_ref = np.zeros((cu_q[-1], h, d_v))
        l_ref = np.full((h, cu_q[-1]), -np.inf)
        for i in range(len(lens_q)):
            a, bq, c, dk = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            o, l = attention_ref(q[a:bq].astype(np.float64), k[c:dk].astype(np.float64),
                                 v[c:dk].astype(np.float64), causal=causal)
            o_ref[a:bq] = o
            l_ref[:, a:bq] = l
        for be in BACKENDS:
            run(["attn", "--backend", be] + args + (["--causal"] if causal else []))
            check_close(f"varlen out causal={causal} [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
            check_close(f"varlen lse causal={causal} [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)


def case_attn_varlen_seqused():
    """seqused_q/k shorten segments; rows past them and past cu_seqlens_q[b] read 0 / -inf."""
    r = rng()
    h, h_k, d = 4, 1, 32
    lens_q, lens_k = [6, 4, 9], [8, 5, 10]
    used_q, used_k = np.array([4, 0, 9], np.int32), np.array([8, 3, 0], np.int32)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    total_q = cu_q[-1] + 2  # two trailing rows outside every segment
    q = r.standard_normal((total_q, h, d)).astype(np.float32)
    k = r.standard_normal((cu_k[-1], h_k, d)).astype(np.float32)
    v = r.standard_normal((cu_k[-1], h_k, d)).astype(np.float32)
    o_ref = np.zeros((total_q, h, d))
    l_ref = np.full((h, total_q), -np.inf)
    for i in range(3):
        a, c = cu_q[i], cu_k[i]
        o, l = attention_ref(q[a:a + used_q[i]].astype(np.float64), k[c:c + used_k[i]].astype(np.float64),
                             v[c:c + used_k[i]].astype(np.float64))
        o_ref[a:a + used_q[i]] = o
        l_ref[:, a:a + used_q[i]] = l
    for be in BACKENDS:
        run(["attn", "--backend", be, "--q", save("q.npy", q), "--k", save("k.npy", k), "--v", save("v.npy", v),
             "--cu-seqlens-q", save("cq.npy", cu_q), "--cu-seqlens-k", save("ck.npy", cu_k),
             "--seqused-q", save("uq.npy", used_q), "--seqused-k", save("uk.npy", used_k),
             "--max-seqlen-q", 16, "--max-seqlen-k", 16, "--out", path("o.npy"), "--lse", path("l.npy")])
        check_close(f"seqused out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"seqused lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)


def case_attn_sinks():
    # --sinks [h]: -inf (no sink), +inf (output 0) and finite logits, with splits.
    r = rng()
    h = 6
    sinks = np.array([1.0, -np.inf, 3.5, np.inf, 0.0, 6.0], np.float32)
    sp = save("sinks.npy", sinks)
    run_attn_dense(r, 2, 9, 300, h, 2, 32, 32, ["--sinks", sp], {"sinks": sinks})
    run_attn_dense(r, 1, 21, 13, h, 3, 32, 32, ["--sinks", sp, "--causal", "--num-splits", 2],
                   {"sinks": sinks, "causal": True})
    run_attn_dense(r, 1, 4, 40, h, 1, 32, 32, ["--sinks", save("s16.npy", sinks.astype(np.float16))],
                   {"sinks": sinks})
    # KV cache (dense cache, split-KV forced): the sink is applied after the merge.
    b, s_q, h_k, d, cap = 2, 2, 2, 32, 700
    seqlens = np.array([650, 3], np.int32)
    kc = np.full((b, cap, h_k, d), np.nan, np.float32)
    vc = np.full((b, cap, h_k, d), np.nan, np.float32)
    for i in range(b):
        kc[i, :seqlens[i]] = r.standard_normal((seqlens[i], h_k, d))
        vc[i, :seqlens[i]] = r.standard_normal((seqlens[i], h_k, d))
    q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
    o_ref = np.zeros((b, s_q, h, d))
    l_ref = np.zeros((b, h, s_q))
    for i in range(b):
        o_ref[i], l_ref[i] = attention_ref(q[i].astype(np.float64), kc[i, :seqlens[i]].astype(np.float64),
                                           vc[i, :seqlens[i]].astype(np.float64), causal=True, sinks=sinks)
    args = ["kvcache", "--q", save("q.npy", q), "--k-cache", save("kc.npy", kc), "--v-cache", save("vc.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens), "--out", path("o.npy"), "--lse", path("l.npy"),
            "--causal", "--sinks", sp, "--num-splits", 3]
    for be in BACKENDS:
        run(args + ["--backend", be])
        check_close(f"kvcache sinks out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"kvcache sinks lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
    # Errors name --sinks and the values.
    q, k, v = (save(n, r.standard_normal(s).astype(np.float32))
               for n, s in (("q.npy", (1, 3, 6, 32)), ("k.npy", (1, 5, 2, 32)), ("v.npy", (1, 5, 2, 32))))
    base = ["attn", "--q", q, "--k", k, "--v", v, "--sinks"]
    expect_error(base + [save("s4.npy", np.zeros(4, np.float32))], ["--sinks", "h = 6", "[4]"], rc=2)
    expect_error(base + [save("sn.npy", np.array([0, 1, np.nan, 0, 0, 0], np.float32))],
                 ["--sinks", "entry 2", "NaN"], rc=2)
    expect_error(base + [save("si.npy", np.zeros(6, np.int32))], ["--sinks", "<i4"], rc=2)
    expect_error(base + [path("nosuch.npy")], ["--sinks", "nosuch.npy"], rc=1)


def case_attn_chunk():
    # --attention-chunk N: chunked local attention, alone and with causal / window / sinks.
    r = rng()
    run_attn_dense(r, 2, 37, 90, 6, 2, 32, 32, ["--attention-chunk", 16], {"chunk": 16})
    run_attn_dense(r, 1, 50, 20, 4, 2, 32, 32, ["--attention-chunk", 7, "--causal", "--num-splits", 2],
                   {"chunk": 7, "causal": True})
    sinks = np.array([0.5, -np.inf, 3.0, np.inf], np.float32)
    run_attn_dense(r, 1, 9, 200, 4, 1, 32, 32,
                   ["--attention-chunk", 64, "--window", 40, 0, "--sinks", save("s.npy", sinks)],
                   {"chunk": 64, "window": (40, 0), "sinks": sinks})
    # KV cache: chunked prefill against a dense cache, keys counted after leftpad.
    b, s_q, h, h_k, d, cap = 2, 5, 4, 2, 32, 300
    seqlens = np.array([250, 9], np.int32)
    kc = np.full((b, cap, h_k, d), np.nan, np.float32)
    vc = np.full((b, cap, h_k, d), np.nan, np.float32)
    for i in range(b):
        kc[i, :seqlens[i]] = r.standard_normal((seqlens[i], h_k, d))
        vc[i, :seqlens[i]] = r.standard_normal((seqlens[i], h_k, d))
    q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
    o_ref = np.zeros((b, s_q, h, d))
    l_ref = np.zeros((b, h, s_q))
    for i in range(b):
        o_ref[i], l_ref[i] = attention_ref(q[i].astype(np.float64), kc[i, :seqlens[i]].astype(np.float64),
                                           vc[i, :seqlens[i]].astype(np.float64), causal=True, chunk=32)
    args = ["kvcache", "--q", save("q.npy", q), "--k-cache", save("kc.npy", kc), "--v-cache", save("vc.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens), "--out", path("o.npy"), "--lse", path("l.npy"),
            "--causal", "--attention-chunk", 32]
    for be in BACKENDS:
        run(args + ["--backend", be])
        check_close(f"kvcache chunk out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"kvcache chunk lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
    qp, kp, vp = (save(n, r.standard_normal(s).astype(np.float32))
                  for n, s in (("q.npy", (1, 3, 4, 32)), ("k.npy", (1, 5, 2, 32)), ("v.npy", (1, 5, 2, 32))))
    expect_error(["attn", "--q", qp, "--k", kp, "--v", vp, "--attention-chunk", -3],
                 ["--attention-chunk", "-3"], rc=2)


# ---------------------------------------------------------------- fp8 e4m3
def e4m3_values():
    """float64 value of each e4m3fn byte (0x7f / 0xff: NaN)."""
    b = np.arange(256)
    e, m = (b >> 3) & 0xF, b & 7
    val = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    val = np.where(b & 0x80, -val, val)
    val[(b & 0x7F) == 0x7F] = np.nan
    return val


E4M3 = e4m3_values()


def e4m3_bytes(r, shape):
    """Random e4m3 bytes, magnitudes about 2^-4 .. 2^3 with some subnormals, no NaN."""
    e = np.where(r.random(shape) < 0.05, 0, r.integers(3, 11, size=shape))
    return ((r.integers(0, 2, size=shape) << 7) | (e << 3) | r.integers(0, 8, size=shape)).astype(np.uint8)


def case_attn_fp8():
    """--dtype fp8: |u1 files of e4m3 bytes and [b, h_k] descales against float64."""
    r = rng()
    b, s_q, s_k, h, h_k, d = 2, 9, 40, 6, 2, 32
    q, k, v = e4m3_bytes(r, (b, s_q, h, d)), e4m3_bytes(r, (b, s_k, h_k, d)), e4m3_bytes(r, (b, s_k, h_k, d))
    ds = [r.uniform(0.25, 2.0, (b, h_k)).astype(np.float32) for _ in range(3)]
    args = ["attn", "--q", save("q8.npy", q), "--k", save("k8.npy", k), "--v", save("v8.npy", v),
            "--q-descale", save("qd.npy", ds[0]), "--k-descale", save("kd.npy", ds[1]),
            "--v-descale", save("vd.npy", ds[2]), "--dtype", "fp8", "--causal",
            "--out", path("o.npy"), "--lse", path("l.npy")]
    refs = [attention_ref(E4M3[q[i]] * np.repeat(ds[0][i], h // h_k)[None, :, None],
                          E4M3[k[i]] * ds[1][i][None, :, None], E4M3[v[i]] * ds[2][i][None, :, None],
                          causal=True) for i in range(b)]
    o_ref, l_ref = np.stack([o for o, _ in refs]), np.stack([l for _, l in refs])
    for be in BACKENDS:
        run(args + ["--backend", be])
        o = np.load(path("o.npy"))
        if o.dtype != np.float32:
            sys.exit(f"FAIL: fp8 --out must be fp32, got {o.dtype}")
        check_close(f"fp8 out [{be}]", o, o_ref, 1e-4 * max(1.0, np.abs(o_ref).max()))
        check_close(f"fp8 lse [{be}]", np.load(path("l.npy")), l_ref, 1e-4, 1e-5)
    # Without descales the values are the bytes' own; fp8 options need --dtype fp8.
    run(["attn", "--q", path("q8.npy"), "--k", path("k8.npy"), "--v", path("v8.npy"), "--dtype", "fp8",
         "--out", path("o.npy")])
    o_ref = np.stack([attention_ref(E4M3[q[i]], E4M3[k[i]], E4M3[v[i]])[0] for i in range(b)])
    check_close("fp8 out without descales", np.load(path("o.npy")), o_ref, 1e-4 * max(1.0, np.abs(o_ref).max()))
    expect_error(["attn", "--q", path("q8.npy"), "--k", path("k8.npy"), "--v", path("v8.npy")],
                 ["--q", "|u1", "--dtype fp8"], rc=2)
    expect_error(["attn", "--q", save("qf.npy", E4M3[q].astype(np.float32)), "--k", path("k8.npy"),
                  "--v", path("v8.npy"), "--dtype", "fp8"], ["--q", "e4m3 bytes", "<f4"], rc=2)
    expect_error(args[:7] + ["--q-descale", save("bad.npy", np.ones((b, h), np.float32)), "--dtype", "fp8"],
                 ["--q-descale", "[b, h_k]"], rc=2)


def case_kvcache_fp8():
    """--dtype fp8 against a paged e4m3 cache with appended e4m3 rows (written as bytes)."""
    r = rng()
    b, s_q, h, h_k, d, page, blocks, max_pages, s_new = 2, 2, 8, 2, 32, 4, 12, 5, 2
    seqlens = np.array([7, 13], dtype=np.int32)
    kc, vc = e4m3_bytes(r, (blocks, page, h_k, d)), e4m3_bytes(r, (blocks, page, h_k, d))
    pt = r.permutation(blocks)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    q, kn, vn = e4m3_bytes(r, (b, s_q, h, d)), e4m3_bytes(r, (b, s_new, h_k, d)), e4m3_bytes(r, (b, s_new, h_k, d))
    ds = [r.uniform(0.25, 2.0, (b, h_k)).astype(np.float32) for _ in range(3)]
    kc_ref, vc_ref = kc.copy(), vc.copy()
    for i in range(b):
        for t in range(s_new):
            pos = seqlens[i] + t
            kc_ref[pt[i, pos // page], pos % page] = kn[i, t]
            vc_ref[pt[i, pos // page], pos % page] = vn[i, t]
    o_ref, l_ref = np.zeros((b, s_q, h, d)), np.zeros((b, h, s_q))
    for i in range(b):
        toks = [(pt[i, t // page], t % page) for t in range(seqlens[i] + s_new)]
        kt = np.stack([E4M3[kc_ref[blk, off]] for blk, off in toks]) * ds[1][i][None, :, None]
        vt = np.stack([E4M3[vc_ref[blk, off]] for blk, off in toks]) * ds[2][i][None, :, None]
        qq = E4M3[q[i]] * np.repeat(ds[0][i], h // h_k)[None, :, None]
        o_ref[i], l_ref[i] = attention_ref(qq, kt, vt, causal=True)
    args = ["kvcache", "--dtype", "fp8", "--causal", "--q", save("q8.npy", q),
            "--k-cache", save("kc8.npy", kc), "--v-cache", save("vc8.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens), "--page-table", save("pt.npy", pt),
            "--k-new", save("kn8.npy", kn), "--v-new", save("vn8.npy", vn),
            "--q-descale", save("qd.npy", ds[0]), "--k-descale", save("kd.npy", ds[1]),
            "--v-descale", save("vd.npy", ds[2]), "--out", path("o.npy"), "--lse", path("l.npy"),
            "--k-cache-out", path("kc2.npy"), "--v-cache-out", path("vc2.npy")]
    # Decode on cpu-avx512-bf16 (what "auto" picks on AMD AVX512_BF16 CPUs) rounds the
    # softmax weights P to bf16 as FlashAttention-3 does: up to 2^-8 max|v| more
    # (docs/semantics.md section 6; v dequantised, times v_descale).
    v_max = max(np.abs(E4M3[vc_ref]).max(), np.abs(E4M3[vn]).max()) * ds[2].max()
    for be in BACKENDS:
        run(args + ["--backend", be])
        p_round = 2.0 ** -8 * v_max if be == "auto" else 0.0
        check_close(f"fp8 kvcache out [{be}]", np.load(path("o.npy")), o_ref,
                    1e-4 * max(1.0, np.abs(o_ref).max()) + p_round)
        check_close(f"fp8 kvcache lse [{be}]", np.load(path("l.npy")), l_ref, 1e-4, 1e-5)
        for nm, got, ref in (("k", np.load(path("kc2.npy")), kc_ref), ("v", np.load(path("vc2.npy")), vc_ref)):
            if got.dtype != np.uint8 or not np.array_equal(got, ref):
                sys.exit(f"FAIL: updated fp8 {nm} cache differs from the expected bytes [{be}]")
        print(f"ok fp8 cache append bytes exact [{be}]")


def case_attn_qv():
    """--qv (FA3): dense and varlen, fp32 and bf16, GQA, causal / softcap; bad --qv files."""
    r = rng()
    for (b, s_q, s_k, h, h_k, d, d_v, extra, kw, dtype, atol) in [
            (2, 17, 40, 6, 2, 64, 128, ["--causal"], {"causal": True}, "fp32", 2e-4),
            (1, 3, 90, 4, 1, 32, 256, ["--softcap", 15], {"softcap": 15.0}, "fp32", 2e-4),
            (2, 20, 33, 4, 2, 64, 64, ["--causal", "--scale", 0.1], {"causal": True, "scale": 0.1}, "bf16", 2e-2)]:
        q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
        k = r.standard_normal((b, s_k, h_k, d)).astype(np.float32)
        v = r.standard_normal((b, s_k, h_k, d_v)).astype(np.float32)
        qv = r.standard_normal((b, s_q, h, d_v)).astype(np.float32)
        conv = bf16_round if dtype == "bf16" else (lambda x: np.asarray(x, np.float64))
        refs = [attention_ref(conv(q[i]), conv(k[i]), conv(v[i]), qv=conv(qv[i]), **kw) for i in range(b)]
        o_ref, l_ref = np.stack([o for o, _ in refs]), np.stack([l for _, l in refs])
        args = ["attn", "--q", save("q.npy", q), "--k", save("k.npy", k), "--v", save("v.npy", v),
                "--qv", save("qv.npy", qv), "--out", path("o.npy"), "--lse", path("l.npy"), "--dtype", dtype]
        for be in BACKENDS:
            run(args + ["--backend", be] + extra)
            check_close(f"qv out d=({d},{d_v}) {dtype} [{be}]", np.load(path("o.npy")), o_ref, atol)
            check_close(f"qv lse d=({d},{d_v}) {dtype} [{be}]", np.load(path("l.npy")), l_ref, atol, 1e-5)
    # Varlen: qv [total_q, h, d_v] packed like q.
    h, h_k, d, d_v = 4, 2, 32, 64
    lens_q, lens_k = [5, 0, 12, 3], [7, 6, 20, 0]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = r.standard_normal((cu_q[-1], h, d)).astype(np.float32)
    k = r.standard_normal((cu_k[-1], h_k, d)).astype(np.float32)
    v = r.standard_normal((cu_k[-1], h_k, d_v)).astype(np.float32)
    qv = r.standard_normal((cu_q[-1], h, d_v)).astype(np.float32)
    o_ref, l_ref = np.zeros((cu_q[-1], h, d_v)), np.full((h, cu_q[-1]), -np.inf)
    for i in range(len(lens_q)):
        a, e, c, f = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        o, l = attention_ref(q[a:e].astype(np.float64), k[c:f].astype(np.float64), v[c:f].astype(np.float64),
                             causal=True, qv=qv[a:e].astype(np.float64))
        o_ref[a:e], l_ref[:, a:e] = o, l
    args = ["attn", "--q", save("q.npy", q), "--k", save("k.npy", k), "--v", save("v.npy", v),
            "--qv", save("qv.npy", qv), "--cu-seqlens-q", save("cq.npy", cu_q), "--cu-seqlens-k",
            save("ck.npy", cu_k), "--causal", "--out", path("o.npy"), "--lse", path("l.npy")]
    for be in BACKENDS:
        run(args + ["--backend", be])
        check_close(f"qv varlen out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"qv varlen lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
    # Bad --qv: shape (names both), file dtype, d_v over the limit (names the MLA path).
    q = save("q.npy", r.standard_normal((1, 4, 6, 32)).astype(np.float32))
    k = save("k.npy", r.standard_normal((1, 5, 2, 32)).astype(np.float32))
    v = save("v.npy", r.standard_normal((1, 5, 2, 64)).astype(np.float32))
    base = ["attn", "--q", q, "--k", k, "--v", v]
    expect_error(base + ["--qv", save("qvbad.npy", r.standard_normal((1, 4, 6, 32)).astype(np.float32))],
                 ["--qv", "[1, 4, 6, 32]", "[1, 4, 6, 64]"], rc=2)
    expect_error(base + ["--qv", save("qvf2.npy", r.standard_normal((1, 4, 6, 64)).astype(np.float16))],
                 ["--qv", "<f2", "<f4"], rc=2)
    v512 = save("v512.npy", r.standard_normal((1, 5, 2, 512)).astype(np.float32))
    expect_error(["attn", "--q", q, "--k", k, "--v", v512, "--qv",
                  save("qv512.npy", r.standard_normal((1, 4, 6, 512)).astype(np.float32))],
                 ["--qv", "d_v = 512", "256", "ringattn mla"], rc=2)


# ---------------------------------------------------------------- kvcache
def paged_cache(r, b, h_k, d, d_v, page, blocks, max_pages, seqlens):
    """K/V caches [blocks, page, h_k, d / d_v] holding seqlens[i] random tokens of sequence i
    on the pages of its page-table row (a random permutation), NaN in every unused slot."""
    kc = np.full((blocks, page, h_k, d), np.nan, dtype=np.float32)
    vc = np.full((blocks, page, h_k, d_v), np.nan, dtype=np.float32)
    pt = r.permutation(blocks)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    for i in range(b):
        for t in range(seqlens[i]):
            kc[pt[i, t // page], t % page] = r.standard_normal((h_k, d))
            vc[pt[i, t // page], t % page] = r.standard_normal((h_k, d_v))
    return kc, vc, pt


def kvcache_ref(q, k_tokens, v_tokens, causal):
    return attention_ref(q, k_tokens, v_tokens, causal=causal)


def case_kvcache_paged_append():
    r = rng()
    b, s_q, h, h_k, d, d_v, page, blocks, max_pages, s_new = 2, 3, 4, 2, 32, 32, 4, 12, 5, 3
    seqlens = np.array([5, 9], dtype=np.int32)
    kc, vc, pt = paged_cache(r, b, h_k, d, d_v, page, blocks, max_pages, seqlens)
    q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
    kn = r.standard_normal((b, s_new, h_k, d)).astype(np.float32)
    vn = r.standard_normal((b, s_new, h_k, d_v)).astype(np.float32)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    for i in range(b):
        for t in range(s_new):
            pos = seqlens[i] + t
            kc_ref[pt[i, pos // page], pos % page] = kn[i, t]
            vc_ref[pt[i, pos // page], pos % page] = vn[i, t]
    args = ["--q", save("q.npy", q), "--k-cache", save("kc.npy", kc), "--v-cache", save("vc.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens), "--page-table", save("pt.npy", pt),
            "--k-new", save("kn.npy", kn), "--v-new", save("vn.npy", vn), "--out", path("o.npy"),
            "--lse", path("l.npy"), "--k-cache-out", path("kc2.npy"), "--v-cache-out", path("vc2.npy")]
    for causal in (False, True):
        o_ref = np.zeros((b, s_q, h, d_v))
        l_ref = np.zeros((b, h, s_q))
        for i in range(b):
            n = seqlens[i] + s_new
            toks = [(pt[i, t // page], t % page) for t in range(n)]
            kt = np.stack([kc_ref[blk, off] for blk, off in toks]).astype(np.float64)
            vt = np.stack([vc_ref[blk, off] for blk, off in toks]).astype(np.float64)
            o_ref[i], l_ref[i] = kvcache_ref(q[i].astype(np.float64), kt, vt, causal)
        for be in BACKENDS:
            run(["kvcache", "--backend", be] + args + (["--causal"] if causal else []))
            check_close(f"paged out causal={causal} [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
            check_close(f"paged lse causal={causal} [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
            for nm, got, ref in (("k", np.load(path("kc2.npy")), kc_ref), ("v", np.load(path("vc2.npy")), vc_ref)):
                if not np.array_equal(got, ref, equal_nan=True):
                    sys.exit(f"FAIL: updated {nm} cache differs from the expected append [{be}]")
            print(f"ok paged cache append exact causal={causal} [{be}]")


def case_kvcache_varlen():
    # Chunked prefill against a paged cache: --cu-seqlens-q / --cu-seqlens-k-new, each
    # sequence its own number of query rows and new keys (one with none), causal.
    r = rng()
    h, h_k, d, page, blocks, max_pages = 4, 2, 32, 8, 24, 6
    seqlens = np.array([10, 0, 25], np.int32)
    q_lens, new_lens = [5, 3, 0], [5, 3, 0]
    b = len(seqlens)
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu_n = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int32)
    kc, vc, pt = paged_cache(r, b, h_k, d, d, page, blocks, max_pages, seqlens)
    q = r.standard_normal((cu_q[-1], h, d)).astype(np.float32)
    kn = r.standard_normal((cu_n[-1], h_k, d)).astype(np.float32)
    vn = r.standard_normal((cu_n[-1], h_k, d)).astype(np.float32)
    o_ref = np.zeros((cu_q[-1], h, d))
    l_ref = np.zeros((h, cu_q[-1]))
    for i in range(b):
        toks = [(pt[i, t // page], t % page) for t in range(seqlens[i])]
        kt = np.concatenate([np.stack([kc[x] for x in toks]).reshape(-1, h_k, d) if toks else np.zeros((0, h_k, d)),
                             kn[cu_n[i]:cu_n[i + 1]]]).astype(np.float64)
        vt = np.concatenate([np.stack([vc[x] for x in toks]).reshape(-1, h_k, d) if toks else np.zeros((0, h_k, d)),
                             vn[cu_n[i]:cu_n[i + 1]]]).astype(np.float64)
        if q_lens[i]:
            o, l = attention_ref(q[cu_q[i]:cu_q[i + 1]].astype(np.float64), kt, vt, causal=True)
            o_ref[cu_q[i]:cu_q[i + 1]] = o
            l_ref[:, cu_q[i]:cu_q[i + 1]] = l
    args = ["kvcache", "--q", save("q.npy", q), "--k-cache", save("kc.npy", kc), "--v-cache", save("vc.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens), "--page-table", save("pt.npy", pt),
            "--k-new", save("kn.npy", kn), "--v-new", save("vn.npy", vn),
            "--cu-seqlens-q", save("cuq.npy", cu_q), "--cu-seqlens-k-new", save("cun.npy", cu_n),
            "--causal", "--out", path("o.npy"), "--lse", path("l.npy")]
    for be in BACKENDS:
        run(args + ["--backend", be])
        check_close(f"kvcache varlen out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"kvcache varlen lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
    bad_cu = save("badcu.npy", np.array([0, 5, 7, 9], np.int32))
    i = args.index("--cu-seqlens-q")
    expect_error(args[:i + 1] + [bad_cu] + args[i + 2:], ["--cu-seqlens-q", "last entry", "8"], rc=2)


def case_kvcache_leftpad():
    r = rng()
    b, s_q, h, h_k, d, d_v, b_cache, s_cache, s_new = 2, 4, 6, 2, 64, 64, 3, 24, 2
    seqlens = np.array([10, 20], dtype=np.int32)
    leftpad = np.array([3, 0], dtype=np.int32)
    bidx = np.array([2, 0], dtype=np.int32)
    kc = np.full((b_cache, s_cache, h_k, d), np.nan, dtype=np.float32)
    vc = np.full((b_cache, s_cache, h_k, d_v), np.nan, dtype=np.float32)
    for i in range(b):
        kc[bidx[i], leftpad[i]:seqlens[i]] = r.standard_normal((seqlens[i] - leftpad[i], h_k, d))
        vc[bidx[i], leftpad[i]:seqlens[i]] = r.standard_normal((seqlens[i] - leftpad[i], h_k, d_v))
    q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
    kn = r.standard_normal((b, s_new, h_k, d)).astype(np.float32)
    vn = r.standard_normal((b, s_new, h_k, d_v)).astype(np.float32)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    for i in range(b):
        kc_ref[bidx[i], seqlens[i]:seqlens[i] + s_new] = kn[i]
        vc_ref[bidx[i], seqlens[i]:seqlens[i] + s_new] = vn[i]
    args = ["--q", save("q.npy", q), "--k-cache", save("kc.npy", kc), "--v-cache", save("vc.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens.astype(np.int64)),
            "--cache-leftpad", save("lp.npy", leftpad), "--cache-batch-idx", save("bi.npy", bidx),
            "--k-new", save("kn.npy", kn), "--v-new", save("vn.npy", vn), "--out", path("o.npy"),
            "--lse", path("l.npy"), "--k-cache-out", path("kc2.npy"), "--causal", "--num-splits", 3]
    o_ref = np.zeros((b, s_q, h, d_v))
    l_ref = np.zeros((b, h, s_q))
    for i in range(b):
        lo, hi = leftpad[i], seqlens[i] + s_new
        o_ref[i], l_ref[i] = kvcache_ref(q[i].astype(np.float64), kc_ref[bidx[i], lo:hi].astype(np.float64),
                                         vc_ref[bidx[i], lo:hi].astype(np.float64), True)
    for be in BACKENDS:
        run(["kvcache", "--backend", be] + args)
        check_close(f"leftpad out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"leftpad lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
        if not np.array_equal(np.load(path("kc2.npy")), kc_ref, equal_nan=True):
            sys.exit(f"FAIL: updated k cache differs from the expected append [{be}]")


def case_kvcache_qv():
    """--qv against a paged cache with appended keys (NaN in unused slots), GQA, causal."""
    r = rng()
    b, s_q, h, h_k, d, d_v, page, blocks, max_pages, s_new = 2, 3, 4, 2, 64, 128, 4, 14, 6, 2
    seqlens = np.array([7, 13], dtype=np.int32)
    kc, vc, pt = paged_cache(r, b, h_k, d, d_v, page, blocks, max_pages, seqlens)
    q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
    qv = r.standard_normal((b, s_q, h, d_v)).astype(np.float32)
    kn = r.standard_normal((b, s_new, h_k, d)).astype(np.float32)
    vn = r.standard_normal((b, s_new, h_k, d_v)).astype(np.float32)
    o_ref, l_ref = np.zeros((b, s_q, h, d_v)), np.zeros((b, h, s_q))
    for i in range(b):
        toks = [(pt[i, t // page], t % page) for t in range(seqlens[i])]
        kt = np.concatenate([np.stack([kc[x] for x in toks]), kn[i]]).astype(np.float64)
        vt = np.concatenate([np.stack([vc[x] for x in toks]), vn[i]]).astype(np.float64)
        o_ref[i], l_ref[i] = attention_ref(q[i].astype(np.float64), kt, vt, causal=True,
                                           qv=qv[i].astype(np.float64))
    args = ["kvcache", "--q", save("q.npy", q), "--qv", save("qv.npy", qv), "--k-cache", save("kc.npy", kc),
            "--v-cache", save("vc.npy", vc), "--cache-seqlens", save("sl.npy", seqlens),
            "--page-table", save("pt.npy", pt), "--k-new", save("kn.npy", kn), "--v-new", save("vn.npy", vn),
            "--causal", "--out", path("o.npy"), "--lse", path("l.npy")]
    for be in BACKENDS:
        run(args + ["--backend", be])
        check_close(f"kvcache qv out [{be}]", np.load(path("o.npy")), o_ref, 2e-4)
        check_close(f"kvcache qv lse [{be}]", np.load(path("l.npy")), l_ref, 2e-4, 1e-5)
    i = args.index("--qv")
    bad = save("qvbad.npy", np.zeros((b, s_q, h, d), np.float32))
    expect_error(args[:i + 1] + [bad] + args[i + 2:], ["--qv", "[2, 3, 4, 64]", "[2, 3, 4, 128]"], rc=2)


def rotate(x, cos, sin, pos, interleaved):
    """x [n, heads, d] float64, rotary at positions pos [n] (FA apply_rotary_emb)."""
    x = x.copy()
    half = cos.shape[1]
    i0 = np.arange(half) * 2 if interleaved else np.arange(half)
    i1 = i0 + 1 if interleaved else i0 + half
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    a, b = x[..., i0].copy(), x[..., i1].copy()
    x[..., i0] = a * c - b * s
    x[..., i1] = a * s + b * c
    return x


def case_kvcache_rotary():
    r = rng()
    b, s_q, h, h_k, d, s_cache, s_new, rot = 2, 3, 4, 2, 32, 16, 3, 16
    seqlens = np.array([4, 9], dtype=np.int32)
    kc = np.full((b, s_cache, h_k, d), np.nan, dtype=np.float32)
    vc = np.full((b, s_cache, h_k, d), np.nan, dtype=np.float32)
    for i in range(b):
        kc[i, :seqlens[i]] = r.standard_normal((seqlens[i], h_k, d))
        vc[i, :seqlens[i]] = r.standard_normal((seqlens[i], h_k, d))
    q = r.standard_normal((b, s_q, h, d)).astype(np.float32)
    kn = r.standard_normal((b, s_new, h_k, d)).astype(np.float32)
    vn = r.standard_normal((b, s_new, h_k, d)).astype(np.float32)
    theta = r.uniform(0, 2 * np.pi, (s_cache, rot // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    base = ["--q", save("q.npy", q), "--k-cache", save("kc.npy", kc), "--v-cache", save("vc.npy", vc),
            "--cache-seqlens", save("sl.npy", seqlens), "--k-new", save("kn.npy", kn),
            "--v-new", save("vn.npy", vn), "--rotary-cos", save("cos.npy", cos),
            "--rotary-sin", save("sin.npy", sin), "--out", path("o.npy"), "--lse", path("l.npy")]
    c64, s64 = cos.astype(np.float64), sin.astype(np.float64)
    rot_seqlens = np.array([7, 0], dtype=np.int32)  # --rotary-seqlens: positions from here
    for interleaved, causal, with_rs in ((False, False, False), (False, True, False),
                                         (True, False, False), (True, True, False),
                                         (False, True, True), (True, False, True)):
        o_ref = np.zeros((b, s_q, h, d))
        l_ref = np.zeros((b, h, s_q))
        for i in range(b):
            p0 = rot_seqlens[i] if with_rs else seqlens[i]
            knr = rotate(kn[i].astype(np.float64), c64, s64, p0 + np.arange(s_new), interleaved)
            qpos = p0 + np.arange(s_q) if causal else np.full(s_q, p0)
            qr = rotate(q[i].astype(np.float64), c64, s64, qpos, interleaved)
            n = seqlens[i]
            kt = np.concatenate([kc[i, :n].astype(np.float64), knr])
            vt = np.concatenate([vc[i, :n].astype(np.float64), vn[i].astype(np.float64)])
            o_ref[i], l_ref[i] = attention_ref(qr, kt, vt, causal=causal)
        extra = (["--causal"] if causal else []) + (["--rotary-interleaved"] if interleaved else [])
        if with_rs:
            extra += ["--rotary-seqlens", save("rs.npy", rot_seqlens)]
        for be in BACKENDS:
            run(["kvcache", "--backend", be] + base + extra)
            tag = f"rotary interleaved={interleaved} causal={causal} rotary_seqlens={with_rs} [{be}]"
            check_close("out " + tag, np.load(path("o.npy")), o_ref, 2e-4)
            check_close("lse " + tag, np.load(path("l.npy")), l_ref, 2e-4, 1e-5)


# ---------------------------------------------------------------- bench
def case_bench_quick():
    js = path("bench.json")
    out = run(["bench", "--quick", "--threads", "1", "--repeats", "1", "--case", "^prefill_fp32$,^decode_bf16$",
               "--json", js]).stdout
    print(out)
    data = json.load(open(js))
    # Field names and order of the --json file (docs/cli.md); read_gbs_between_runs only
    # for GB/s cases.
    ordered = json.load(open(js), object_pairs_hook=lambda kv: [k for k, _ in kv])
    assert ordered == ["cpu_features", "fma_isa", "backend", "quick", "repeats", "peaks", "results"], ordered
    assert data["quick"] is True and data["repeats"] == 1, data
    assert [list(p) for p in data["peaks"]] == [["threads", "fma_gflops", "read_gbs"]], data["peaks"]
    for x in data["results"]:
        keys = ["case", "threads", "median_s", "value", "unit", "ratio_to_peak"]
        keys += ["read_gbs_between_runs"] if x["unit"] == "GB/s" else []
        assert list(x) == keys + ["note"], list(x)
    assert data["peaks"][0]["fma_gflops"] > 0 and data["peaks"][0]["read_gbs"] > 0, data
    names = sorted(x["case"] for x in data["results"])
    assert names == ["decode_bf16", "prefill_fp32"], names
    for x in data["results"]:
        assert x["value"] > 0 and x["ratio_to_peak"] > 0 and x["median_s"] > 0, x
    assert "of peak" in out and "peak (threads=1)" in out
    # The memory-order probe: head-major GB/s on the line, key-major and in-cache GB/s in
    # the note (or the note says why it was skipped).
    out = run(["bench", "--quick", "--threads", "2", "--repeats", "2", "--case", "^decode_memory_order$",
               "--json", js]).stdout
    (x,) = json.load(open(js))["results"]
    print(x["case"], x["note"])
    if "skipped" not in x["note"]:
        assert x["value"] > 0 and x["unit"] == "GB/s", x
        m = re.search(r"key-major \(no prefetch\) ([0-9.]+) GB/s = ([0-9.]+)x head-major; in cache ([0-9.]+) GB/s",
                      x["note"])
        assert m and all(float(g) > 0 for g in m.groups()), x["note"]
    bad = run(["bench", "--quick", "--threads", "64", "--repeats", "1", "--case", "^decode_memory_order$"],
              expect_rc=2)
    assert "--threads" in bad.stderr and "64 threads" in bad.stderr, bad.stderr
    run(["bench", "--list"])
    bad = run(["bench", "--case", "no_such_case"], expect_rc=2)
    assert "--case" in bad.stderr, bad.stderr
    print("ok bench")


# ---------------------------------------------------------------- version
def case_version():
    """`ringattn --version` prints project(VERSION) of the top-level CMakeLists.txt."""
    top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "CMakeLists.txt")
    m = re.search(r"^project\(ringattn VERSION ([0-9.]+)", open(top).read(), re.M)
    assert m, f"no project(ringattn VERSION ...) in {top}"
    out = run(["--version"]).stdout.strip()
    assert out == f"ringattn {m.group(1)}", f"--version printed {out!r}, CMakeLists.txt has {m.group(1)}"
    print("ok", out)


# ---------------------------------------------------------------- outputs
def case_outputs():
    """--json fields, output paths checked before computing, no partial or temporary
    files left by a failed command, an output written onto its own input."""
    r = rng()
    q = save("q.npy", r.standard_normal((1, 6, 4, 32)).astype(np.float32))
    k = save("k.npy", r.standard_normal((1, 9, 2, 32)).astype(np.float32))
    v = save("v.npy", r.standard_normal((1, 9, 2, 32)).astype(np.float32))
    base = ["attn", "--q", q, "--k", k, "--v", v]
    j = json.loads(run(base + ["--json", "--causal"]).stdout.strip().splitlines()[-1])
    for key, want in (("command", "attn"), ("s_q", 6), ("s_k", 9), ("h", 4), ("h_k", 2),
                      ("d", 32), ("causal", True)):
        if j.get(key) != want:
            sys.exit(f"FAIL: attn --json: {key} = {j.get(key)!r}, expected {want!r}: {j}")
    if not (isinstance(j.get("kernel_s"), (int, float)) and j["kernel_s"] >= 0):
        sys.exit(f"FAIL: attn --json: kernel_s missing or negative: {j}")
    print("ok attn --json", j)
    expect_error(base + ["--out", path("no_such_dir/o.npy")], ["--out", "cannot open for writing"],
                 rc=1)
    # A failed command leaves an existing output as it was, and no temporary file.
    keep = np.arange(5, dtype=np.float32)
    o = save("o.npy", keep)
    expect_error(base + ["--out", o, "--lse", path("no_such_dir/l.npy")], ["--lse"], rc=1)
    if not np.array_equal(np.load(o), keep):
        sys.exit("FAIL: a failed attn changed its --out file")
    left = sorted(f for f in os.listdir(TMP) if ".tmp-" in f)
    if left:
        sys.exit(f"FAIL: temporary files left behind: {left}")
    run(base + ["--out", os.devnull, "--lse", os.devnull])
    print("ok output paths")
    # kvcache: the updated cache written onto the input cache file equals a separate one.
    kc = r.standard_normal((1, 12, 2, 32)).astype(np.float32)
    vc = r.standard_normal((1, 12, 2, 32)).astype(np.float32)
    kcp, vcp = save("kc.npy", kc), save("vc.npy", vc)
    kn = save("kn.npy", r.standard_normal((1, 2, 2, 32)).astype(np.float32))
    vn = save("vn.npy", r.standard_normal((1, 2, 2, 32)).astype(np.float32))
    lens = save("lens.npy", np.array([7], np.int32))
    kv = ["kvcache", "--q", q, "--cache-seqlens", lens, "--k-new", kn, "--v-new", vn]
    run(kv + ["--k-cache", kcp, "--v-cache", vcp, "--k-cache-out", path("kc2.npy"),
              "--v-cache-out", path("vc2.npy"), "--out", path("o1.npy")])
    if not (np.array_equal(np.load(kcp), kc) and np.array_equal(np.load(vcp), vc)):
        sys.exit("FAIL: kvcache changed its input cache files")
    run(kv + ["--k-cache", kcp, "--v-cache", vcp, "--k-cache-out", kcp, "--v-cache-out", vcp,
              "--out", path("o2.npy")])
    for a, b in (("kc2.npy", "kc.npy"), ("vc2.npy", "vc.npy"), ("o1.npy", "o2.npy")):
        if not np.array_equal(np.load(path(a)), np.load(path(b))):
            sys.exit(f"FAIL: kvcache in place: {b} differs from {a}")
    print("ok kvcache cache written onto its input")


# ---------------------------------------------------------------- bad inputs
def expect_error(args, needles, rc=None):
    r = run(args, expect_rc=None)
    if r.returncode == 0 or (rc is not None and r.returncode != rc):
        sys.exit(f"FAIL: {' '.join(map(str, args))}: exit {r.returncode}, expected "
                 f"{rc if rc is not None else 'non-zero'}\n{r.stderr}")
    for n in needles:
        if n not in r.stderr:
            sys.exit(f"FAIL: {' '.join(map(str, args))}: '{n}' not in message: {r.stderr}")
    print(f"ok error exit {r.returncode}: {r.stderr.strip()}")


def case_bad_inputs():
    r = rng()
    q = save("q.npy", r.standard_normal((1, 4, 6, 32)).astype(np.float32))
    k = save("k.npy", r.standard_normal((1, 5, 2, 32)).astype(np.float32))
    v = save("v.npy", r.standard_normal((1, 5, 2, 32)).astype(np.float32))
    k8 = save("k8.npy", r.standard_normal((1, 5, 2, 32)))
    k4h = save("k4h.npy", r.standard_normal((1, 5, 4, 32)).astype(np.float32))
    v4h = save("v4h.npy", r.standard_normal((1, 5, 4, 32)).astype(np.float32))
    vbad = save("vbad.npy", r.standard_normal((1, 6, 2, 32)).astype(np.float32))
    base = ["attn", "--q", q, "--k", k, "--v", v]
    expect_error(["attn", "--q", path("missing.npy"), "--k", k, "--v", v], ["--q", "missing.npy"], rc=1)
    expect_error(["attn", "--q", q, "--k", k8, "--v", v], ["--k", "<f8"])
    expect_error(["attn", "--q", q, "--k", k, "--v", vbad], ["--v", "[1, 6, 2, 32]", "[1, 5, 2, 32]"], rc=2)
    expect_error(["attn", "--q", q, "--k", k4h, "--v", v4h], ["--k", "h_k = 4", "h = 6"], rc=2)
    expect_error(base + ["--frobnicate", "1"], ["--frobnicate"], rc=2)
    expect_error(["attn", "--q", q, "--k", k], ["--v"], rc=2)
    expect_error(base + ["--threads", "-1"], ["--threads"], rc=2)
    expect_error(base + ["--window", "-2", "0"], ["--window"], rc=2)
    expect_error(base + ["--dtype", "fp64"], ["--dtype"], rc=2)
    expect_error(base + ["--backend", "nonesuch"], ["--backend"], rc=2)
    expect_error(["kvcache", "--q", q, "--k-cache", k, "--v-cache", v, "--cache-seqlens", k],
                 ["--cache-seqlens"], rc=2)
    expect_error(["kvcache", "--q", q, "--k-cache", k, "--v-cache", v,
                  "--cache-seqlens", save("sl.npy", np.array([2, 3], np.int32))],
                 ["--cache-seqlens", "[2]", "[1]"], rc=2)
    expect_error(["bench", "--threads", "0"], ["--threads"], rc=2)
    expect_error(["bench", "--threads", "1,x"], ["--threads"], rc=2)
    for sub in ("attn", "kvcache", "bench"):
        h = run([sub, "--help"])
        assert "usage: ringattn " + sub in h.stdout, h.stdout
    print("ok help")


def main():
    global BIN, TMP
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    BIN = sys.argv[1]
    fn = globals().get("case_" + sys.argv[2])
    if fn is None:
        sys.exit(f"unknown case {sys.argv[2]}")
    with tempfile.TemporaryDirectory(prefix="ringattn_cli_") as d:
        TMP = d
        fn()
    print("PASS")


if __name__ == "__main__":
    main()
