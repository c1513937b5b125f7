// MLA benchmark cases for `ringattn bench` (see ringattn/bench.hpp).
//   mla_decode_<kv>_b<B>_h<H>_s<S>: absorbed MLA decode, s_q = 1, page 64, cache of
//     S tokens per sequence in kv dtype (bf16 or fp8 e4m3 with bmm1/bmm2 scales).
//     work = bytes of cache read (B * S * 576 * dtype size), unit GB/s (ratio to the
//     measured read bandwidth). The note gives GFLOP/s and the ratio to the FMA peak
//     (2 * 1088 flops per head and token): with h = 128 every cached token costs
//     ~280 kFLOP, so on a CPU the decode is FMA-bound long before it is memory-bound.
//   mla_prefill_<path>_s<S>_k<K>: sparse MLA prefill, one sequence of S tokens, 16
//     heads, topk K (each row lists min(i + 1, K) distinct causal keys), for each
//     explicit path; work = useful flops (2 * 1088 per head and listed key), unit
//     GFLOP/s. Comparing masked_dense with sparse_gather across S shows the crossover
//     that MlaSparsePrefillParams::masked_dense_max_ratio encodes.
// --quick shrinks the sizes for CI smoke runs.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/bench.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn {

namespace {

constexpr int kPage = 64;

// Fast random fill with small finite values: bf16 in +-[2^-8, 2), e4m3 with its
// exponent field <= 7 (magnitude < 2, never the NaN code).
void fill_random(std::vector<std::uint8_t>& buf, DType t, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  if (t == DType::kFP8E4M3) {
    for (std::size_t i = 0; i < buf.size(); i += 8) {
      std::uint64_t r = next() & 0xbfbfbfbfbfbfbfbfull;
      std::memcpy(buf.data() + i, &r, std::min<std::size_t>(8, buf.size() - i));
    }
    return;
  }
  for (std::size_t i = 0; i + 1 < buf.size(); i += 2) {
    const std::uint64_t r = next();
    const auto bits = static_cast<std::uint16_t>((r & 0x807f) | ((0x77 + (r >> 16) % 8) << 7));
    std::memcpy(buf.data() + i, &bits, 2);
  }
}

BenchMeasurement run_decode(const BenchContext& ctx, DType kv, int b, int h, int s) {
  const int pages = (s + kPage - 1) / kPage;
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(b) * pages * kPage * kMlaHeadDim *
                                  dtype_size(kv));
  fill_random(cache, kv, 11);
  std::vector<std::uint8_t> q(static_cast<std::size_t>(b) * h * kMlaHeadDim * 2);
  fill_random(q, DType::kBF16, 12);
  std::vector<std::int32_t> table(static_cast<std::size_t>(b) * pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(3));
  std::vector<std::int32_t> lens(b, s);
  std::vector<float> out(static_cast<std::size_t>(b) * h * kMlaValueDim), lse(b * h);
  MlaDecodeParams p;
  p.q_dtype = DType::kBF16;
  p.kv_dtype = kv;
  p.q = q.data();
  p.kv_cache = cache.data();
  p.out = out.data();
  p.lse = lse.data();
  p.b = b, p.s_q = 1, p.h_q = h;
  p.num_blocks = b * pages, p.page_size = kPage, p.max_blocks = pages;
  p.block_table = table.data();
  p.cache_seqlens = lens.data();
  if (kv == DType::kFP8E4M3) {
    p.bmm1_scale = 0.072f * 0.05f;
    p.bmm2_scale = 0.05f;
  } else {
    p.scale = 0.072f;
  }
  const Engine engine(EngineOptions{ctx.backend, ctx.threads});
  const SchedulerMetadata plan = engine.plan_mla_decode(p);
  p.plan = &plan;
  BenchMeasurement m;
  m.seconds = time_runs(ctx, [&] { engine.mla_decode(p); });
  m.work = static_cast<double>(b) * s * kMlaHeadDim * dtype_size(kv);
  std::vector<double> sorted = m.seconds;
  std::sort(sorted.begin(), sorted.end());
  const double flops = 2.0 * (kMlaHeadDim + kMlaValueDim) * h * static_cast<double>(b) * s;
  const double gflops = flops / sorted[sorted.size() / 2] * 1e-9;
  // FMA peak of the backend's ISA, measured once per (ISA, threads).
  static std::map<std::pair<std::string, int>, double> fma_peaks;
  const std::pair<std::string, int> peak_key{fma_peak_isa_for_backend(engine.backend_name()),
                                             ctx.threads};
  if (fma_peaks.count(peak_key) == 0)
    fma_peaks[peak_key] = measure_fma_peak_gflops_isa(ctx.threads, peak_key.first);
  const double fma_peak = fma_peaks[peak_key];
  char buf[160];
  std::snprintf(buf, sizeof buf, "%.1f GFLOP/s = %.0f%% of FMA peak; %s", gflops,
                100.0 * gflops / fma_peak, engine.backend_name().c_str());
  m.note = buf;
  return m;
}

