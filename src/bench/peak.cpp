// Measured peaks of this machine (ringattn/bench.hpp): FMA throughput and memory
// read bandwidth on a given number of OpenMP threads.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "bench/peak_kernels.hpp"
#include "ringattn/bench.hpp"
#include "ringattn/error.hpp"

namespace ringattn {

namespace bench_detail {

// Plain 4-lane vectors (SSE2 on any x86-64): mul + add, 8 independent chains.
float fma_loop_generic(std::int64_t iters) {
  typedef float v4 __attribute__((vector_size(16)));
  const v4 m = {0.999999f, 0.999999f, 0.999999f, 0.999999f};
  const v4 c = {1e-7f, 1e-7f, 1e-7f, 1e-7f};
  v4 a[8];
  for (int j = 0; j < 8; ++j) a[j] = v4{0.1f, 0.2f, 0.3f, 0.4f} * static_cast<float>(j + 1);
  for (std::int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = a[j] * m + c;
  }
  float r = 0.0f;
  for (int j = 0; j < 8; ++j) r += a[j][0] + a[j][1] + a[j][2] + a[j][3];
  return r;
}

float read_sum_generic(const float* x, std::size_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += x[i + j];
  float r = 0.0f;
  for (const float v : s) r += v;
  for (; i < n; ++i) r += x[i];
  return r;
}

}  // namespace bench_detail

namespace {

using bench_detail::fma_loop_avx2;
using bench_detail::fma_loop_avx512;
using bench_detail::fma_loop_generic;

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
}

double wall() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

volatile float g_sink = 0.0f;  // keeps the measured loops' results alive

}  // namespace

std::string fma_peak_isa() { return has_avx512() ? "avx512" : has_avx2() ? "avx2" : "sse2"; }

std::string fma_peak_isa_for_backend(const std::string& backend_name) {
  if (backend_name == "cpu-avx2") return "avx2";
  if (backend_name == "cpu-scalar" || backend_name == "reference") return "sse2";
  return fma_peak_isa();
}

double measure_fma_peak_gflops(int threads, double seconds, int repeats) {
  return measure_fma_peak_gflops_isa(threads, fma_peak_isa(), seconds, repeats);
}

double measure_fma_peak_gflops_isa(int threads, const std::string& isa, double seconds,
                                   int repeats) {
  RA_CHECK_ARG_GE(threads, 1, "threads");
  RA_CHECK_ARG_GE(repeats, 1, "repeats");
  float (*loop)(std::int64_t) = fma_loop_generic;
  double flops_per_iter = bench_detail::kFmaFlopsPerIterGeneric;
  if (isa == "avx512") {
    if (!has_avx512()) RA_THROW(UnsupportedError, "bench: FMA loop isa 'avx512' needs AVX-512F");
    loop = fma_loop_avx512;
    flops_per_iter = bench_detail::kFmaFlopsPerIterAvx512;
  } else if (isa == "avx2") {
    if (!has_avx2()) RA_THROW(UnsupportedError, "bench: FMA loop isa 'avx2' needs AVX2 and FMA");
    loop = fma_loop_avx2;
    flops_per_iter = bench_detail::kFmaFlopsPerIterAvx2;
  } else if (isa != "sse2") {
    RA_THROW(InvalidArgument,
             "bench: FMA loop isa must be avx512, avx2 or sse2, got '" << isa << "'");
  }
  // Calibrate the iteration count on one thread so that a run lasts ~`seconds`.
  std::int64_t iters = 1 << 16;
  for (;;) {
    const double t0 = wall();
    g_sink = g_sink + loop(iters);
    const double dt = wall() - t0;
    if (dt > 0.02 || iters > (std::int64_t{1} << 40)) {
      iters = std::max<std::int64_t>(
          1, static_cast<std::int64_t>(iters * seconds / std::max(dt, 1e-9)));
      break;
    }
    iters *= 4;
  }
  // All threads start together after a barrier; the time is the slowest thread's.
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    double t0 = 0.0, t1 = 0.0;
    float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
#pragma omp barrier
#pragma omp master
      t0 = wall();
      sink += loop(iters);
#pragma omp barrier
#pragma omp master
      t1 = wall();
    }
    g_sink = g_sink + sink;
    const double gflops = threads * static_cast<double>(iters) * flops_per_iter / (t1 - t0) / 1e9;
    best = std::max(best, gflops);
  }
  return best;
}

