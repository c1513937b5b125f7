#!/usr/bin/env python3
"""Stands in for `ringattn` in the launch tests: accepts `ring ... --json [--ulysses U]`, prints
on rank 0 a JSON result shaped like the CLI's, with all-to-all fields when U > 1 (as the
Ulysses runs will), and sleeps past the sweep's timeout for --seqlen 999."""
import json
import os
import sys
import time

args = sys.argv[1:]


def opt(name, default):
    return args[args.index(name) + 1] if name in args else default


if opt("--seqlen", "0") == "999":
    time.sleep(60)
ranks = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
u = int(opt("--ulysses", "1"))
s = int(opt("--seqlen", "0"))
t = 1e-6 * s / ranks
res = {"command": args[0], "ranks": ranks, "seqlen": s, "time_s": t, "tflops": 1.0,
       "step_compute_s": t / 2, "step_wait_s": t / 10, "step_bytes": 1000}
if u > 1:
    res.update(ulysses=u, step_alltoall_s=t / 5, alltoall_bytes=4096)
if os.environ.get("OMPI_COMM_WORLD_RANK", "0") == "0":
    print(json.dumps(res))
