#!/usr/bin/env python3
"""`mpirun -np P ringattn mla` (latent cache sharded across P ranks) against the one-process
run on the same files: out and LSE agree (fp32 and bf16 caches, causal multi-token, a
shuffled block table), and sparse --indices with P > 1 stops every rank with one message.

    mla_sharded_check.py RINGATTN MPIRUN WORKDIR
"""
import os
import subprocess
import sys

import numpy as np


def main():
    ringattn, mpirun, work = sys.argv[1:4]
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(5)
    b, s_q, h, page, per_seq = 3, 2, 16, 8, 9
    blocks = b * per_seq
    files = {
        "q": rng.standard_normal((b, s_q, h, 576)).astype(np.float32),
        "kv-cache": rng.standard_normal((blocks, page, 576)).astype(np.float32),
        "block-table": rng.permutation(blocks).reshape(b, per_seq).astype(np.int32),
        "cache-seqlens": np.array([70, 25, 72], np.int32),
    }
    args = []
    for k, v in files.items():
        np.save(os.path.join(work, k + ".npy"), v)
        args += ["--" + k, os.path.join(work, k + ".npy")]
    failures = []
    for kv in ("fp32", "bf16"):
        outs = {}
        for np_ in (1, 3):
            o, l = os.path.join(work, f"o_{kv}_{np_}.npy"), os.path.join(work, f"l_{kv}_{np_}.npy")
            cmd = [mpirun, "--oversubscribe", "-np", str(np_), ringattn, "mla", *args, "--causal",
                   "--kv-dtype", kv, "--threads", "1", "--out", o, "--lse", l]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-500:]}")
            print(r.stdout.strip())
            outs[np_] = (np.load(o), np.load(l))
        e = max(np.abs(outs[1][0] - outs[3][0]).max(), np.abs(outs[1][1] - outs[3][1]).max())
        if not e <= 2e-5:
            failures.append(f"{kv}: 3 ranks differ from 1 by {e:.3g}")
    np.save(os.path.join(work, "idx.npy"), np.zeros((b, s_q, 4), np.int32))
    r = subprocess.run([mpirun, "--oversubscribe", "-np", "2", ringattn, "mla", "--q", args[1],
                        "--kv-cache", args[3], "--indices", os.path.join(work, "idx.npy"), "--out",
                        os.path.join(work, "x.npy")], capture_output=True, text=True)
    if r.returncode != 1 or "sparse MLA decode runs on one rank only" not in r.stderr:
        failures.append(f"sparse with 2 ranks: exit {r.returncode}, {r.stderr[-300:]!r}")
    if failures:
        sys.exit("\n".join(failures))
    print("mla sharded: ok")


if __name__ == "__main__":
    main()
