#include "cli/ring_common.hpp"

#include <cmath>
#include <iostream>
#include <limits>
#include <vector>

#include "ringattn/comm/collectives.hpp"
#include "ringattn/error.hpp"

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

}  // namespace ringattn::cli
