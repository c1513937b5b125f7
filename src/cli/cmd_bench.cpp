// `ringattn bench`: kernel benchmarks reported against this machine's peaks,
// measured in the same run and on the same thread count:
//   FMA peak   register-resident fp32 FMA loop (the selected backend's ISA) -> GFLOP/s cases
//   read BW    streaming sum over an array of 8 x last-level cache      -> GB/s cases
// Each case runs once for warm-up, then --repeats times; the median is reported.
// GB/s cases are also compared run by run: one pass of the read loop runs right
// before each timed run, and "of peak" is the median over runs of (achieved / that
// reading). On a shared machine the bandwidth swings by 2x within minutes, so a peak
// taken once at the start would make the ratio a measure of the neighbours' load.
#include <omp.h>

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "cli/args.hpp"
#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "ringattn/bench.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: ringattn bench [--threads 1,2] [--case FILTER] [--repeats N] [--backend NAME]\n"
    "                      [--quick] [--json FILE] [--list]\n"
    "\n"
    "Measures this machine's FMA peak and memory read bandwidth, then runs the benchmark\n"
    "cases and prints median time, achieved GFLOP/s or GB/s and the ratio to the peak.";

struct Row {
  std::string name, unit, note;
  int threads = 0;
  double median_s = 0.0, value = 0.0, ratio = 0.0;
  double read_gbs = 0.0;  // GB/s cases: median of the read-loop passes between runs
};

struct Peak {
  int threads = 0;
  double gflops = 0.0, gbs = 0.0;
};

// The options of `ringattn bench`, each declared once (cli/args.hpp).
struct BenchArgs {
  std::string threads;  // comma-separated thread counts, empty = all
  std::string filter;   // --case
  int repeats = 0;      // 0 until resolved: --repeats, or 5 (2 with --quick)
  std::string backend = "auto";
  bool quick = false;
  std::string json;  // --json FILE
  bool list = false;
  po::variables_map vm;  // what the command line gave

  template <class V>
  void for_each(V& f) {
    f.group("Options");
    f(threads, {"threads", "comma-separated thread counts, e.g. 1,2 (default: all threads)"});
    f(filter, {"case",
               "run only cases whose name contains this text (comma-separated alternatives; ^ "
               "and $ anchor)"});
    f(repeats, {"repeats", "timed runs per case, >= 1 (default 5, --quick 2)", kNoDefault});
    f(backend, {"backend", "kernel backend (see attn --help)"});
    f(quick, {"quick", "small sizes for a smoke run"});
    f(json, {"json", "also write the results as JSON to this file", kNoDefault});
    f(list, {"list", "list the cases and exit"});
  }
};

// Substring match; a leading '^' / trailing '$' anchors at the start / end.
bool name_matches(const std::string& name, std::string pat) {
  const bool front = !pat.empty() && pat.front() == '^';
  if (front) pat.erase(0, 1);
  const bool back = !pat.empty() && pat.back() == '$';
  if (back) pat.pop_back();
  if (front && back) return name == pat;
  if (front) return name.rfind(pat, 0) == 0;
  if (back)
    return name.size() >= pat.size() &&
           name.compare(name.size() - pat.size(), pat.size(), pat) == 0;
  return name.find(pat) != std::string::npos;
}

// The cases --case selects (comma-separated alternatives); all without a filter.
std::vector<BenchCase> select_cases(const std::string& filter) {
  std::vector<BenchCase> cases = all_bench_cases();
  if (filter.empty()) return cases;
  std::vector<std::string> alts;
  std::size_t pos = 0;
  while (pos <= filter.size()) {
    const std::size_t c = std::min(filter.find(',', pos), filter.size());
    if (c > pos) alts.push_back(filter.substr(pos, c - pos));
    pos = c + 1;
  }
  std::vector<BenchCase> kept;
  for (auto& c : cases)
    for (const auto& a : alts)
      if (name_matches(c.name, a)) {
        kept.push_back(std::move(c));
        break;
      }
  std::string names;
  for (const auto& c : all_bench_cases()) names += (names.empty() ? "" : ", ") + c.name;
  RA_CHECK_ARG(!kept.empty(),
               "--case: no case matches '" << filter << "' (cases: " << names << ")");
  return kept;
}

// The machine's peaks at each thread count, printed as they are measured.
std::vector<Peak> measure_peaks(const std::vector<int>& thread_counts, const std::string& fma_isa,
                                bool quick) {
  std::vector<Peak> peaks;
  for (const int t : thread_counts) {
    Peak pk;
    pk.threads = t;
    pk.gflops = measure_fma_peak_gflops_isa(t, fma_isa, quick ? 0.05 : 0.2, 3);
    pk.gbs = measure_read_bandwidth_gbs(t, quick ? (std::size_t{32} << 20) : 0, quick ? 2 : 5);
    peaks.push_back(pk);
    std::printf("peak (threads=%d): fma %.1f GFLOP/s (%s loop), read bandwidth %.1f GB/s\n", t,
                pk.gflops, fma_isa.c_str(), pk.gbs);
  }
  return peaks;
}

