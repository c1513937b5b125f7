#include "cli/ring_common.hpp"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <vector>

#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/error.hpp"
#include "ringattn/version.hpp"

namespace ringattn::cli {

bool parse_args_mpi(const comm::Communicator& comm, int argc, char** argv,
                    const po::options_description& desc, const std::string& usage,
                    po::variables_map* vm) {
  bool help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--help" || a == "-h") help = true;
  }
  if (help) {
    if (comm.rank() == 0) std::cout << usage << "\n\n" << desc << "\n";
    return false;
  }
  comm::run_collectively(comm, [&] {
    try {
      parse_args(argc, argv, desc, usage, vm);
    } catch (const po::error& e) {
      RA_THROW(InvalidArgument, e.what());
    }
  });
  return true;
}

namespace {
std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

float synthetic_value(std::uint64_t seed, int tensor, std::int64_t index, DType t) {
  const std::uint64_t r =
      splitmix64(seed * 0x100000001b3ull ^ (static_cast<std::uint64_t>(tensor) << 56) ^
                 static_cast<std::uint64_t>(index));
  const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
  float stored = 0.0f;
  std::uint16_t half = 0;
  switch (t) {
    case DType::kBF16:
      half = f32_to_bf16(u);
      stored = bf16_to_f32(half);
      break;
    case DType::kF16:
      half = f32_to_f16(u);
      stored = f16_to_f32(half);
      break;
    default:
      stored = u;
      break;
  }
  return stored;
}

void fill_synthetic(std::uint64_t seed, int tensor, std::int64_t first, std::int64_t n, DType t,
                    void* dst) {
  for (std::int64_t i = 0; i < n; ++i)
    store_from_f32(dst, i, t, synthetic_value(seed, tensor, first + i, t));
}

void reference_row(const RowRefProblem& p, const std::function<double(int, int)>& q_at,
                   const std::function<double(std::int64_t, int, int)>& k_at,
                   const std::function<double(std::int64_t, int, int)>& v_at, double* out,
                   double* lse) {
  const double scale = p.mask.scale > 0.0f ? p.mask.scale : 1.0 / std::sqrt(double(p.d));
  const int wr = p.mask.causal ? 0 : p.mask.window_right;
  const int wl = p.mask.window_left;
  const std::int64_t chunk = p.mask.attention_chunk;
  const int group = p.h / p.h_k;
  std::vector<double> s(static_cast<std::size_t>(p.s_k));
  for (int hh = 0; hh < p.h; ++hh) {
    const int kh = hh / group;
    double m = -std::numeric_limits<double>::infinity();
    std::vector<char> vis(static_cast<std::size_t>(p.s_k), 0);
    for (std::int64_t j = 0; j < p.s_k; ++j) {
      if (wr >= 0 && j > p.row + p.shift + wr) continue;
      if (wl >= 0 && j < p.row + p.shift - wl) continue;
      // attention_chunk: key j in the chunk of the row's diagonal key row + shift.
      if (chunk > 0 && j / chunk != floor_div(p.row + p.shift, chunk)) continue;
      double dot = 0.0;
      for (int c = 0; c < p.d; ++c) dot += q_at(hh, c) * k_at(j, kh, c);
      double sc = dot * scale;
      if (p.mask.softcap > 0.0f) sc = p.mask.softcap * std::tanh(sc / p.mask.softcap);
      s[static_cast<std::size_t>(j)] = sc;
      vis[static_cast<std::size_t>(j)] = 1;
      m = std::max(m, sc);
    }
    double* o = out + static_cast<std::int64_t>(hh) * p.d_v;
    for (int c = 0; c < p.d_v; ++c) o[c] = 0.0;
    if (m == -std::numeric_limits<double>::infinity()) {
      lse[hh] = m;
      continue;
    }
    double sum = 0.0;
    for (std::int64_t j = 0; j < p.s_k; ++j) {
      if (!vis[static_cast<std::size_t>(j)]) continue;
      const double w = std::exp(s[static_cast<std::size_t>(j)] - m);
      sum += w;
      for (int c = 0; c < p.d_v; ++c) o[c] += w * v_at(j, kh, c);
    }
    // Attention sink: an extra logit in the denominator only; the LSE excludes it.
    double denom = sum;
    if (p.mask.sinks) denom += std::exp(double(p.mask.sinks[hh]) - m);
    for (int c = 0; c < p.d_v; ++c) o[c] /= denom;
    lse[hh] = m + std::log(sum);
  }
}

void CheckErrors::add_row(const float* out, const float* lse, std::int64_t lse_stride,
                          const std::vector<double>& ref_out, const std::vector<double>& ref_lse) {
  for (std::size_t e = 0; e < ref_out.size(); ++e)
    max_abs = std::max(max_abs, std::abs(double(out[e]) - ref_out[e]));
  for (std::size_t hh = 0; hh < ref_lse.size(); ++hh) {
    const double a = lse[static_cast<std::int64_t>(hh) * lse_stride], b = ref_lse[hh];
    const double err = (std::isinf(a) && std::isinf(b) && a == b)
                           ? 0.0
                           : std::abs(a - b) / std::max(1.0, std::abs(b));
    max_lse_rel = std::max(max_lse_rel, std::isnan(err) ? 1e30 : err);
  }
}

void CheckErrors::max_over(const comm::Communicator& comm) {
  max_abs = allreduce_max(comm, max_abs);
  max_lse_rel = allreduce_max(comm, max_lse_rel);
}

bool CheckErrors::failed(DType t, const char* command, bool print) const {
  const double tol = t == DType::kF32 ? 1e-4 : 3e-2;
  if (max_abs <= tol && max_lse_rel <= tol) return false;
  if (print)
    std::fprintf(stderr, "ringattn %s: error: --check failed: max abs err %g (tolerance %g)\n",
                 command, max_abs, tol);
  return true;
}

void CheckErrors::to_json(Json& j) const {
  j["max_abs_err"] = json_number(max_abs);
  j["max_lse_rel_err"] = json_number(max_lse_rel);
}

void CheckErrors::print() const {
  std::printf(" | check: max abs err %.3g, max LSE rel err %.3g", max_abs, max_lse_rel);
}

Json result_json(const char* command, int ranks, const Engine& engine) {
  Json j;
  j["command"] = command;
  j["version"] = version();
  j["ranks"] = ranks;
  j["threads"] = engine.threads();
  j["backend"] = engine.backend_name();
  return j;
}

double allreduce_max(const comm::Communicator& comm, double x) {
  double r = 0.0;
  RA_MPI_CHECK(MPI_Allreduce(&x, &r, 1, MPI_DOUBLE, MPI_MAX, comm.get()));
  return r;
}

void StepShares::add(const comm::Communicator& comm, const StepStats& ds) {
  const double step = std::max(ds.total_s, 1e-12);
  step_s.push_back(ds.total_s);
  merge_share.push_back(ds.merge_s / step);
  imbalance_share.push_back(ds.wait_s / step);
  max_wait_share.push_back(ds.max_wait_s / step);
  reduction_share.push_back(allreduce_max(comm, ds.reduce_s) / step);
}

void StepShares::to_json(Json& j) const {
  j["decode_merge_share"] = json_number(median_of(merge_share));
  j["decode_imbalance_share"] = json_number(median_of(imbalance_share));
  j["decode_max_wait_share"] = json_number(median_of(max_wait_share));
  j["decode_reduction_share"] = json_number(median_of(reduction_share));
}

double allreduce_sum(const comm::Communicator& comm, double x) {
  double r = 0.0;
  RA_MPI_CHECK(MPI_Allreduce(&x, &r, 1, MPI_DOUBLE, MPI_SUM, comm.get()));
  return r;
}

Engine make_engine_mpi(const comm::Communicator& comm, const KernelArgs& args) {
  std::unique_ptr<Engine> e;
  comm::run_collectively(comm, [&] { e = std::make_unique<Engine>(make_engine(args)); });
  return std::move(*e);
}

}  // namespace ringattn::cli
