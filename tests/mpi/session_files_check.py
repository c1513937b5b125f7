#!/usr/bin/env python3
"""`ringattn session` in files mode against a float64 NumPy reference.

    session_files_check.py RINGATTN MPIRUN NP WORKDIR

Writes a prompt (dense and varlen), decode steps and an extend, runs
`mpirun -np NP ringattn session ... --out-dir`, and checks every output file (shapes and
values: causal attention over each sequence's whole history) and that bad input (decode
batch that disagrees with the prompt's) stops every rank with exit 2 and writes nothing.
"""
import os
import subprocess
import sys

import numpy as np


def causal_ref(q, k, v, scale, window_left=-1):
    """q [L, h, d], k [L, h_k, d], v [L, h_k, d_v] -> out [L, h, d_v], lse [h, L]."""
    L, h, d = q.shape
    g = h // k.shape[1]
    kk = np.repeat(k, g, axis=1).astype(np.float64)
    vv = np.repeat(v, g, axis=1).astype(np.float64)
    s = np.einsum("ihd,jhd->hij", q.astype(np.float64), kk) * scale
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    vis = j <= i
    if window_left >= 0:
        vis &= j >= i - window_left
    s = np.where(vis[None], s, -np.inf)
    m = s.max(axis=2, keepdims=True)
    p = np.exp(s - m)
    lse = np.log(p.sum(axis=2)) + m[..., 0]
    out = np.einsum("hij,jhd->ihd", p / p.sum(axis=2, keepdims=True), vv)
    return out, lse


def main():
    ringattn, mpirun, np_, work = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(7)
    h, h_k, d, d_v = 4, 2, 16, 8
    failures = []
    for varlen in (False, True):
        lens = [37, 37] if not varlen else [23, 5, 41]
        b = len(lens)
        T, t, S1 = 3, 2, 11
        full = [sum(x) for x in zip(lens, [T * t + S1] * b)]
        Q = [rng.standard_normal((n, h, d)).astype(np.float32) for n in full]
        K = [rng.standard_normal((n, h_k, d)).astype(np.float32) for n in full]
        V = [rng.standard_normal((n, h_k, d_v)).astype(np.float32) for n in full]
        files = {}
        if varlen:
            files["prompt-q"] = np.concatenate([Q[s][: lens[s]] for s in range(b)])
            files["prompt-k"] = np.concatenate([K[s][: lens[s]] for s in range(b)])
            files["prompt-v"] = np.concatenate([V[s][: lens[s]] for s in range(b)])
            files["prompt-cu-seqlens"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        else:
            files["prompt-q"] = np.stack([Q[s][: lens[s]] for s in range(b)])
            files["prompt-k"] = np.stack([K[s][: lens[s]] for s in range(b)])
            files["prompt-v"] = np.stack([V[s][: lens[s]] for s in range(b)])
        for name, X in (("q", Q), ("k", K), ("v", V)):
            files["decode-" + name] = np.stack(
                [np.stack([X[s][lens[s] + st * t: lens[s] + (st + 1) * t] for s in range(b)])
                 for st in range(T)])
            files["extend-" + name] = np.stack([X[s][lens[s] + T * t:] for s in range(b)])
        args = []
        for name, arr in files.items():
            path = os.path.join(work, f"{name}.npy")
            np.save(path, arr)
            args += [f"--{name}", path]
        out = os.path.join(work, f"out_{int(varlen)}")
        cmd = [mpirun, "--oversubscribe", "-np", np_, ringattn, "session", *args, "--out-dir", out,
               "--page-size", "4", "--threads", "1", "--extend-mode", "pass-kv" if varlen else "pass-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout, r.stderr)
            sys.exit(f"session files mode (varlen={varlen}) exited {r.returncode}")
        print(r.stdout.strip())
        ref = [causal_ref(Q[s], K[s], V[s], 1 / np.sqrt(d)) for s in range(b)]
        po, pl = np.load(f"{out}/prefill_out.npy"), np.load(f"{out}/prefill_lse.npy")
        do, dl = np.load(f"{out}/decode_out.npy"), np.load(f"{out}/decode_lse.npy")
        eo, el = np.load(f"{out}/extend_out.npy"), np.load(f"{out}/extend_lse.npy")
        assert do.shape == (T, b, t, h, d_v) and dl.shape == (T, b, h, t), (do.shape, dl.shape)
        assert eo.shape == (b, S1, h, d_v) and el.shape == (b, h, S1), (eo.shape, el.shape)
        cu = np.concatenate([[0], np.cumsum(lens)])
        for s in range(b):
            ro, rl = ref[s]
            L = lens[s]
            got_po = po[cu[s]:cu[s + 1]] if varlen else po[s]
            got_pl = pl[:, cu[s]:cu[s + 1]] if varlen else pl[s]
            pairs = [(got_po, ro[:L]), (got_pl, rl[:, :L])]
            for st in range(T):
                a = L + st * t
                pairs += [(do[st, s], ro[a:a + t]), (dl[st, s], rl[:, a:a + t])]
            a = L + T * t
            pairs += [(eo[s], ro[a:]), (el[s], rl[:, a:])]
            for got, want in pairs:
                err = np.abs(got - want).max() if got.size else 0.0
                if not err <= 2e-5:
                    failures.append(f"varlen={varlen} seq {s}: max err {err:.3g}")
    # Bad input: a decode batch that disagrees with the prompt's; nothing written.
    bad = os.path.join(work, "decode-q-bad.npy")
    np.save(bad, np.zeros((1, 5, 1, h, d), np.float32))
    out = os.path.join(work, "out_bad")
    r = subprocess.run([mpirun, "--oversubscribe", "-np", np_, ringattn, "session",
                        "--prompt-q", os.path.join(work, "prompt-q.npy"), "--prompt-k",
                        os.path.join(work, "prompt-k.npy"), "--prompt-v", os.path.join(work, "prompt-v.npy"),
                        "--prompt-cu-seqlens", os.path.join(work, "prompt-cu-seqlens.npy"),
                        "--decode-q", bad, "--decode-k", bad, "--decode-v", bad, "--out-dir", out],
                       capture_output=True, text=True)
    n_msg = r.stderr.count("--decode-q")
    if r.returncode != 2 or n_msg < 1 or any(f.endswith(".npy") for f in os.listdir(out) if os.path.isdir(out)):
        failures.append(f"bad decode batch: exit {r.returncode}, stderr {r.stderr[-400:]!r}")
    if failures:
        sys.exit("\n".join(failures))
    print("session files mode: ok")


if __name__ == "__main__":
    main()
