"""Speed of FA3's qv on ringattn's CPU kernels: one call with qv against the same call
without it, and against the concatenation fallback it replaces ([q | qv] . [k | v] with
head dim d + d_v, timed without the concatenation itself; only where d + d_v <= 256). A, B and C alternate within
each repetition; the fastest repetition of each is printed (on a shared, loaded machine
the minimum is the stable estimate of the uncontended time; --stat median for medians).

usage: PYTHONPATH=build/rel/python python3 examples/python/bench_qv.py [--threads N] [--reps R]
           [--backend NAME] [--stat min|median] [--clock wall|cpu] [--only CASE_PREFIX]
"""

import argparse
import time

import numpy as np
import torch

import ringattn
from ringattn.flash_attn_interface import flash_attn_func, flash_attn_with_kvcache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--stat", choices=("min", "median"), default="min")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (with --threads 1, robust to other load)")
    ap.add_argument("--only", default="", help="run the cases whose name starts with this")
    args = ap.parse_args()
    ringattn.set_backend(args.backend)
    if args.threads:
        ringattn.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    cases = [
        # name, b, s_q, s_k, h, h_k, d, d_v, causal, kvcache
        ("prefill", 1, 2048, 2048, 8, 8, 64, 256, True, False),
        ("prefill", 1, 2048, 2048, 8, 8, 64, 128, True, False),
        ("prefill_gqa", 1, 1024, 4096, 16, 2, 64, 128, True, False),
        ("decode", 4, 1, 8192, 16, 1, 64, 256, False, True),
        ("decode", 4, 1, 8192, 16, 1, 64, 128, False, True),
        ("decode_gqa", 4, 1, 8192, 16, 4, 64, 128, False, True),
    ]
    print(f"backend {ringattn.backend()}, threads {ringattn.get_num_threads()}, {args.stat} of "
          f"{args.reps} repetitions, {args.clock} clock")
    print(f"{'case d/d_v':<20} {'dtype':<5} {'no qv ms':>9} {'qv ms':>9} {'concat ms':>10} "
          f"{'qv/no qv':>9} {'qv/concat':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, b, s_q, s_k, h, h_k, d, d_v, causal, kv in cases:
            if not name.startswith(args.only):
                continue
            q, qv = rnd(b, s_q, h, d, dtype=dtype), rnd(b, s_q, h, d_v, dtype=dtype)
            k, v = rnd(b, s_k, h_k, d, dtype=dtype), rnd(b, s_k, h_k, d_v, dtype=dtype)
            qc, kc = torch.cat([q, qv], -1), torch.cat([k, v], -1)  # the fallback's inputs
            scale = (d + d_v) ** -0.5
            seqlens = torch.full((b,), s_k, dtype=torch.int32)
            if kv:
                calls = {
                    "noqv": lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                           softmax_scale=scale),
                    "qv": lambda: flash_attn_with_kvcache(q, k, v, qv=qv, cache_seqlens=seqlens),
                    "concat": lambda: flash_attn_with_kvcache(qc, kc, v, cache_seqlens=seqlens,
                                                             softmax_scale=scale),
                }
            else:
                calls = {
                    "noqv": lambda: flash_attn_func(q, k, v, softmax_scale=scale, causal=causal),
                    "qv": lambda: flash_attn_func(q, k, v, qv=qv, causal=causal),
                    "concat": lambda: flash_attn_func(qc, kc, v, softmax_scale=scale, causal=causal),
                }
            if d + d_v > 256:  # the fallback cannot run: the kernels cap head dims at 256
                del calls["concat"]
                err = float("nan")
            else:
                ref, got = calls["concat"](), calls["qv"]()
                err = (ref.float() - got.float()).abs().max().item()
            times = {n: [] for n in calls}
            for _ in range(args.reps):
                for n, fn in calls.items():
                    t0 = clock()
                    fn()
                    times[n].append(clock() - t0)
            stat = np.min if args.stat == "min" else np.median
            med = {n: 1e3 * float(stat(t)) for n, t in times.items()}
            med.setdefault("concat", float("nan"))
            dt = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{name + f' {d}/{d_v}':<20} {dt:<5} {med['noqv']:9.2f} {med['qv']:9.2f} "
                  f"{med['concat']:10.2f} {med['qv'] / med['noqv']:9.2f} "
                  f"{med['qv'] / med['concat']:10.2f}   (max|qv - concat| {err:.2g})")


if __name__ == "__main__":
    main()
