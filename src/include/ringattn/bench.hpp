// Kernel benchmarks of `ringattn bench`: this machine's measured peaks (FMA
// throughput and memory read bandwidth, both on the requested thread count) and a
// registry of benchmark cases whose results are reported as a ratio to those peaks.
//
// Adding cases: each file under src/bench/ provides a function returning its cases
// (e.g. attention_bench_cases() in bench_attention.cpp, mla_bench_cases() in
// bench_mla.cpp) and all_bench_cases() concatenates them. An explicit list is used
// instead of static registrars, which a static library would drop at link time.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace ringattn {

// ---- measured peaks ----

// ISA used by the FMA loop: "avx512", "avx2" or "sse2" (plain mul+add).
std::string fma_peak_isa();

// fp32 FMA throughput of this machine in GFLOP/s (1 FMA = 2 flops) with `threads`
// OpenMP threads, each running a register-resident loop of independent FMAs for
// about `seconds`. Best of `repeats` runs.
double measure_fma_peak_gflops(int threads, double seconds = 0.2, int repeats = 3);

// ISA of the FMA loop matching kernel backend `backend_name` (Engine::backend_name()):
// "cpu-avx2" -> "avx2", "cpu-scalar" and "reference" -> "sse2" (the portable loop),
// any other backend -> fma_peak_isa(), the best ISA of this CPU.
std::string fma_peak_isa_for_backend(const std::string& backend_name);

// As measure_fma_peak_gflops, with the loop of `isa` ("avx512", "avx2" or "sse2");
// UnsupportedError when this CPU cannot run it.
double measure_fma_peak_gflops_isa(int threads, const std::string& isa, double seconds = 0.2,
                                   int repeats = 3);

// Last-level cache size in bytes (sysfs / sysconf; 32 MiB when unknown).
std::size_t last_level_cache_bytes();

// Memory read bandwidth in GB/s (1e9 bytes/s): `threads` threads stream-sum disjoint
// parts of a `bytes`-byte array (first-touched by the same threads). Best of `repeats`.
// bytes = 0 picks 8 x the last-level cache (at least 256 MiB).
double measure_read_bandwidth_gbs(int threads, std::size_t bytes = 0, int repeats = 5);

// The same read loop kept ready for repeated single passes: `ringattn bench` runs one
// pass right before each timed run of a GB/s case, so each run is compared with the
// bandwidth the machine gave at that moment (shared machines swing by 2x in minutes).
class ReadBandwidthProbe {
 public:
  ReadBandwidthProbe(int threads, std::size_t bytes = 0);  // allocates and first-touches
  ~ReadBandwidthProbe();
  ReadBandwidthProbe(const ReadBandwidthProbe&) = delete;
  ReadBandwidthProbe& operator=(const ReadBandwidthProbe&) = delete;
  double measure_once() const;  // GB/s of one pass over the whole array

 private:
  int threads_;
  std::size_t n_;  // floats
  float* x_;
};

// ---- cases ----

struct BenchContext {
  int threads = 1;               // OpenMP threads the case should use
  std::string backend = "auto";  // Engine backend name
  int repeats = 5;               // timed runs (after one warm-up)
  bool quick = false;            // CI smoke: small sizes
  // Runs before each timed run (not the warm-up), outside the timed region; set by
  // `ringattn bench` for GB/s cases to take the interleaved bandwidth reading.
  std::function<void()> before_run;
};

struct BenchMeasurement {
  std::vector<double> seconds;  // one entry per timed run
  double work = 0.0;            // flops (unit GFLOP/s) or bytes (unit GB/s) per run
  std::string note;             // e.g. the backend actually used
};

struct BenchCase {
  std::string name;  // e.g. "prefill_causal_bf16_s4096"
  std::string unit;  // "GFLOP/s" (ratio to FMA peak) or "GB/s" (ratio to read bandwidth)
  std::function<BenchMeasurement(const BenchContext&)> run;
};

// Times `fn` once for warm-up and then ctx.repeats times, calling ctx.before_run (when
// set) before each timed run; returns the run times.
std::vector<double> time_runs(const BenchContext& ctx, const std::function<void()>& fn);

// Median of v (0 when empty; the mean of the two middle values for even sizes).
double median_of(std::vector<double> v);

std::vector<BenchCase> attention_bench_cases();     // src/bench/bench_attention.cpp
std::vector<BenchCase> mla_bench_cases();           // src/bench/bench_mla.cpp
std::vector<BenchCase> memory_order_bench_cases();  // src/bench/bench_memory_order.cpp
std::vector<BenchCase> all_bench_cases();           // every list above, in order

}  // namespace ringattn
