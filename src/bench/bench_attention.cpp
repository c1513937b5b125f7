// Attention benchmark cases for `ringattn bench` (see ringattn/bench.hpp).
//   prefill[_causal]_<dtype>_s<S>: dense forward, b=1 h=32 h_k=8 d=128 s_q=s_k=S.
//     work = 4 * b * h * d * (visible (query, key) pairs): QK^T and PV are 2*d flops
//     each per visible pair; causal counts only the S*(S+1)/2 visible pairs.
//   decode_<dtype>_s<S>: one query token against a dense KV cache of S tokens with
//     split-KV (engine-chosen splits); work = bytes of K and V read (memory bound).
// --quick shrinks S (prefill 256, decode 2048) for CI smoke runs.
#include <cstdint>
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

BenchMeasurement run_decode(const BenchContext& ctx, DType t, int s_k) {
  const int b = 1, h = kHeads, h_k = kKvHeads, d = kHeadDim;
  const auto q = random_tensor(std::int64_t{b} * h * d, t, 4);
  auto kc = random_tensor(std::int64_t{b} * s_k * h_k * d, t, 5);
  auto vc = random_tensor(std::int64_t{b} * s_k * h_k * d, t, 6);
  std::vector<float> out(static_cast<std::size_t>(b) * h * d);
  std::vector<float> lse(static_cast<std::size_t>(b) * h);
  const std::vector<std::int32_t> seqlens(b, s_k);
  KvCacheParams p;
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
  p.num_splits = 0;  // split-KV, engine-chosen
  const Engine engine(EngineOptions{ctx.backend, ctx.threads});
  const SchedulerMetadata plan = engine.plan_kvcache(p);
  p.plan = &plan;
  BenchMeasurement m;
  m.seconds = time_runs(ctx, [&] { engine.forward_kvcache(p); });
  m.work = 2.0 * b * s_k * h_k * d * static_cast<double>(dtype_size(t));
  // fp32 follows EngineOptions::decode_order; 2-byte caches always run head-major.
  m.note = "s_k=" + std::to_string(s_k) + " " + engine.backend_name() + " " +
           (t == DType::kF32 ? engine.decode_order() : std::string("head-major"));
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
  return cases;
}

}  // namespace ringattn