BenchMeasurement run_prefill(const BenchContext& ctx, MlaPrefillPath path, int s, int topk) {
  const int h = 16;
  std::vector<std::uint8_t> q(static_cast<std::size_t>(s) * h * kMlaHeadDim * 2),
      kv(static_cast<std::size_t>(s) * kMlaHeadDim * 2);
  fill_random(q, DType::kBF16, 21);
  fill_random(kv, DType::kBF16, 22);
  std::vector<std::int32_t> cu = {0, s}, idx(static_cast<std::size_t>(s) * topk, -1);
  std::mt19937 rng(5);
  double pairs = 0.0;
  std::vector<std::int32_t> keys;
  for (int i = 0; i < s; ++i) {
    keys.resize(i + 1);
    std::iota(keys.begin(), keys.end(), 0);
    if (i + 1 > topk) std::shuffle(keys.begin(), keys.end(), rng);
    const int n = std::min(topk, i + 1);
    std::copy_n(keys.begin(), n, idx.begin() + static_cast<std::ptrdiff_t>(i) * topk);
    pairs += n;
  }
  std::vector<float> out(static_cast<std::size_t>(s) * h * kMlaValueDim), lse(s * h);
  MlaSparsePrefillParams p;
  p.dtype = DType::kBF16;
  p.q = q.data(), p.kv = kv.data(), p.cu_seqlens = cu.data(), p.indices = idx.data();
  p.out = out.data(), p.lse = lse.data();
  p.b = 1, p.total = s, p.h_q = h, p.topk = topk;
  p.path = path;
  const Engine engine(EngineOptions{ctx.backend, ctx.threads});
  BenchMeasurement m;
  m.seconds = time_runs(ctx, [&] { engine.mla_sparse_prefill(p); });
  m.work = 2.0 * (kMlaHeadDim + kMlaValueDim) * h * pairs;
  char buf[96];
  std::snprintf(buf, sizeof buf, "s/topk=%.2f %s", static_cast<double>(s) / topk,
                engine.backend_name().c_str());
  m.note = buf;
  return m;
}

}  // namespace

std::vector<BenchCase> mla_bench_cases() {
  std::vector<BenchCase> cases;
  struct Shape {
    int b, h, s, quick_s;
  };
  // The shapes (h = 128, page 64), plus few-head shapes where the decode is
  // bound by memory rather than by FMA throughput.
  const Shape shapes[] = {{1, 128, 8192, 1024},  {1, 128, 65536, 2048}, {32, 128, 8192, 256},
                          {32, 128, 65536, 256}, {1, 1, 65536, 4096},   {32, 16, 8192, 1024}};
  for (DType kv : {DType::kBF16, DType::kFP8E4M3})
    for (const Shape& sh : shapes) {
      const std::string name = std::string("mla_decode_") + dtype_name(kv) + "_b" +
                               std::to_string(sh.b) + "_h" + std::to_string(sh.h) + "_s" +
                               std::to_string(sh.s);
      cases.push_back({name, "GB/s", [kv, sh](const BenchContext& ctx) {
                         return run_decode(ctx, kv, sh.b, sh.h, ctx.quick ? sh.quick_s : sh.s);
                       }});
    }
  constexpr int kTopk = 128;  // a constant: the lambdas below need no capture of it
  for (int s : {160, 192, 256, 512, 1024, 2048})
    for (MlaPrefillPath path : {MlaPrefillPath::kMaskedDense, MlaPrefillPath::kSparseGather}) {
      const std::string name = std::string("mla_prefill_") + mla_prefill_path_name(path) + "_s" +
                               std::to_string(s) + "_k" + std::to_string(kTopk);
      cases.push_back({name, "GFLOP/s", [path, s](const BenchContext& ctx) {
                         return run_prefill(ctx, path, ctx.quick ? s / 4 : s,
                                            ctx.quick ? kTopk / 4 : kTopk);
                       }});
    }
  return cases;
}

}  // namespace ringattn
