#!/usr/bin/env python3
"""Times PyTorch's CPU scaled_dot_product_attention on the shapes of `ringattn bench`.

The speed yardstick for the kernel figures: run it on the same cores as the bench,
    taskset -c 0,1 ringattn bench --threads 2 --case '^prefill_fp32,^prefill_causal_fp32,^decode_fp32'
    taskset -c 0,1 python3 launch/compare_torch.py --threads 2
and compare the achieved rates (the bench prints this machine's FMA peak and read
bandwidth; this script prints only what PyTorch achieves).

bf16 (the cpu-amx tier's yardstick), 16 threads on the 16-core Xeon, prefill only:
    ringattn bench --threads 16 --backend cpu-amx --case '^prefill_bf16,^prefill_causal_bf16'
    python3 launch/compare_torch.py --threads 16 --dtype bf16 --prefill-only

Shapes (b = 1, h = 32, h_k = 8, d = 128, fp32 or --dtype bf16, PyTorch's own
[b, h, s, d] layout):
  prefill     s_q = s_k = 4096, non-causal and causal; GFLOP/s = 4 s_q s_k h d / time
              (causal counts the visible half, like the bench);
  decode      s_q = 1, s_k = 32768; GB/s = bytes of K and V ([8 heads]) / time.
GQA runs two ways: `enable_gqa=True`, and K/V repeated to 32 heads before timing
("repeated": the kernel then reads 4x the bytes, but the rate is still quoted for the
8-head K/V, i.e. what a user with a GQA cache gets).
"""
import argparse
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per case (default 5)")
    ap.add_argument("--seq", type=int, default=4096, help="prefill s_q = s_k (default 4096)")
    ap.add_argument("--decode-keys", type=int, default=32768, help="decode s_k (default 32768)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="q, k, v dtype (default fp32)")
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode cases")
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1:
        sys.exit(f"compare_torch: --threads ({args.threads}) and --repeats ({args.repeats}) must be >= 1")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit(f"compare_torch: PyTorch is not importable here ({e})")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, h, h_k, d = 1, 32, 8, 128
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    group = h // h_k
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'case':<28}{'threads':>8}{'median ms':>12}{'achieved':>12} unit")

    def timed(fn):
        fn()  # warm-up (allocations, thread pool)
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def report(name, secs, amount, unit):
        print(f"{name:<28}{args.threads:>8}{secs * 1e3:>12.3f}{amount / secs / 1e9:>12.2f} {unit}")

    with torch.inference_mode():
        s = args.seq
        q = torch.randn(b, h, s, d, dtype=dt)
        k = torch.randn(b, h_k, s, d, dtype=dt)
        v = torch.randn(b, h_k, s, d, dtype=dt)
        kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        for causal in (False, True):
            flops = 4.0 * s * s * h * d * (0.5 if causal else 1.0)
            tag = ("prefill_causal_" if causal else "prefill_") + args.dtype
            report(f"{tag} gqa", timed(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=True)), flops, "GFLOP/s")
            report(f"{tag} repeated", timed(lambda: F.scaled_dot_product_attention(
                q, kr, vr, is_causal=causal)), flops, "GFLOP/s")
        del q, k, v, kr, vr
        if args.prefill_only:
            return

        s_k = args.decode_keys
        q = torch.randn(b, h, 1, d)
        k = torch.randn(b, h_k, s_k, d)
        v = torch.randn(b, h_k, s_k, d)
        kv_bytes = 2.0 * b * h_k * s_k * d * 4
        report("decode_fp32 gqa", timed(lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True)), kv_bytes, "GB/s")
        kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        report("decode_fp32 repeated", timed(lambda: F.scaled_dot_product_attention(
            q, kr, vr)), kv_bytes, "GB/s")


if __name__ == "__main__":
    main()
