// Attention benchmark cases for `ringattn bench` (see ringattn/bench.hpp).
//   prefill[_causal]_<dtype>_s<S>: dense forward, b=1 h=32 h_k=8 d=128 s_q=s_k=S.
//     work = 4 * b * h * d * (visible (query, key) pairs): QK^T and PV are 2*d flops
//     each per visible pair; causal counts only the S*(S+1)/2 visible pairs.
//   decode_<dtype>_s<S>: one query token against a dense KV cache of S tokens with
//     split-KV (engine-chosen splits); work = bytes of K and V read (memory bound).
//     decode_fp8: an e4m3 cache (descales 0.5). decode_fp8_vs_bf16: fp8 and bf16
//     caches timed alternately; fp8's GB/s, with bf16's GB/s and the speed ratio in
//     the note.
// --quick shrinks S (prefill 256, decode 2048) for CI smoke runs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include "ringattn/bench.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"

namespace ringattn {

namespace {

constexpr int kHeads = 32, kKvHeads = 8, kHeadDim = 128;

// Uniform values in [-1, 1) rounded to dtype t (xorshift; fast and reproducible).
std::vector<std::byte> random_tensor(std::int64_t n, DType t, std::uint64_t seed) {
  std::vector<std::byte> out(static_cast<std::size_t>(n) * dtype_size(t));
  std::uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (std::int64_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float v = static_cast<float>(s >> 40) / static_cast<float>(1 << 23) - 1.0f;
    store_from_f32(out.data(), i, t, v);
  }
  return out;
}

BenchMeasurement run_prefill(const BenchContext& ctx, DType t, bool causal, int s) {
  const int b = 1, h = kHeads, h_k = kKvHeads, d = kHeadDim;
  const auto q = random_tensor(std::int64_t{b} * s * h * d, t, 1);
  const auto k = random_tensor(std::int64_t{b} * s * h_k * d, t, 2);
  const auto v = random_tensor(std::int64_t{b} * s * h_k * d, t, 3);
  std::vector<float> out(static_cast<std::size_t>(b) * s * h * d);
  std::vector<float> lse(static_cast<std::size_t>(b) * h * s);
  FwdParams p;
  p.dtype = t;
  p.out_dtype = DType::kF32;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  p.b = b;
  p.s_q = s;
  p.s_k = s;
  p.h = h;
  p.h_k = h_k;
  p.d = d;
  p.d_v = d;
  set_contiguous_strides(p);
  p.mask.causal = causal;
  const Engine engine(EngineOptions{ctx.backend, ctx.threads});
  BenchMeasurement m;
  m.seconds = time_runs(ctx, [&] { engine.forward(p); });
  const double pairs = causal ? 0.5 * s * (s + 1.0) : static_cast<double>(s) * s;
  m.work = 4.0 * b * h * d * pairs;
  m.note = "s=" + std::to_string(s) + " " + engine.backend_name();
  return m;
}

// One decode call (b = 1, s_q = 1, h = 32, h_k = 8, d = 128) against a dense cache of
// s_k tokens in dtype t, split-KV planned by the engine. fp8 runs with descales of 0.5
// (the factors only change the per-head scale).
struct DecodeProblem {
  std::vector<std::byte> q, kc, vc;
  std::vector<float> out, lse, descale;
  std::vector<std::int32_t> seqlens;
  KvCacheParams p;
  SchedulerMetadata plan;
  double bytes = 0.0;  // K and V bytes read per call