// One case at one thread count; GB/s cases compared run by run with the read loop
// (`probe`, one pass right before each timed run).
Row run_case(const BenchArgs& a, const BenchCase& c, const Peak& pk, ReadBandwidthProbe* probe) {
  BenchContext ctx;
  ctx.threads = pk.threads;
  ctx.backend = a.backend;
  ctx.repeats = a.repeats;
  ctx.quick = a.quick;
  std::vector<double> bw;  // read-loop GB/s before each timed run
  if (c.unit == "GB/s") ctx.before_run = [&] { bw.push_back(probe->measure_once()); };
  const BenchMeasurement m = c.run(ctx);
  Row r;
  r.name = c.name;
  r.unit = c.unit;
  r.note = m.note;
  r.threads = pk.threads;
  r.median_s = median_of(m.seconds);
  r.value = r.median_s > 0 ? m.work / r.median_s / 1e9 : 0.0;
  if (c.unit == "GB/s" && bw.size() == m.seconds.size() && !bw.empty()) {
    std::vector<double> ratios;
    for (std::size_t i = 0; i < bw.size(); ++i)
      ratios.push_back(m.seconds[i] > 0 && bw[i] > 0 ? m.work / m.seconds[i] / 1e9 / bw[i] : 0.0);
    r.ratio = median_of(ratios);
    r.read_gbs = median_of(bw);
    char buf[64];
    std::snprintf(buf, sizeof buf, "; read BW between runs %.1f GB/s", r.read_gbs);
    r.note += buf;
  } else {
    const double peak = c.unit == "GB/s" ? pk.gbs : pk.gflops;
    r.ratio = peak > 0 ? r.value / peak : 0.0;
  }
  return r;
}

// Every case at every thread count, one table line each as it finishes.
std::vector<Row> run_cases(const BenchArgs& a, const std::vector<BenchCase>& cases,
                           const std::vector<Peak>& peaks) {
  std::printf("\n%-26s %7s %12s %12s %-8s %8s  %s\n", "case", "threads", "median ms", "achieved",
              "unit", "of peak", "note");
  bool any_gbs = false;
  for (const auto& c : cases) any_gbs = any_gbs || c.unit == "GB/s";
  std::vector<Row> rows;
  for (const Peak& pk : peaks) {
    std::unique_ptr<ReadBandwidthProbe> probe;
    if (any_gbs)
      probe =
          std::make_unique<ReadBandwidthProbe>(pk.threads, a.quick ? (std::size_t{32} << 20) : 0);
    for (const auto& c : cases) {
      const Row r = run_case(a, c, pk, probe.get());
      rows.push_back(r);
      std::printf("%-26s %7d %12.3f %12.2f %-8s %7.1f%%  %s\n", r.name.c_str(), r.threads,
                  r.median_s * 1e3, r.value, r.unit.c_str(), 100.0 * r.ratio, r.note.c_str());
      std::fflush(stdout);
    }
  }
  return rows;
}

void write_json(const BenchArgs& a, const std::string& fma_isa, const std::string& backend_name,
                const std::vector<Peak>& peaks, const std::vector<Row>& rows) {
  Json j;
  j["cpu_features"] = cpu_feature_summary();
  j["fma_isa"] = fma_isa;
  j["backend"] = backend_name;
  j["quick"] = a.quick;
  j["repeats"] = a.repeats;
  j["peaks"] = Json::array();
  for (const Peak& pk : peaks)
    j["peaks"].push_back(Json{{"threads", pk.threads},
                              {"fma_gflops", json_number(pk.gflops)},
                              {"read_gbs", json_number(pk.gbs)}});
  j["results"] = Json::array();
  for (const Row& r : rows) {
    Json row;
    row["case"] = r.name;
    row["threads"] = r.threads;
    row["median_s"] = json_number(r.median_s);
    row["value"] = json_number(r.value);
    row["unit"] = r.unit;
    row["ratio_to_peak"] = json_number(r.ratio);
    if (r.unit == "GB/s") row["read_gbs_between_runs"] = json_number(r.read_gbs);
    row["note"] = r.note;
    j["results"].push_back(std::move(row));
  }
  write_json_file(a.json, j);
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  BenchArgs a;
  if (!parse_args(argc, argv, options(a), kUsage, &a.vm)) return 0;
  if (a.list) {
    for (const auto& c : all_bench_cases())
      std::printf("%s (%s)\n", c.name.c_str(), c.unit.c_str());
    return 0;
  }
  const std::vector<int> thread_counts = a.threads.empty() ? std::vector<int>{omp_get_max_threads()}
                                                           : parse_int_list("--threads", a.threads);
  for (const int t : thread_counts) RA_CHECK_ARG_GE(t, 1, "--threads: each thread count");
  if (!given(a.vm, "repeats")) a.repeats = a.quick ? 2 : 5;
  const int repeats = a.repeats;  // named by the check
  RA_CHECK_ARG_GE(repeats, 1, "--repeats: timed runs per case");
  const std::vector<BenchCase> cases = select_cases(a.filter);
  // Fail early (exit 2) on a backend name this machine cannot run.
  const std::string backend_name = Engine(EngineOptions{a.backend, 1}).backend_name();
  // The FMA peak uses the vector ISA of the selected backend (cpu-avx2 against the AVX2
  // loop even on an AVX-512 machine), so GFLOP/s ratios compare like with like.
  const std::string fma_isa = fma_peak_isa_for_backend(backend_name);

  std::printf("ringattn bench: cpu features: %s; FMA loop: %s; backend: %s; LLC %zu MiB%s\n",
              cpu_feature_summary().c_str(), fma_isa.c_str(), backend_name.c_str(),
              last_level_cache_bytes() >> 20, a.quick ? "; quick sizes" : "");
  const std::vector<Peak> peaks = measure_peaks(thread_counts, fma_isa, a.quick);
  const std::vector<Row> rows = run_cases(a, cases, peaks);
  if (!a.json.empty()) write_json(a, fma_isa, backend_name, peaks, rows);
  return 0;
}

}  // namespace ringattn::cli