// sysfs first: it gives the cache one core actually shares (e.g. one Zen CCX's
// 32 MiB); glibc's sysconf may report the sum over all cache instances instead.
std::size_t last_level_cache_bytes() {
  for (int idx = 4; idx >= 2; --idx) {  // ".../index3/size" reads "32768K"
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/size");
    std::string s;
    if (f >> s && !s.empty()) {
      std::size_t mult = 1;
      if (s.back() == 'K') mult = 1024;
      if (s.back() == 'M') mult = 1024 * 1024;
      const std::size_t n = std::strtoull(s.c_str(), nullptr, 10) * mult;
      if (n > 0) return n;
    }
  }
  long v = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
  v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  if (v > 0) return static_cast<std::size_t>(v);
  return std::size_t{32} << 20;
}

ReadBandwidthProbe::ReadBandwidthProbe(int threads, std::size_t bytes) : threads_(threads) {
  RA_CHECK_ARG_GE(threads, 1, "threads");
  if (bytes == 0)
    bytes = std::max<std::size_t>(8 * last_level_cache_bytes(), std::size_t{256} << 20);
  n_ = bytes / sizeof(float);
  x_ = static_cast<float*>(std::aligned_alloc(64, (n_ * sizeof(float) + 63) / 64 * 64));
  if (!x_)
    RA_THROW(ResourceError, "bench: cannot allocate " << bytes << " bytes for the bandwidth test");
    // Thread i owns the contiguous part [n*i/T, n*(i+1)/T): it first-touches it and
    // later streams through it, so pages sit near the thread that reads them.
#pragma omp parallel num_threads(threads_)
  {
    const std::size_t t = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t nt = static_cast<std::size_t>(omp_get_num_threads());
    for (std::size_t i = n_ * t / nt; i < n_ * (t + 1) / nt; ++i)
      x_[i] = static_cast<float>(i & 0xff) * 1e-3f;
  }
}

ReadBandwidthProbe::~ReadBandwidthProbe() { std::free(x_); }

double ReadBandwidthProbe::measure_once() const {
  float (*sum)(const float*, std::size_t) =
      has_avx2() ? bench_detail::read_sum_avx2 : bench_detail::read_sum_generic;
  double t0 = 0.0, t1 = 0.0;
  float sink = 0.0f;
#pragma omp parallel num_threads(threads_) reduction(+ : sink)
  {
    const std::size_t t = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t nt = static_cast<std::size_t>(omp_get_num_threads());
    const std::size_t lo = n_ * t / nt, hi = n_ * (t + 1) / nt;
#pragma omp barrier
#pragma omp master
    t0 = wall();
    sink += sum(x_ + lo, hi - lo);
#pragma omp barrier
#pragma omp master
    t1 = wall();
  }
  g_sink = g_sink + sink;
  return static_cast<double>(n_ * sizeof(float)) / (t1 - t0) / 1e9;
}

double measure_read_bandwidth_gbs(int threads, std::size_t bytes, int repeats) {
  RA_CHECK_ARG_GE(repeats, 1, "repeats");
  const ReadBandwidthProbe probe(threads, bytes);
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) best = std::max(best, probe.measure_once());
  return best;
}

std::vector<double> time_runs(const BenchContext& ctx, const std::function<void()>& fn) {
  fn();  // warm-up: page faults, caches, thread pool start
  std::vector<double> t;
  for (int r = 0; r < ctx.repeats; ++r) {
    if (ctx.before_run) ctx.before_run();
    const double t0 = wall();
    fn();
    t.push_back(wall() - t0);
  }
  return t;
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

std::vector<BenchCase> all_bench_cases() {
  std::vector<BenchCase> all = attention_bench_cases();
  for (auto& c : mla_bench_cases()) all.push_back(std::move(c));
  for (auto& c : memory_order_bench_cases()) all.push_back(std::move(c));
  return all;
}

}  // namespace ringattn
