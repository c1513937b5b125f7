// Bench case decode_memory_order: how fast this machine feeds a decode kernel's cache
// reads in the two orders such a kernel can take, with the kernel's arithmetic density.
//
// Each thread streams its own K and V caches shaped as the decode benches' fp8 cache
// ([keys][8 heads][128 bytes], 32768 keys split over the threads, as split-KV splits
// them) tile by tile (64 keys: the K block, then the V block), and spends kMemoryOrderFmaPerLine
// 8-lane FMAs on every 64-byte line it loads, about the fp8 decode engine's arithmetic
// per byte on the development VM. Two orders, timed alternately:
//   head-major  for each head its 64 rows (a key stride apart), then the next head, each
//               load paired with a prefetch of the same step of the next tile's block in
//               memory order: the order and prefetches of the decode kernels, which keep
//               one head's accumulators in registers across the tile's keys.
//   key-major   for each key the rows of all heads (memory order), no software prefetch:
//               one ascending stream, which the hardware prefetchers follow.
// The case reports head-major's GB/s; the note gives key-major's, their ratio, and the
// rate of the same loop on blocks that stay in cache (the arithmetic's own speed).
// On the 2-core Zen 5 VM a head-major stream from memory runs well below its in-cache
// speed while key-major comes close to it (docs/cpu-backend.md, "Round 21"): the
// decode kernels' gap between K/V in cache and K/V in memory is this machine's.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "bench/peak_kernels.hpp"
#include "ringattn/bench.hpp"
#include "ringattn/error.hpp"

namespace ringattn {

namespace {

using bench_detail::kMemoryOrderHeads;
using bench_detail::kMemoryOrderRowBytes;
using bench_detail::kMemoryOrderTileKeys;
constexpr std::int64_t kKeyBytes = std::int64_t{kMemoryOrderHeads} * kMemoryOrderRowBytes;
volatile float g_memory_order_sink = 0.0f;  // keeps the loops' results alive

struct Buffer {
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> p;
  explicit Buffer(std::int64_t bytes)
      : p(static_cast<std::byte*>(std::aligned_alloc(4096, static_cast<std::size_t>(bytes)))) {
    if (!p) RA_THROW(ResourceError, "bench: cannot allocate " << bytes << " bytes");
  }
};

BenchMeasurement run_memory_order(const BenchContext& ctx, std::int64_t keys) {
  const int threads = ctx.threads;
  BenchMeasurement m;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    m.note = "skipped: the loop needs AVX2 and FMA";
    return m;
  }
  const std::int64_t per = keys / threads / kMemoryOrderTileKeys * kMemoryOrderTileKeys;
  if (per < kMemoryOrderTileKeys)
    RA_THROW(InvalidArgument, "--threads: decode_memory_order needs at least "
                                  << kMemoryOrderTileKeys << " keys per thread, got " << keys
                                  << " keys over " << threads << " threads");
  const std::int64_t bytes = per * kKeyBytes;        // one thread's K (and V) block
  const std::int64_t cached = kMemoryOrderTileKeys;  // keys of the in-cache pass (one tile)
  const int cached_passes = static_cast<int>(std::max<std::int64_t>(1, per / cached));
  Buffer k(bytes * threads), v(bytes * threads);
  // Each thread first-touches the part it streams.
#pragma omp parallel num_threads(threads)
  {
    const std::int64_t off = omp_get_thread_num() * bytes;
    std::memset(k.p.get() + off, 0x11, static_cast<std::size_t>(bytes));
    std::memset(v.p.get() + off, 0x22, static_cast<std::size_t>(bytes));
  }
  const auto timed = [&](bool head_major, bool in_cache) {
    double t0 = 0.0, t1 = 0.0;
    float part = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : part)
    {
      const std::int64_t off = omp_get_thread_num() * bytes;
#pragma omp barrier
#pragma omp master
      t0 = omp_get_wtime();
      const std::byte* kb = k.p.get() + off;
      const std::byte* vb = v.p.get() + off;
      if (in_cache) {
        for (int r = 0; r < cached_passes; ++r)
          part = bench_detail::memory_order_stream_avx2(kb, vb, cached, head_major, part * 1e-9f);
      } else {
        part = bench_detail::memory_order_stream_avx2(kb, vb, per, head_major, 0.0f);
      }
#pragma omp barrier
#pragma omp master
      t1 = omp_get_wtime();
    }
    g_memory_order_sink = g_memory_order_sink + part;
    return t1 - t0;
  };
  timed(true, false);  // warm-up: page faults
  std::vector<double> key_major, in_cache;
  for (int r = 0; r < ctx.repeats; ++r) {
    if (ctx.before_run) ctx.before_run();
    if (r % 2 == 0) {
      m.seconds.push_back(timed(true, false));
      key_major.push_back(timed(false, false));
    } else {
      key_major.push_back(timed(false, false));
      m.seconds.push_back(timed(true, false));
    }
    in_cache.push_back(timed(true, true));
  }
  const double total = 2.0 * static_cast<double>(bytes) * threads;
  m.work = total;
  const double hm = total / median_of(m.seconds) / 1e9, km = total / median_of(key_major) / 1e9;
  const double cache_bytes =
      2.0 * static_cast<double>(cached * kKeyBytes) * cached_passes * threads;
  char buf[240];
  std::snprintf(buf, sizeof buf,
                "keys=%lld fp8 rows, %d FMA/line; key-major (no prefetch) %.2f GB/s = %.2fx "
                "head-major; in cache %.2f GB/s",
                static_cast<long long>(per * threads), bench_detail::kMemoryOrderFmaPerLine, km,
                hm > 0 ? km / hm : 0.0, cache_bytes / median_of(in_cache) / 1e9);
  m.note = buf;
  return m;
}

}  // namespace

std::vector<BenchCase> memory_order_bench_cases() {
  return {{"decode_memory_order", "GB/s", [](const BenchContext& ctx) {
             return run_memory_order(ctx, ctx.quick ? 2048 : 32768);
           }}};
}

}  // namespace ringattn