  DecodeProblem(const Engine& engine, DType t, int s_k) {
    const int b = 1, h = kHeads, h_k = kKvHeads, d = kHeadDim;
    q = random_tensor(std::int64_t{b} * h * d, t, 4);
    kc = random_tensor(std::int64_t{b} * s_k * h_k * d, t, 5);
    vc = random_tensor(std::int64_t{b} * s_k * h_k * d, t, 6);
    out.resize(static_cast<std::size_t>(b) * h * d);
    lse.resize(static_cast<std::size_t>(b) * h);
    seqlens.assign(b, s_k);
    p.dtype = t;
    p.out_dtype = DType::kF32;
    p.q = q.data();
    p.k_cache = kc.data();
    p.v_cache = vc.data();
    p.out = out.data();
    p.lse = lse.data();
    p.b = b;
    p.s_q = 1;
    p.h = h;
    p.h_k = h_k;
    p.d = d;
    p.d_v = d;
    p.b_cache = b;
    p.s_cache = s_k;
    p.cache_seqlens = seqlens.data();
    set_contiguous_strides(p);
    if (t == DType::kFP8E4M3) {
      descale.assign(static_cast<std::size_t>(b) * h_k, 0.5f);
      p.descale.q = p.descale.k = p.descale.v = descale.data();
      p.descale.q_batch_stride = p.descale.k_batch_stride = p.descale.v_batch_stride = h_k;
    }
    p.num_splits = 0;  // split-KV, engine-chosen
    plan = engine.plan_kvcache(p);
    p.plan = &plan;
    bytes = 2.0 * b * s_k * h_k * d * static_cast<double>(dtype_size(t));
  }
};

std::string decode_note(const Engine& engine, DType t, int s_k) {
  // fp32 follows EngineOptions::decode_order; 1- and 2-byte caches always run head-major.
  return "s_k=" + std::to_string(s_k) + " " + engine.backend_name() + " " +
         (t == DType::kF32 ? engine.decode_order() : std::string("head-major"));
}

BenchMeasurement run_decode(const BenchContext& ctx, DType t, int s_k) {
  const Engine engine(EngineOptions{ctx.backend, ctx.threads});
  DecodeProblem pr(engine, t, s_k);
  BenchMeasurement m;
  m.seconds = time_runs(ctx, [&] { engine.forward_kvcache(pr.p); });
  m.work = pr.bytes;
  m.note = decode_note(engine, t, s_k);
  return m;
}

// decode_fp8_vs_bf16: the same decode call on an fp8 and on a bf16 cache, timed
// alternately (fp8, bf16, bf16, fp8, fp8, bf16, ...; the machine's load swings hit
// both alike, and each goes first half of the time).
// The reported time and GB/s are fp8's; the note gives bf16's median GB/s and the
// median over pairs of the speed ratio t_bf16 / t_fp8 (the cache bytes halve, so a
// memory-bound kernel would approach 2), in wall time and in process CPU time.
BenchMeasurement run_decode_fp8_vs_bf16(const BenchContext& ctx, int s_k) {
  const Engine engine(EngineOptions{ctx.backend, ctx.threads});
  DecodeProblem fp8(engine, DType::kFP8E4M3, s_k);
  DecodeProblem bf16(engine, DType::kBF16, s_k);
  // Wall time, and the CPU time of the whole process (all threads) over the same call:
  // on a shared machine the wall time also holds the time slices other processes took,
  // the CPU time only what this call's threads ran (memory stalls included).
  const auto cpu_now = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  double cpu_s = 0.0;
  const auto timed = [&](DecodeProblem& pr) {
    const double c0 = cpu_now();
    const auto t0 = std::chrono::steady_clock::now();
    engine.forward_kvcache(pr.p);
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cpu_s = cpu_now() - c0;
    return wall;
  };
  timed(fp8);  // warm-up
  timed(bf16);
  BenchMeasurement m;
  std::vector<double> t_bf16, ratio, cpu_ratio;
  for (int r = 0; r < ctx.repeats; ++r) {
    // The first call after before_run (a bandwidth probe) runs slower than the same call
    // right after another (on the VM, with only the order alternating, 2-thread runs
    // gave 1.52x-1.90x): an untimed call of the dtype that goes first follows the probe,
    // and the two dtypes take turns going first.
    if (ctx.before_run) {
      ctx.before_run();
      timed(r % 2 == 0 ? fp8 : bf16);
    }
    double a = 0.0, ca = 0.0, b = 0.0, cb = 0.0;
    if (r % 2 == 0) {
      a = timed(fp8), ca = cpu_s;
      b = timed(bf16), cb = cpu_s;
    } else {
      b = timed(bf16), cb = cpu_s;
      a = timed(fp8), ca = cpu_s;
    }
    m.seconds.push_back(a);
    t_bf16.push_back(b);
    ratio.push_back(a > 0 ? b / a : 0.0);
    cpu_ratio.push_back(ca > 0 ? cb / ca : 0.0);
  }
  m.work = fp8.bytes;
  const double tb = median_of(t_bf16);
  char buf[200];
  std::snprintf(
      buf, sizeof buf, "; bf16 %.2f GB/s (median %.3f ms); fp8/bf16 speed %.2fx (CPU time %.2fx)",
      tb > 0 ? bf16.bytes / tb / 1e9 : 0.0, tb * 1e3, median_of(ratio), median_of(cpu_ratio));
  m.note = decode_note(engine, DType::kFP8E4M3, s_k) + buf;
  return m;
}

}  // namespace

std::vector<BenchCase> attention_bench_cases() {
  std::vector<BenchCase> cases;
  for (const DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    const std::string dt = dtype_name(t);
    for (const bool causal : {false, true}) {
      cases.push_back({std::string("prefill_") + (causal ? "causal_" : "") + dt, "GFLOP/s",
                       [t, causal](const BenchContext& ctx) {
                         return run_prefill(ctx, t, causal, ctx.quick ? 256 : 4096);
                       }});
    }
    cases.push_back({"decode_" + dt, "GB/s", [t](const BenchContext& ctx) {
                       return run_decode(ctx, t, ctx.quick ? 2048 : 32768);
                     }});
  }
  cases.push_back({"decode_fp8", "GB/s", [](const BenchContext& ctx) {
                     return run_decode(ctx, DType::kFP8E4M3, ctx.quick ? 2048 : 32768);
                   }});
  cases.push_back({"decode_fp8_vs_bf16", "GB/s", [](const BenchContext& ctx) {
                     return run_decode_fp8_vs_bf16(ctx, ctx.quick ? 2048 : 32768);
                   }});
  return cases;
}

}  // namespace ringattn
