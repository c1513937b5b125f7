#!/usr/bin/env python3
"""Python-call overhead of ringattn, and ringattn against PyTorch's CPU SDPA, in one run.

For each case the same call runs --repeats times; the script prints
  call     median wall time of the Python call (ringattn.flash_attn_interface)
  kernel   median time the C++ kernel ran inside that call (ringattn._C.last_kernel_seconds)
  python   call - kernel, absolute and as a share of the kernel time
and, where torch.nn.functional.scaled_dot_product_attention exists (PyTorch 2.x),
PyTorch's median on the same inputs and threads, with ringattn's rate as a ratio of it
(calls alternate: ringattn, torch, ringattn, torch, ...).

Shapes (the `ringattn bench` shapes): b = 1, h = 32, h_k = 8, d = 128,
  prefill   s_q = s_k = --seq (4096), non-causal and causal, fp32 and bf16;
            GFLOP/s = 4 s_q s_k h d / time (causal: the visible half)
  decode    flash_attn_with_kvcache, s_q = 1, caches of --decode-keys (1024 and 32768) keys,
            fp32; what matters is the Python overhead per call (target: under 30 us). With
            1024 keys (8 MB of K/V) the interpreter's code and data stay in cache; after
            streaming 32768 keys (268 MB) they come back from memory on every call
PyTorch runs GQA with enable_gqa=True where it has it, else with K/V repeated to h heads.

  PYTHONPATH=build/release/python python3 launch/bench_python.py --threads 16
"""
import argparse
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for ringattn and torch (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case (default 5)")
    ap.add_argument("--seq", type=int, default=4096, help="prefill s_q = s_k (default 4096)")
    ap.add_argument("--decode-keys", default="1024,32768", help="decode cache lengths (default 1024,32768)")
    ap.add_argument("--decode-repeats", type=int, default=200, help="timed decode calls (default 200)")
    ap.add_argument("--case", default="prefill,decode", help="comma list of: prefill, decode (default both)")
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.seq < 1:
        sys.exit(f"bench_python: --threads ({args.threads}), --repeats ({args.repeats}) and --seq "
                 f"({args.seq}) must be >= 1")
    import torch
    import torch.nn.functional as F

    import ringattn
    from ringattn import _C
    from ringattn.flash_attn_interface import flash_attn_func, flash_attn_with_kvcache

    torch.set_num_threads(args.threads)
    ringattn.set_num_threads(args.threads)
    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    print(f"ringattn {ringattn.__version__} backend {ringattn.backend()}, torch {torch.__version__}, "
          f"{args.threads} threads; SDPA {'present' if has_sdpa else 'absent (PyTorch < 2.0): no comparison'}")
    torch.manual_seed(0)
    b, h, h_k, d = 1, 32, 8, 128
    cases = set(args.case.split(","))

    def timed(fn):
        # The result stays alive until the clock has stopped: freeing a large output
        # (unmapping its pages) is not part of the call.
        t0 = time.perf_counter()
        result = fn()
        t = time.perf_counter() - t0
        del result
        return t

    if "prefill" in cases:
        s = args.seq
        for dtype, causal in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                              (torch.bfloat16, True)):
            q = torch.randn(b, s, h, d, dtype=dtype)
            k = torch.randn(b, s, h_k, d, dtype=dtype)
            v = torch.randn(b, s, h_k, d, dtype=dtype)
            flops = 4.0 * s * s * h * d * (0.5 if causal else 1.0)
            ra = lambda: flash_attn_func(q, k, v, causal=causal)  # noqa: E731
            tq = tk = tv = None
            if has_sdpa:
                tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                try:
                    F.scaled_dot_product_attention(tq[:, :, :8], tk[:, :, :2], tv[:, :, :2], enable_gqa=True)
                    th = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal,  # noqa: E731
                                                               enable_gqa=True)
                except TypeError:
                    tk, tv = (x.repeat_interleave(h // h_k, dim=1) for x in (tk, tv))
                    th = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)  # noqa: E731
            ra()  # warm-up (page faults, engine scratch)
            if has_sdpa:
                th()
            calls, kernels, torch_t = [], [], []
            for _ in range(args.repeats):
                calls.append(timed(ra))
                kernels.append(_C.last_kernel_seconds())
                if has_sdpa:
                    torch_t.append(timed(th))
            call, kern = statistics.median(calls), statistics.median(kernels)
            over = call - kern
            name = f"prefill {'causal' if causal else 'full'} {str(dtype).replace('torch.', '')} s={s}"
            line = (f"{name:34s} call {call * 1e3:9.2f} ms  kernel {kern * 1e3:9.2f} ms  python "
                    f"{over * 1e6:8.1f} us ({100 * over / kern:5.2f} % of kernel)  "
                    f"{flops / call / 1e9:8.1f} GFLOP/s")
            if has_sdpa:
                tt = statistics.median(torch_t)
                line += f"  | torch SDPA {tt * 1e3:9.2f} ms {flops / tt / 1e9:8.1f} GFLOP/s  ringattn/torch {tt / call:5.2f}x"
            print(line, flush=True)

    for n in ([int(x) for x in args.decode_keys.split(",")] if "decode" in cases else []):
        q = torch.randn(b, 1, h, d)
        kc = torch.randn(b, n, h_k, d)
        vc = torch.randn(b, n, h_k, d)
        lens = torch.full((b,), n, dtype=torch.int32)
        ra = lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)  # noqa: E731
        for _ in range(5):
            ra()
        calls, kernels = [], []
        for _ in range(args.decode_repeats):
            calls.append(timed(ra))
            kernels.append(_C.last_kernel_seconds())
        call, kern = statistics.median(calls), statistics.median(kernels)
        gbs = 2 * n * h_k * d * 4 / call / 1e9
        line = (f"{'decode fp32 s_k=' + str(n):34s} call {call * 1e6:9.1f} us  kernel {kern * 1e6:9.1f} us  python "
                f"{(call - kern) * 1e6:8.1f} us per call  {gbs:6.1f} GB/s of K/V")
        if has_sdpa:
            tq = q.transpose(1, 2).contiguous()
            tk, tv = (x.transpose(1, 2).contiguous() for x in (kc, vc))
            try:
                F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
                th = lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)  # noqa: E731
            except TypeError:
                tk, tv = (x.repeat_interleave(h // h_k, dim=1) for x in (tk, tv))
                th = lambda: F.scaled_dot_product_attention(tq, tk, tv)  # noqa: E731
            th()
            tt = statistics.median(timed(th) for _ in range(max(5, args.decode_repeats // 10)))
            line += f"  | torch SDPA {tt * 1e6:9.1f} us  ringattn/torch {tt / call:5.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
