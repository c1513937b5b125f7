#!/usr/bin/python3
"""Whole-process cost of a one-shot `ringattn attn` next to the kernel time it reports.

Writes the bench shape's inputs (b=1, s=4096, h=32, h_k=8, d=128, fp32 .npy, seed 0) to
a scratch directory, then runs `ringattn attn --q --k --v --out --lse --json` for
fp32/bf16 x non-causal/causal and prints, per case, the median over --reps runs of
  wall_s     whole process, fork to exit (time.perf_counter around the subprocess)
  kernel_s   the "kernel_s" field of the command's JSON (the engine call alone)
  ratio      wall_s / kernel_s (1.00 = no cost outside the kernel)
Several binaries (--bin A --bin B) are run alternately within each repetition, so
that A and B see the same machine load. A binary without --json is read from its
text line ("...: 123.456 ms").

  /usr/bin/python3 launch/front_door.py --bin build/rel/bin/ringattn --reps 5
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

B, S, H, H_K, D = 1, 4096, 32, 8, 128


def make_inputs(directory, seed):
    rng = np.random.default_rng(seed)
    paths = {}
    for name, heads in (("q", H), ("k", H_K), ("v", H_K)):
        paths[name] = os.path.join(directory, name + ".npy")
        np.save(paths[name], rng.standard_normal((B, S, heads, D), dtype=np.float32))
    return paths


def run_once(binary, paths, out_dir, dtype, causal, threads):
    cmd = [binary, "attn", "--q", paths["q"], "--k", paths["k"], "--v", paths["v"],
           "--out", os.path.join(out_dir, "out.npy"), "--lse", os.path.join(out_dir, "lse.npy"),
           "--dtype", dtype, "--threads", str(threads)]
    if causal:
        cmd.append("--causal")
    json_cmd = cmd + ["--json"]
    t0 = time.perf_counter()
    r = subprocess.run(json_cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode == 2 and "json" in r.stderr:  # a binary that predates --json
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    line = r.stdout.strip().splitlines()[-1]
    if line.startswith("{"):
        kernel = json.loads(line)["kernel_s"]
    else:
        kernel = float(re.search(r": ([0-9.]+) ms$", line).group(1)) * 1e-3
    return wall, kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", action="append", required=True, help="ringattn binary (repeatable)")
    ap.add_argument("--reps", type=int, default=5, help="runs per case and binary (median)")
    ap.add_argument("--threads", type=int, default=0, help="--threads of the command (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = make_inputs(tmp, args.seed)
        print(f"front door: ringattn attn b={B} s={S} h={H} h_k={H_K} d={D}, fp32 .npy inputs, "
              f"--threads {args.threads}, median of {args.reps} runs, binaries alternated")
        print(f"{'binary':<40} {'dtype':<5} {'causal':<6} {'wall_s':>8} {'kernel_s':>9} "
              f"{'outside_s':>9} {'ratio':>6}")
        for dtype in ("fp32", "bf16"):
            for causal in (False, True):
                samples = {b: [] for b in args.bin}
                # One warm-up per binary (page cache, first-touch of the library files).
                for b in args.bin:
                    run_once(b, paths, tmp, dtype, causal, args.threads)
                for _ in range(args.reps):
                    for b in args.bin:
                        samples[b].append(run_once(b, paths, tmp, dtype, causal, args.threads))
                for b in args.bin:
                    wall = statistics.median(w for w, _ in samples[b])
                    kern = statistics.median(k for _, k in samples[b])
                    ratios = [w / k for w, k in samples[b]]
                    print(f"{b:<40} {dtype:<5} {str(causal):<6} {wall:8.3f} {kern:9.3f} "
                          f"{wall - kern:9.3f} {statistics.median(ratios):6.3f}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
